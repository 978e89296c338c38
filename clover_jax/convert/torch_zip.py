"""torch.save zip archives (`.pth`/`.pt`/`.bin`) read as untrusted input: every entry name and size and
every tensor's offset, sizes, strides and dtype is checked against its storage before a byte is read.

Layout written by torch.save (>= 1.6): `<name>/data.pkl` (the pickle), `<name>/data/<key>` (one raw
little- or big-endian storage per key, `<name>/byteorder` says which), plus small version files.
"""
from __future__ import annotations

import math
import pathlib
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from clover_jax.convert import torch_pickle
from clover_jax.convert.errors import CheckpointFormatError, clip

STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
MAX_PICKLE_BYTES = 256 << 20
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032x
MAX_DIMS = 32
MAX_EXTENT = 2 ** 62  # numpy refuses shapes and strides past its signed 64-bit index type
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError, ValueError,
               NotImplementedError, RuntimeError, OverflowError, MemoryError)


def _check_entries(path: pathlib.Path, archive: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """(prefix, {name: info}) after checking names, duplicates, encryption, compression and sizes."""
    file_size = path.stat().st_size
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = info.filename
        parts = name.split("/")
        if (not name or name.startswith("/") or "\\" in name or "\x00" in name or ".." in parts
                or any(ord(c) < 32 for c in name)):
            raise CheckpointFormatError(f"{path}: archive entry name {clip(repr(name), 80)} is not a plain "
                                        "relative path")
        if name in entries:
            raise CheckpointFormatError(f"{path}: archive entry {clip(name, 80)} appears twice")
        if info.flag_bits & 0x1:
            raise CheckpointFormatError(f"{path}: archive entry {clip(name, 80)} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointFormatError(f"{path}: archive entry {clip(name, 80)} uses compression "
                                        f"{info.compress_type} (torch.save stores entries uncompressed)")
        if info.header_offset + info.compress_size > file_size:
            raise CheckpointFormatError(f"{path}: archive entry {clip(name, 80)} claims bytes beyond the end of "
                                        f"the file ({file_size} bytes; truncated?)")
        limit = info.compress_size if info.compress_type == zipfile.ZIP_STORED else \
            info.compress_size * MAX_DEFLATE_RATIO + 1024
        if info.file_size > limit:
            raise CheckpointFormatError(f"{path}: archive entry {clip(name, 80)} claims {info.file_size} bytes "
                                        f"from {info.compress_size} stored")
        entries[name] = info
    pickles = [n for n in entries if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(pickles) != 1:
        raise CheckpointFormatError(f"{path}: a torch.save zip holds one '<name>/data.pkl', this one has "
                                    f"{len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    if entries[pickles[0]].file_size > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"{path}: data.pkl is {entries[pickles[0]].file_size} bytes, more than the "
                                    f"{MAX_PICKLE_BYTES} a state dict's pickle needs")
    return prefix, entries


class TorchZipReader:
    """An open torch.save archive: `load()` gives the unpickled object with `TensorRecord`s in place of
    tensors, `tensor(name, record)` checks one record against its storage and returns it as numpy."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            self._archive = zipfile.ZipFile(path)
            self._prefix, self._entries = _check_entries(path, self._archive)
            self._byteorder = self._read_byteorder()
        except CheckpointFormatError:
            self.close()
            raise
        except _ZIP_ERRORS as err:
            self.close()
            raise CheckpointFormatError(f"{path}: not a readable zip archive ({type(err).__name__}: "
                                        f"{clip(err)})") from None
        self._storages: dict[str, np.ndarray] = {}

    def close(self) -> None:
        archive = getattr(self, "_archive", None)
        if archive is not None:
            archive.close()

    def __enter__(self) -> "TorchZipReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _read_byteorder(self) -> str:
        info = self._entries.get(self._prefix + "byteorder")
        if info is None:
            return "<"
        value = self._archive.read(info)
        if value not in (b"little", b"big"):
            raise CheckpointFormatError(f"{self.path}: byteorder entry says {clip(repr(value[:20]))}, "
                                        "not 'little' or 'big'")
        return "<" if value == b"little" else ">"

    def load(self) -> Any:
        info = self._entries[self._prefix + "data.pkl"]
        try:
            data = self._archive.read(info)
        except _ZIP_ERRORS as err:
            raise CheckpointFormatError(f"{self.path}: data.pkl cannot be read ({type(err).__name__}: "
                                        f"{clip(err)})") from None
        return torch_pickle.load(data, f"{self.path} (data.pkl)")

    def _storage(self, name: str, ref: torch_pickle.StorageRef) -> np.ndarray:
        if ref.type_name not in STORAGE_DTYPES:
            raise CheckpointFormatError(f"{self.path}: tensor {name!r} has storage type {clip(ref.type_name, 60)}, "
                                        f"which we do not read (known: {sorted(STORAGE_DTYPES)})")
        dtype = np.dtype(STORAGE_DTYPES[ref.type_name]).newbyteorder(self._byteorder)
        cache_key = f"{ref.key}/{dtype.str}"
        if cache_key not in self._storages:
            info = self._entries.get(f"{self._prefix}data/{ref.key}")
            if info is None:
                raise CheckpointFormatError(f"{self.path}: tensor {name!r} refers to storage {ref.key}, which "
                                            "the archive lacks")
            want = ref.numel * dtype.itemsize
            if info.file_size != want:
                raise CheckpointFormatError(
                    f"{self.path}: tensor {name!r}: storage {ref.key} should hold {ref.numel} x {dtype.itemsize} = "
                    f"{want} bytes but its archive entry has {info.file_size}")
            try:
                raw = self._archive.read(info)
            except _ZIP_ERRORS as err:
                raise CheckpointFormatError(f"{self.path}: tensor {name!r}: storage {ref.key} cannot be read "
                                            f"({type(err).__name__}: {clip(err)})") from None
            if len(raw) != want:
                raise CheckpointFormatError(f"{self.path}: tensor {name!r}: storage {ref.key} holds {len(raw)} "
                                            f"bytes, not {want}")
            self._storages[cache_key] = np.frombuffer(raw, dtype=dtype)
        # Another tensor may name the same key with a smaller element count: honour the smaller.
        return self._storages[cache_key][: ref.numel]

    def tensor(self, name: str, record: torch_pickle.TensorRecord) -> np.ndarray:
        """The tensor `record` describes, after checking it lies inside its storage; raises
        CheckpointFormatError naming the file and `name` otherwise."""

        def bad(reason: str) -> CheckpointFormatError:
            return CheckpointFormatError(f"{self.path}: tensor {name!r}: {reason}")

        if not isinstance(record.storage, torch_pickle.StorageRef):
            raise bad("its storage is not a torch storage reference")
        offset, size, stride = record.offset, record.size, record.stride
        if not _is_count(offset):
            raise bad("storage offset is not a non-negative integer")
        if not isinstance(size, tuple) or not isinstance(stride, tuple):
            raise bad("sizes and strides must be tuples")
        if len(size) != len(stride) or len(size) > MAX_DIMS:
            raise bad(f"{len(size)} sizes but {len(stride)} strides (at most {MAX_DIMS} dimensions)")
        if not all(_is_count(n) for n in size):
            raise bad("a size that is not a non-negative integer")
        if not all(_is_count(s) for s in stride):
            raise bad("a stride that is negative or not an integer")
        if any(n > MAX_EXTENT for n in size + stride):
            raise bad(f"sizes {size} or strides {stride} exceed {MAX_EXTENT}, more than any array can index")
        storage = self._storage(name, record.storage)
        numel, count = storage.shape[0], math.prod(size)
        if offset > numel:
            raise bad(f"storage offset {offset} lies beyond its {numel}-element storage")
        if count == 0:
            return np.zeros(size, storage.dtype.newbyteorder("="))
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= numel:
            raise bad(f"sizes {size} with strides {stride} from offset {offset} reach element {last}, beyond "
                      f"its {numel}-element storage")
        if count > numel:
            raise bad(f"{count} elements from a {numel}-element storage (an expanded view; save a copy)")
        itemsize = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                               strides=tuple(s * itemsize for s in stride))
        return view.astype(storage.dtype.newbyteorder("="), copy=True)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
