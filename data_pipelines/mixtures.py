"""Mixtures of training datasets: one whole batch (one optimizer step) from one source at a time, resumable."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Literal

import numpy as np

from data_pipelines.device_transfer import device_iterator, numpy_batches
from data_pipelines.input_config import InputConfig
from data_pipelines.input_pipeline import make_train_dataset


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One dataset of a mixture: a name for logs, its own input config, its weight (mode "weighted")."""

    name: str
    input: InputConfig
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """Datasets trained in turn, one whole batch (one optimizer step) from one source at a time.

    mode "alternate": step k uses source k % n (the reference's WebVid, CC3M, WebVid, ... order);
    mode "weighted": step k's source is drawn with probabilities ∝ weight from (seed, k).
    """

    sources: tuple[MixtureSource, ...]
    mode: Literal["alternate", "weighted"] = "alternate"
    seed: int = 0

    def __post_init__(self):
        if not self.sources:
            raise ValueError("MixtureConfig.sources is empty")
        if self.mode not in ("alternate", "weighted"):
            raise ValueError(f"MixtureConfig.mode must be 'alternate' or 'weighted', got {self.mode!r}")
        if self.mode == "weighted" and any(s.weight <= 0 for s in self.sources):
            raise ValueError("MixtureConfig weights must all be > 0 in mode 'weighted'")


_SCHEDULE_CHUNK = 4096


def mixture_schedule(mix: MixtureConfig, start: int, stop: int) -> np.ndarray:
    """Source id of every global step in [start, stop) (a pure function of the config)."""
    steps = np.arange(start, stop)
    n = len(mix.sources)
    if mix.mode == "alternate":
        return steps % n
    weights = np.array([s.weight for s in mix.sources], np.float64)
    out = np.empty(len(steps), np.int64)
    for c in range(start // _SCHEDULE_CHUNK, (max(stop, start + 1) - 1) // _SCHEDULE_CHUNK + 1):
        chunk = np.random.default_rng([mix.seed, c]).choice(n, _SCHEDULE_CHUNK, p=weights / weights.sum())
        lo, hi = max(start, c * _SCHEDULE_CHUNK), min(stop, (c + 1) * _SCHEDULE_CHUNK)
        out[lo - start : hi - start] = chunk[lo - c * _SCHEDULE_CHUNK : hi - c * _SCHEDULE_CHUNK]
    return out


def make_mixture_iterator(
    mix: MixtureConfig,
    start_step: int = 0,
    sharding: Any = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yields (source name, batch) per global step from `start_step`; each source resumes at the
    number of batches it gave before `start_step`, so resume stays exact. Batches are numpy unless
    `sharding` is given (then global jax.Arrays)."""
    counts = np.bincount(mixture_schedule(mix, 0, start_step), minlength=len(mix.sources))
    iterators = []
    for source, count in zip(mix.sources, counts):
        ds = make_train_dataset(source.input, int(count), process_index, process_count)
        batches = numpy_batches(ds)
        iterators.append(device_iterator(batches, sharding, source.input.prefetch) if sharding is not None else batches)
    step = start_step
    while True:
        for sid in mixture_schedule(mix, step, step + _SCHEDULE_CHUNK):
            yield mix.sources[sid].name, next(iterators[sid])
        step += _SCHEDULE_CHUNK
