"""Which example each process reads when: the epoch-permuted training stream and the padded eval chunks.

Pure numpy, shared by the caption and the QA pipelines. Training walks one infinite global stream of
positions: epoch e is a permutation of the N examples drawn from (seed, e), the epochs are
concatenated, and global batch k is positions [k*B, (k+1)*B), of which process p of P reads the
contiguous slice [k*B + p*B/P, k*B + (p+1)*B/P). Evaluation gives every process a contiguous chunk of
the items, padded to the same number of batches with invalid rows. Everything random about one read of
one example is a pure function of (seed, epoch, example index) (`example_randomness`).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence, TypeVar

import numpy as np

from data_pipelines.input.video_masking import BlockMaskConfig, block_mask_grid

T = TypeVar("T")


def process_layout(batch_size: int, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    """(process_index, process_count, local batch size), defaulting to jax's process layout."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} processes")
    return process_index, process_count, batch_size // process_count


def epoch_permutation(num: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Order of the examples in epoch `epoch` (a pure function of seed and epoch)."""
    if not shuffle:
        return np.arange(num)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num)


def train_positions(step: int, batch_size: int, process_index: int, process_count: int) -> range:
    """Global stream positions that process `process_index` reads for global batch `step`."""
    local = batch_size // process_count
    start = step * batch_size + process_index * local
    return range(start, start + local)


def train_stream(num: int, seed: int, shuffle: bool, batch_size: int, start_step: int, process_index: int,
                 process_count: int, fixed_order: bool = False) -> Iterator[list[tuple[int, int]]]:
    """Per global step from `start_step`, this process's reads as (epoch, example in [0, num)) pairs.
    Starting at step k costs O(1): position k*B maps straight to (epoch, offset). `fixed_order`: every
    epoch walks epoch 0's permutation (the epoch number still varies the per-read randomness)."""
    perms: dict[int, np.ndarray] = {}
    step = start_step
    while True:
        chosen = []
        for pos in train_positions(step, batch_size, process_index, process_count):
            epoch, offset = divmod(pos, num)
            if epoch not in perms:
                perms.clear()  # a local batch spans at most two epochs; keep memory at O(N)
                perms[epoch] = epoch_permutation(num, seed, 0 if fixed_order else epoch, shuffle)
            chosen.append((epoch, int(perms[epoch][offset])))
        yield chosen
        step += 1


def eval_chunk(num_items: int, local_batch: int, process_index: int, process_count: int) -> tuple[range, int]:
    """(this process's contiguous item range, batches every process yields)."""
    per_process = math.ceil(num_items / process_count)
    start = min(num_items, process_index * per_process)
    stop = min(num_items, start + per_process)
    return range(start, stop), max(1, math.ceil(per_process / local_batch))


def padded_rows(rows: Sequence[T], num_rows: int, pad: T) -> Iterator[tuple[T, bool]]:
    """(row, valid) for `rows`, then (pad, False) up to `num_rows` (an eval pass never drops a row)."""
    for n in range(num_rows):
        yield (rows[n], True) if n < len(rows) else (pad, False)


def example_randomness(seed: int, epoch: int, index: int, num_captions: int, mask: BlockMaskConfig,
                       with_mask: bool) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(caption index, mask grid, text seed (2,), augmentation seed (2,)) for one read of one example."""
    rng = np.random.default_rng([seed, epoch, index])
    caption = int(rng.integers(num_captions)) if num_captions > 0 else -1
    seeds = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=(2, 2), dtype=np.int64)
    if with_mask:
        grid = block_mask_grid(rng, mask).astype(np.uint8)
    else:
        grid = np.zeros((mask.grid, mask.grid), np.uint8)
    return caption, grid, seeds[0], seeds[1]
