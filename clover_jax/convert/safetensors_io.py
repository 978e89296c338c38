"""`.safetensors` files read as untrusted input: header length, JSON, dtypes, shapes and byte ranges
are all checked (inside the data, sized exactly, not overlapping) before any tensor is read.

Format: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data;
offsets are relative to the end of the header.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

from clover_jax.convert.errors import CheckpointFormatError, clip

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 << 20  # the reference implementation's limit
MAX_DIMS = 32


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate key(s) {clip(dupes, 80)}")
    return dict(pairs)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: pathlib.Path, head: bytes, file_size: int) -> tuple[int, dict[str, tuple[Any, tuple, int, int]]]:
    """(data start, {name: (dtype, shape, begin, end)}) from the file's first bytes, every entry checked."""
    if file_size < 8 or len(head) < 8:
        raise CheckpointFormatError(f"{path}: {file_size} bytes is too short for a safetensors file")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CheckpointFormatError(f"{path}: safetensors header length {n} does not fit the {file_size}-byte "
                                    f"file (at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(head[8:8 + n].decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (ValueError, RecursionError) as err:
        raise CheckpointFormatError(f"{path}: safetensors header is not valid JSON ({clip(err)})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    data_size = file_size - 8 - n
    entries: dict[str, tuple[Any, tuple, int, int]] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise CheckpointFormatError(f"{path}: __metadata__ must map strings to strings")
            continue
        entries[name] = _check_entry(path, name, spec, data_size)
    # As the format requires (and the reference reader checks): the tensors tile the data exactly.
    covered, previous = 0, None
    for begin, end, name in sorted((b, e, name) for name, (_, _, b, e) in entries.items()):
        if begin < covered:
            raise CheckpointFormatError(f"{path}: tensors {clip(repr(previous), 60)} and {clip(repr(name), 60)} "
                                        f"overlap (bytes {begin}..{covered})")
        if begin > covered:
            raise CheckpointFormatError(f"{path}: bytes {covered}..{begin} of the data belong to no tensor "
                                        f"(before {clip(repr(name), 60)})")
        covered, previous = max(covered, end), name
    if covered != data_size:
        raise CheckpointFormatError(f"{path}: the tensors cover {covered} of the {data_size} data bytes")
    return 8 + n, entries


def _check_entry(path: pathlib.Path, name: str, spec: Any, data_size: int) -> tuple[Any, tuple, int, int]:
    def bad(reason: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{path}: tensor {clip(repr(name), 100)}: {reason}")

    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad("its header entry must hold exactly dtype, shape and data_offsets")
    dtype_name, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise bad(f"dtype {clip(repr(dtype_name), 40)} is not one we read ({', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        raise bad(f"shape must be a list of at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad("data_offsets must be [begin, end] with non-negative integers")
    begin, end = offsets
    dtype = np.dtype(DTYPES[dtype_name])
    want = math.prod(shape) * dtype.itemsize
    if begin > end or end > data_size:
        raise bad(f"bytes {begin}..{end} lie outside the {data_size} data bytes")
    if end - begin != want:
        raise bad(f"shape {shape} x {dtype_name} needs {want} bytes but data_offsets span {end - begin}")
    return dtype, tuple(shape), begin, end


def load_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a `.safetensors` file as a numpy array (copied out of the file)."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            file_size = path.stat().st_size
            head = f.read(8)
            n = int.from_bytes(head[:8], "little") if len(head) == 8 else 0
            head += f.read(min(n, MAX_HEADER_BYTES, max(0, file_size - 8)))
            start, entries = read_header(path, head, file_size)
            if not entries:
                return {}
            out = {}
            for name, (dtype, shape, begin, end) in entries.items():
                array = np.empty(shape, dtype.newbyteorder("<"))
                f.seek(start + begin)
                got = f.readinto(array.reshape(-1).view(np.uint8))
                if got != end - begin:
                    raise CheckpointFormatError(f"{path}: tensor {clip(repr(name), 100)}: read {got} of "
                                                f"{end - begin} bytes (the file changed while read?)")
                out[name] = array.astype(dtype, copy=False)
            return out
    except OSError as err:
        raise CheckpointFormatError(f"{path}: cannot be read ({clip(err)})") from None
