"""Mixtures of training datasets: one whole batch (one optimizer step) from one source at a time, resumable."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Literal

import numpy as np

from data_pipelines.input.device_transfer import device_iterator, numpy_batches
from data_pipelines.input.input_config import InputConfig
from data_pipelines.input.input_pipeline import make_train_dataset


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One dataset of a mixture: a name for logs, its own input config, its weight (mode "weighted")."""

    name: str
    input: InputConfig
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """Datasets trained in turn, one whole batch (one optimizer step) from one source at a time.

    mode "alternate": step k uses source k % n; every source's stream runs on by itself (a source that
      runs out starts its next epoch), so the steps stay 1:1 and no batch is skipped.
    mode "alternate_official": the reference's multi-loader epoch (`official_epoch_draws`), which needs
      `batches_per_epoch` (each source's batches in one pass, in `sources` order).
    mode "weighted": step k's source is drawn with probabilities ∝ weight from (seed, k).
    """

    sources: tuple[MixtureSource, ...]
    mode: Literal["alternate", "alternate_official", "weighted"] = "alternate"
    seed: int = 0
    batches_per_epoch: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.sources:
            raise ValueError("MixtureConfig.sources is empty")
        if self.mode not in MODES:
            raise ValueError(f"MixtureConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "weighted" and any(s.weight <= 0 for s in self.sources):
            raise ValueError("MixtureConfig weights must all be > 0 in mode 'weighted'")
        if self.batches_per_epoch and (len(self.batches_per_epoch) != len(self.sources)
                                       or min(self.batches_per_epoch) < 1):
            raise ValueError(f"MixtureConfig.batches_per_epoch={self.batches_per_epoch} needs one count >= 1 per "
                             f"source ({len(self.sources)})")


MODES = ("alternate", "alternate_official", "weighted")
_SCHEDULE_CHUNK = 4096


@functools.lru_cache(maxsize=8)
def official_epoch_draws(batches_per_epoch: tuple[int, ...]) -> np.ndarray:
    """(steps of one epoch, 2) int64: (source, batch of that source's pass) of every optimizer step of one
    epoch of the reference's multi-loader runner (`MyEpochBasedMultiDatasetRunner.train`).

    Outer iteration i takes one batch from each source in order (`zip_longest`). The first time a source
    has no batch i left, a fresh pass of that source starts and from then on EVERY slot, the longer
    sources' too, takes the next batch of that fresh pass (the longer sources' own batches are dropped),
    until the longest source's pass ends the epoch: n * max(batches_per_epoch) steps. The reference
    stops with StopIteration if the fresh pass runs out too (a source over ~1.5x the shortest); here it
    starts over (batch index modulo the pass length).
    """
    n, longest = len(batches_per_epoch), max(batches_per_epoch)
    out, short, fresh = [], None, 0
    for i in range(longest):
        for j in range(n):
            if short is None and i < batches_per_epoch[j]:
                out.append((j, i))
                continue
            if short is None:
                short = j
            out.append((short, fresh % batches_per_epoch[short]))
            fresh += 1
    return np.asarray(out, np.int64)


def _official_draws(mix: MixtureConfig, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    if not mix.batches_per_epoch:
        raise ValueError("mixture mode 'alternate_official' needs batches_per_epoch (each source's batches per pass)")
    draws = official_epoch_draws(tuple(mix.batches_per_epoch))
    steps = np.arange(start, stop)
    epoch, within = np.divmod(steps, len(draws))
    sources, batch = draws[within, 0], draws[within, 1]
    # Pass e of source j is batches [e * L_j, (e + 1) * L_j) of its own stream; a fresh pass replays them.
    return sources, epoch * np.asarray(mix.batches_per_epoch, np.int64)[sources] + batch


def mixture_draws(mix: MixtureConfig, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(source id, batch index in that source's own stream) of every global step in [start, stop)."""
    if mix.mode == "alternate_official":
        return _official_draws(mix, start, stop)
    sources = mixture_schedule(mix, start, stop)
    before = np.bincount(mixture_schedule(mix, 0, start), minlength=len(mix.sources))
    batch = np.empty_like(sources)
    for j in range(len(mix.sources)):
        mine = sources == j
        batch[mine] = before[j] + np.arange(np.count_nonzero(mine))
    return sources, batch


def mixture_schedule(mix: MixtureConfig, start: int, stop: int) -> np.ndarray:
    """Source id of every global step in [start, stop) (a pure function of the config)."""
    steps = np.arange(start, stop)
    n = len(mix.sources)
    if mix.mode == "alternate":
        return steps % n
    if mix.mode == "alternate_official":
        return _official_draws(mix, start, stop)[0]
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
    """Yields (source name, batch) per global step from `start_step`: the batch `mixture_draws` names, read
    from that source's own stream, so resume stays exact. A source's stream is reopened where a draw does
    not follow its previous one (mode "alternate_official": a fresh pass, dropped batches). Batches are
    numpy unless `sharding` is given (then global jax.Arrays)."""
    iterators: dict[int, Iterator[dict]] = {}
    following: dict[int, int] = {}  # source -> the stream batch its open iterator yields next

    def open_at(sid: int, batch: int) -> Iterator[dict]:
        source = mix.sources[sid]
        batches = numpy_batches(make_train_dataset(source.input, batch, process_index, process_count))
        return device_iterator(batches, sharding, source.input.prefetch) if sharding is not None else batches

    step = start_step
    while True:
        for sid, batch in zip(*mixture_draws(mix, step, step + _SCHEDULE_CHUNK)):
            sid, batch = int(sid), int(batch)
            if following.get(sid) != batch:
                iterators[sid] = open_at(sid, batch)
            following[sid] = batch + 1
            yield mix.sources[sid].name, next(iterators[sid])
        step += _SCHEDULE_CHUNK
