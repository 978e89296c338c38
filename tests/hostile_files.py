"""Writers of hand-made (possibly hostile) `.pth` and `.safetensors` files, without torch.

`pth_pickle` emits the same protocol-2 opcodes torch.save writes for a `{name: tensor}` state dict;
every field (storage type, key, element count, offset, sizes, strides) is taken as given, so a test
can describe a tensor that lies about its storage.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
import zipfile
from typing import Sequence

import numpy as np

STORAGE_OF = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
              np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
              np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
              np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage"}


@dataclasses.dataclass
class TensorSpec:
    """One `_rebuild_tensor_v2(storage, offset, size, stride)` call as the pickle states it."""

    name: str
    storage_key: str
    storage_type: str
    numel: int  # what the persistent id claims
    offset: int
    size: Sequence[int]
    stride: Sequence[int]


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _tuple(values: Sequence[int]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def tensor_opcodes(spec: TensorSpec) -> bytes:
    pid = b"(" + _str("storage") + f"ctorch\n{spec.storage_type}\n".encode() + _str(spec.storage_key) + \
        _str("cpu") + _int(spec.numel) + b"tQ"
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + _int(spec.offset) + _tuple(spec.size) +
            _tuple(spec.stride) + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")


def pth_pickle(specs: Sequence[TensorSpec], extra: bytes = b"") -> bytes:
    """A state-dict pickle: `{name: tensor, ...}` plus `extra` (raw key/value opcodes) before SETITEMS."""
    body = b"".join(_str(s.name) + tensor_opcodes(s) for s in specs)
    return b"\x80\x02}(" + body + extra + b"u."


def write_pth(path: pathlib.Path, pickle_bytes: bytes, storages: dict[str, bytes], *, prefix: str = "archive",
              byteorder: bytes | None = b"little", extra_entries: Sequence[tuple[str, bytes]] = ()) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pickle_bytes)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", b"3\n")
        for name, raw in extra_entries:
            z.writestr(name, raw)
    return path


def pth_from_arrays(path: pathlib.Path, arrays: dict[str, np.ndarray], *, byteorder: str = "little") -> pathlib.Path:
    """A well-formed checkpoint: each array contiguous in its own storage."""
    specs, storages = [], {}
    for i, (name, array) in enumerate(arrays.items()):
        a = np.ascontiguousarray(array)
        stride = [int(s // a.itemsize) for s in a.strides] if a.size else [1] * a.ndim
        specs.append(TensorSpec(name, str(i), STORAGE_OF[a.dtype], a.size, 0, list(a.shape), stride))
        storages[str(i)] = a.astype(a.dtype.newbyteorder("<" if byteorder == "little" else ">")).tobytes()
    return write_pth(path, pth_pickle(specs), storages, byteorder=byteorder.encode())


def safetensors_bytes(header: dict | bytes, data: bytes, *, declared_length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if declared_length is None else declared_length
    return n.to_bytes(8, "little") + raw + data


def reference_strided(storage: np.ndarray, offset: int, size: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """What torch would give for an in-bounds view, computed by explicit indexing (the test oracle)."""
    index = np.full(tuple(size), offset, dtype=np.int64)
    for axis, (n, s) in enumerate(zip(size, stride)):
        shape = [1] * len(size)
        shape[axis] = n
        index = index + (np.arange(n, dtype=np.int64) * s).reshape(shape)
    return storage[index] if len(size) else storage[offset]


def rezip(path: pathlib.Path, source: pathlib.Path, replace: dict[str, bytes]) -> pathlib.Path:
    """A copy of the archive `source` with some entries' bytes replaced (CRCs recomputed)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, replace.get(info.filename, src.read(info)))
    return path

