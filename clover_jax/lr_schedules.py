"""Learning-rate schedules by name: ours (warm-up, then cosine) and the official code's mmcv cosine annealing.

`warmup_then_cosine` (our default, optax's form): a linear warm-up from warmup_init_ratio*lr to exactly lr
over the warm-up steps, then a cosine over the remaining steps to min_lr_ratio*lr.

`mmcv_cosine` reproduces mmcv 1.x `CosineAnnealingLrUpdaterHook` with `warmup='linear'` (the official
configs' `lr_config`, mmcv/runner/hooks/lr_updater.py): the regular lr is
`annealing_cos(lr, min_lr_ratio*lr, progress / max_progress)` = end + 0.5 (start - end)(1 + cos(pi factor)),
with (progress, max_progress) = (iteration, max_iters) when stepped per iteration, and (epoch, max_epochs)
when stepped per epoch (`by_epoch=True`: held within each epoch). The cosine starts at iteration 0; during
the warm-up (always counted in iterations) the lr is regular * (1 - k), k = (1 - iter/warmup_iters)(1 - ratio),
so the warm-up multiplies the already-decaying curve. The official pre-training runner advances its
iteration once per round of both loaders (`steps_per_iter` optimizer steps share one lr).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
SCHEDULES = ("warmup_then_cosine", "mmcv_cosine")


def warmup_then_cosine(lr: float, warmup_steps: int, total_steps: int, warmup_init_ratio: float,
                       min_lr_ratio: float) -> Schedule:
    """Ours: linear warm-up from warmup_init_ratio*lr to lr over warmup_steps, then cosine to min_lr_ratio*lr."""
    return optax.warmup_cosine_decay_schedule(init_value=warmup_init_ratio * lr, peak_value=lr,
                                              warmup_steps=warmup_steps, decay_steps=total_steps,
                                              end_value=min_lr_ratio * lr)


def mmcv_cosine(lr: float, min_lr_ratio: float, warmup_ratio: float, warmup_iters: int, max_iters: int, *,
                by_epoch: bool = False, iters_per_epoch: int = 0, steps_per_iter: int = 1) -> Schedule:
    """mmcv's cosine annealing with linear warm-up, as a function of the optimizer step (see the module doc).

    Lengths are in mmcv iterations; `steps_per_iter` optimizer steps make one iteration. `by_epoch` needs
    `iters_per_epoch`; the cosine then runs over max_iters / iters_per_epoch epochs. The arithmetic follows
    mmcv's order of operations, so under float64 (`jax_enable_x64`) it gives mmcv's numbers bit for bit.
    """
    if max_iters < 1 or steps_per_iter < 1:
        raise ValueError(f"mmcv_cosine needs max_iters >= 1 and steps_per_iter >= 1, got {max_iters}, {steps_per_iter}")
    if by_epoch and iters_per_epoch < 1:
        raise ValueError(f"optim.schedule_by_epoch needs the epoch length in iterations, got {iters_per_epoch}")
    end = lr * min_lr_ratio
    half_span = 0.5 * (lr - end)  # mmcv: end + 0.5 * weight * (start - end) * cos_out, weight 1
    max_progress = max_iters / iters_per_epoch if by_epoch else max_iters

    def schedule(step: jax.Array) -> jax.Array:
        iteration = jnp.asarray(step) // steps_per_iter
        progress = iteration // iters_per_epoch if by_epoch else iteration
        regular = end + half_span * (jnp.cos(math.pi * _divide(progress, max_progress)) + 1)
        if not warmup_iters:
            return regular
        k = (1 - _divide(iteration, warmup_iters)) * (1 - warmup_ratio)
        return jnp.where(iteration < warmup_iters, regular * (1 - k), regular)

    return schedule


def _divide(count: jax.Array, length: float) -> jax.Array:
    """count / length, correctly rounded as Python's. XLA turns a division by a constant into a multiplication
    by its reciprocal (an ulp off); a divisor computed from `count` keeps the true division."""
    count = count.astype(jnp.result_type(float))
    return count / (length + count * 0)
