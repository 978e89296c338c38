"""Name-map machinery shared by every checkpoint converter: layout transforms, shape checks, reports.

A converter builds a *plan* `{our param path: (source key, transform)}` for the parameters it knows
and hands it to `assemble`, which checks every shape against our model's abstract parameters and
reports, by name, what it filled, what is missing and which source keys went unused.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from clover_jax.param_paths import flatten, unflatten

Transform = Callable[[np.ndarray], np.ndarray]
Plan = dict[str, tuple[str, Transform]]


def identity(w: np.ndarray) -> np.ndarray:
    return w


def linear_weight(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear (out, in) -> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(w.T)


def conv3d_weight(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv3d (out, in, t, h, w) -> Flax Conv kernel (t, h, w, in, out)."""
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0))


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: wrong shape, or required parameters absent."""


@dataclasses.dataclass
class ConversionReport:
    loaded: list[str]
    missing: list[str]  # our parameters the checkpoint did not provide
    unexpected: list[str]  # checkpoint keys nothing consumed

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} parameters"]
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        return "\n".join(lines)


def assemble(
    state_dict: Mapping[str, np.ndarray],
    plan: Plan,
    target: Mapping[str, Any],
    *,
    ignore_unexpected: Iterable[str] = (),
    strict: bool = True,
) -> tuple[dict[str, Any], ConversionReport]:
    """Builds our nested params from `state_dict` following `plan`, checked against `target`.

    `target` is our model's (unboxed) parameter tree, or its `jax.eval_shape`; only its shapes are used.
    Raises CheckpointMismatchError naming the first bad key and both shapes, or, when `strict`, naming
    every parameter of ours that the checkpoint does not provide. `ignore_unexpected` lists prefixes
    of source keys that are known not to be parameters of ours (buffers, classification heads).
    """
    flat_target = flatten(target)
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    unknown_dst = [d for d in plan if d not in flat_target]
    if unknown_dst:
        raise CheckpointMismatchError(f"converter plan names parameters our model lacks: {unknown_dst[:5]}")
    for dst, (src, transform) in plan.items():
        if src not in state_dict:
            continue
        raw = np.asarray(state_dict[src])
        value = transform(raw)
        want = tuple(flat_target[dst].shape)
        if tuple(value.shape) != want:
            raise CheckpointMismatchError(
                f"checkpoint key '{src}' has shape {tuple(raw.shape)} but our parameter '{dst}' "
                f"needs {want} (source layout of {want} is the transform's inverse); "
                "is this checkpoint for a different model size?"
            )
        out[dst] = value.astype(flat_target[dst].dtype, copy=False)
        used.add(src)
    missing = [d for d in flat_target if d not in out]
    prefixes = tuple(ignore_unexpected)
    unexpected = [k for k in state_dict if k not in used and not k.startswith(prefixes)]
    report = ConversionReport(loaded=sorted(out), missing=missing, unexpected=unexpected)
    if strict and missing:
        raise CheckpointMismatchError(
            f"checkpoint lacks {len(missing)} parameters of ours, first: {missing[:5]}; "
            f"unused checkpoint keys: {unexpected[:5]}"
        )
    return unflatten(out), report
