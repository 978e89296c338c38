"""Read PyTorch checkpoints without PyTorch: `.safetensors`, and `torch.save` zip files (`.pth`/`.pt`/`.bin`).

Official Video Swin / Clover checkpoints are mmcv `torch.save` pickles holding `{"state_dict": …}`;
torchvision and HF ship either those or safetensors. The zip reader below understands the pickle
protocol torch uses for tensors (typed storages + `_rebuild_tensor_v2`) and nothing else: any other
class in the pickle (e.g. mmcv metadata) becomes an inert placeholder, so loading a checkpoint never
imports or executes foreign code.
"""
from __future__ import annotations

import pathlib
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    """What the pickle names as a tensor's storage class (e.g. torch.FloatStorage)."""

    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *unused):
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[offset])
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()


def _rebuild_parameter(data, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix, self._storages = archive, prefix, {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "dict", "list", "tuple", "slice"):
            import builtins

            return getattr(builtins, name)
        if module == "torch" and name in ("device", "Size"):
            return (lambda *a: a) if name == "device" else tuple
        if module == "torch" and name in ("float32", "float16", "bfloat16", "int64"):
            return name
        # Anything else (mmcv meta objects, numpy scalars in "meta") is replaced by a placeholder.
        return _Opaque

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
        name = storage_type.name if isinstance(storage_type, _StorageType) else str(storage_type)
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=_STORAGE_DTYPES[name])[:numel]
        return self._storages[key]


class _Opaque:
    """Stands in for non-tensor objects (e.g. mmcv metadata) so the tensors can still be read."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _load_torch_zip(path: pathlib.Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise ValueError(f"{path}: a zip file without data.pkl is not a torch.save checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        with archive.open(pkl[0]) as f:
            return _Unpickler(f, archive, prefix).load()


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Loads a checkpoint file as `{name: numpy array}`; unwraps `state_dict`/`model`/`module` nesting."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a safetensors file nor a torch.save zip; legacy (pre-1.6) torch pickles are "
            "not supported — re-save it with torch>=1.6 or convert it to safetensors"
        )
    obj = _load_torch_zip(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not tensors:
        raise ValueError(f"{path}: found no tensors (top-level keys: {list(obj)[:10]})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
