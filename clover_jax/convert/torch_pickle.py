"""A restricted pickle interpreter for torch.save's `data.pkl`: builds containers, scalars and tensor
records, never imports or calls anything the file names.

Python's own unpickler hashes whatever the file puts in a dict or set (a shared-tuple chain takes
2^depth steps to hash) and calls the globals it is given; this one walks the opcodes itself
(`pickletools.genops`), accepts only the opcodes torch.save writes, allows only scalar or flat-tuple
dict keys, and replaces every class it does not know by an inert placeholder. Tensors come out as
`TensorRecord`s (storage reference + offset/size/stride, unchecked); `torch_zip` checks and reads them.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import pickletools
from typing import Any, Callable

from clover_jax.convert.errors import CheckpointFormatError, clip

MAX_KEY_TUPLE = 16  # longest tuple accepted as a dict key / set item


@dataclasses.dataclass(frozen=True)
class StorageType:
    """What the pickle names as a storage class (torch.FloatStorage, ...)."""

    name: str


@dataclasses.dataclass(frozen=True)
class StorageRef:
    """A persistent id: ('storage', StorageType, key, location, numel)."""

    type_name: str
    key: str
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """The arguments of `_rebuild_tensor_v2`, exactly as the file gave them (checked when read)."""

    storage: Any
    offset: Any
    size: Any
    stride: Any


class Opaque:
    """Stands in for any object of a class we do not read (mmcv metadata, numpy scalars, ...)."""


def _opaque(*_args: Any, **_kwargs: Any) -> Opaque:
    return Opaque()


def _safe_key(key: Any) -> Any:
    """Dict keys and set items: scalars or short flat tuples of scalars (hashing them is cheap)."""
    if key is None or isinstance(key, (str, int, float, bytes)):
        return key
    if isinstance(key, tuple) and len(key) <= MAX_KEY_TUPLE and all(
            k is None or isinstance(k, (str, int, float, bytes)) for k in key):
        return key
    raise ValueError(f"a dict key or set item of type {type(key).__name__} (only scalars are read)")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_unused: Any) -> TensorRecord:
    return TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *_unused: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, _new_type: Any, args: Any, _state: Any = None) -> Any:
    if func is not _rebuild_tensor or not isinstance(args, tuple):
        return Opaque()
    return _rebuild_tensor(*args)


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    if not isinstance(items, (list, tuple)):
        raise ValueError("OrderedDict from a non-list")
    out = collections.OrderedDict()
    for pair in items:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise ValueError("OrderedDict item is not a pair")
        out[_safe_key(pair[0])] = pair[1]
    return out


def _as_list(items: Any = ()) -> list:
    if not isinstance(items, (list, tuple)):
        raise ValueError("list/tuple/set built from a non-list")
    return list(items)


_CALLABLES: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "list"): _as_list,
    ("builtins", "tuple"): lambda items=(): tuple(_as_list(items)),
    ("builtins", "set"): lambda items=(): {_safe_key(k) for k in _as_list(items)},
    ("builtins", "frozenset"): lambda items=(): frozenset(_safe_key(k) for k in _as_list(items)),
    ("torch", "Size"): lambda items=(): tuple(_as_list(items)),
    ("torch", "device"): lambda *args: "device",
}


def _global(module: Any, name: Any) -> Any:
    if not isinstance(module, str) or not isinstance(name, str):
        raise ValueError("a global whose module or name is not a string")
    if module == "torch" and name.endswith("Storage"):  # unknown ones are refused per tensor, by name
        return StorageType(name)
    if (module, name) in _CALLABLES:
        return _CALLABLES[(module, name)]
    if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"):
        return name
    return _opaque  # anything else: an inert placeholder, never imported


def _persistent_load(pid: Any) -> StorageRef:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
        raise ValueError("a persistent id that is not ('storage', type, key, location, numel)")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, StorageType):
        raise ValueError("a storage whose type is not a torch *Storage class")
    if not isinstance(key, str) or not key or not key.isalnum() or not key.isascii():
        raise ValueError("a storage key that is not a short alphanumeric name")
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise ValueError("a storage with a negative or non-integer element count")
    return StorageRef(storage_type.name, key, numel)


_VALUE_OPS = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "FLOAT", "BINFLOAT",
})
_CONSTANTS = {"NONE": lambda: None, "NEWTRUE": lambda: True, "NEWFALSE": lambda: False,
              "EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple, "EMPTY_SET": set}


class _Machine:
    """The pickle stack machine, restricted to what torch.save writes."""

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}

    def pop_mark(self) -> list[Any]:
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def step(self, name: str, arg: Any) -> None:  # noqa: C901 - one branch per opcode family
        st = self.stack
        if name in _VALUE_OPS:
            st.append(arg)
        elif name in _CONSTANTS:
            st.append(_CONSTANTS[name]())
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "MARK":
            self.marks.append(len(st))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(arg)] = st[-1]
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = st[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            st.append(self.memo[int(arg)])
        elif name == "POP":
            st.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            st.append(st[-1])
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            if len(st) < n:
                raise IndexError("stack underflow")
            items = tuple(st[-n:])
            del st[-n:]
            st.append(items)
        elif name == "TUPLE":
            st.append(tuple(self.pop_mark()))
        elif name == "LIST":
            st.append(self.pop_mark())
        elif name == "FROZENSET":
            st.append(frozenset(_safe_key(k) for k in self.pop_mark()))
        elif name == "DICT":
            items = self.pop_mark()
            st.append(self._fill({}, items))
        elif name == "APPEND":
            value = st.pop()
            self._list(st[-1]).append(value)
        elif name == "APPENDS":
            items = self.pop_mark()
            self._list(st[-1]).extend(items)
        elif name == "SETITEM":
            value, key = st.pop(), st.pop()
            self._fill(st[-1], [key, value])
        elif name == "SETITEMS":
            items = self.pop_mark()
            self._fill(st[-1], items)
        elif name == "ADDITEMS":
            items = self.pop_mark()
            target = st[-1]
            if not isinstance(target, set):
                raise ValueError("ADDITEMS on something that is not a set")
            target.update(_safe_key(k) for k in items)
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            st.append(_global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = st.pop(), st.pop()
            st.append(_global(module, attr))
        elif name in ("REDUCE", "NEWOBJ"):
            args, func = st.pop(), st.pop()
            st.append(self._call(func, args))
        elif name == "NEWOBJ_EX":
            _kwargs, args, func = st.pop(), st.pop(), st.pop()
            st.append(self._call(func, args))
        elif name == "BUILD":
            st.pop()  # state: ignored (torch's OrderedDict `_metadata`, placeholders' fields)
            if not isinstance(st[-1], (Opaque, dict)):
                raise ValueError(f"BUILD on a {type(st[-1]).__name__}")
        elif name == "BINPERSID":
            st.append(_persistent_load(st.pop()))
        else:
            raise ValueError(f"pickle opcode {name} is not used by torch.save")

    @staticmethod
    def _list(target: Any) -> list:
        if not isinstance(target, list):
            raise ValueError(f"APPEND on a {type(target).__name__}")
        return target

    @staticmethod
    def _fill(target: Any, items: list[Any]) -> dict:
        if not isinstance(target, dict) or len(items) % 2:
            raise ValueError("SETITEM(S) on something that is not a dict, or an odd item count")
        for i in range(0, len(items), 2):
            target[_safe_key(items[i])] = items[i + 1]
        return target

    @staticmethod
    def _call(func: Any, args: Any) -> Any:
        if not isinstance(args, tuple):
            raise ValueError("a call whose arguments are not a tuple")
        if func is _opaque or func in _CALLABLES.values():
            return func(*args)
        raise ValueError(f"a call of a {type(func).__name__}, which is not a known torch rebuild function")


def load(data: bytes, where: str) -> Any:
    """The object pickled in `data` (torch.save's data.pkl); CheckpointFormatError names `where`."""
    machine = _Machine()
    try:
        for opcode, arg, _pos in pickletools.genops(io.BytesIO(data)):
            if opcode.name == "STOP":
                if len(machine.stack) != 1 or machine.marks:
                    raise ValueError("the pickle stops with a malformed stack")
                return machine.stack[0]
            machine.step(opcode.name, arg)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, RecursionError,
            MemoryError, EOFError) as err:
        raise CheckpointFormatError(f"{where}: not a torch.save pickle we can read "
                                    f"({type(err).__name__}: {clip(err)})") from None
    raise CheckpointFormatError(f"{where}: the pickle ends without its STOP opcode (truncated?)")
