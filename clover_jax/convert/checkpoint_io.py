"""Read PyTorch checkpoints without PyTorch: `.safetensors`, and `torch.save` zip files (`.pth`/`.pt`/`.bin`).

Official Video Swin / Clover checkpoints are mmcv `torch.save` pickles holding `{"state_dict": …}`;
torchvision and HF ship either those or safetensors. Both are read as untrusted input: the pickle by a
restricted interpreter that never imports or calls what the file names (`torch_pickle`; non-tensor
objects become inert placeholders), every tensor bounds-checked against its storage (`torch_zip`),
every safetensors header entry checked against the data (`safetensors_io`). Anything damaged or
hostile raises `CheckpointFormatError` (a ValueError) in one line naming the file and the tensor.
"""
from __future__ import annotations

import pathlib
import zipfile
from typing import Any

import numpy as np

from clover_jax.convert.errors import CheckpointFormatError, clip
from clover_jax.convert.safetensors_io import load_safetensors
from clover_jax.convert.torch_pickle import TensorRecord
from clover_jax.convert.torch_zip import TorchZipReader

__all__ = ["CheckpointFormatError", "load_state_dict"]


def _unwrap(obj: Any) -> Any:
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


def _load_torch_zip(path: pathlib.Path) -> dict[str, np.ndarray]:
    with TorchZipReader(path) as reader:
        obj = _unwrap(reader.load())
        if not isinstance(obj, dict):
            raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
        records = {k: v for k, v in obj.items() if isinstance(v, TensorRecord)}
        if not records:
            keys = [clip(k, 40) for k in list(obj)[:10] if isinstance(k, str)]
            raise CheckpointFormatError(f"{path}: found no tensors (top-level keys: {keys})")
        bad_names = [k for k in records if not isinstance(k, str)]
        if bad_names:
            raise CheckpointFormatError(f"{path}: a tensor is keyed by a {type(bad_names[0]).__name__}, not a name")
        return {name: reader.tensor(name, record) for name, record in records.items()}


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Loads a checkpoint file as `{name: numpy array}`; unwraps `state_dict`/`model`/`module` nesting
    and a `module.` prefix. Raises FileNotFoundError, or CheckpointFormatError for a bad file."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointFormatError(f"{path} is a folder; pass the checkpoint file inside it")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    try:
        is_zip = zipfile.is_zipfile(path)
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointFormatError(f"{path}: cannot be read ({clip(err)})") from None
    if not is_zip and magic == b"PK\x03\x04":
        raise CheckpointFormatError(f"{path}: a zip archive whose directory at the end is missing or damaged "
                                    "(truncated download or copy?)")
    if not is_zip:
        raise CheckpointFormatError(
            f"{path}: not a safetensors file nor a torch.save zip; legacy (pre-1.6) torch pickles are "
            "not supported — re-save it with torch>=1.6 or convert it to safetensors"
        )
    tensors = _load_torch_zip(path)
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        name = key[len("module."):] if key.startswith("module.") else key
        out[name] = value
    return out
