"""Clover's optimizer: AdamW with rule-masked weight decay, global-norm clipping, a named lr schedule.

Reference (clover-reference.md §4): AdamW (0.9, 0.98), eps 1e-8, wd 0.005 with none on norms and biases
(`weight_decay.DECAY_RULES` says which other tensors, per rule set), grad clip 15, cosine to 1e-3 x lr after a
linear warm-up from 1e-3 x lr. `optim.schedule` picks ours (optax's warm-up then cosine) or the official
code's mmcv formula (`lr_schedules`), which the `official` config variants select.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from clover_jax import lr_schedules, weight_decay
from clover_jax.defaults import default_optim_config
from clover_jax.param_paths import path_to_str


def _matching_prefix(path: str, prefixes: Mapping[str, float]) -> str | None:
    """Longest prefix (whole path components) of `path` among `prefixes`."""
    best = None
    for prefix in prefixes:
        p = prefix.strip("/")
        if path == p or path.startswith(p + "/"):
            if best is None or len(p) > len(best.strip("/")):
                best = prefix
    return best


def scale_by_path(multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiplies each update by the factor of its longest matching path prefix (1 when none matches).

    Applied after AdamW this is a per-subtree learning-rate multiplier (decay included, like a PyTorch
    param group's lr). init raises when a prefix matches no parameter, so a typo cannot pass silently.
    """
    multipliers = dict(multipliers)

    def factor(path) -> float:
        prefix = _matching_prefix(path_to_str(path), multipliers)
        return 1.0 if prefix is None else float(multipliers[prefix])

    def init_fn(params):
        paths = [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        if not any(paths):  # a bare array or an empty tree (optax.tree_map_params' placeholder)
            return optax.EmptyState()
        unused = [k for k in multipliers if not any(_matching_prefix(p, {k: 1.0}) for p in paths)]
        if unused:
            raise ValueError(f"lr_multipliers prefixes {unused} match no parameter; paths look like {paths[:3]}")
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        if not multipliers:
            return updates, state
        return jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the updates by min(1, max_norm / global norm), as `optax.clip_by_global_norm` does.

    optax divides every element by the norm; a division is an op XLA will not duplicate into several
    consumers, so on CPU each gradient leaf was written out clipped and read again by both Adam moments (one
    pass per leaf: 42 ms of the `small` step). Multiplying by one scalar factor fuses into the moment updates.
    The norm is `optax.global_norm`, which the train step also logs, so XLA computes it once."""

    def update_fn(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        factor = jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


# Filled in by `run_setup.optim_config` from the data, not set in configs: mmcv_cosine counts in iterations
# of `steps_per_lr_iteration` optimizer steps (the official pre-training: 2, one batch of each source), and
# `lr_iterations_per_epoch` of them make an epoch (0: unknown, as in compile-only paths: one epoch).
_RESOLVED = {"steps_per_lr_iteration": 1, "lr_iterations_per_epoch": 0}


def _get(cfg: Any, name: str) -> Any:
    defaults = {**default_optim_config(), **_RESOLVED}
    if isinstance(cfg, Mapping):
        return cfg.get(name, defaults[name])
    return getattr(cfg, name, defaults[name])


def make_schedule(cfg: Any, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The lr schedule `optim.schedule` names (`lr_schedules.SCHEDULES`) over `total_steps` optimizer steps."""
    lr, warmup = float(_get(cfg, "lr")), int(_get(cfg, "warmup_steps"))
    name, by_epoch = _get(cfg, "schedule"), bool(_get(cfg, "schedule_by_epoch"))
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup < total_steps:
        raise ValueError(f"warmup_steps={warmup} must be in [0, total_steps={total_steps})")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if name not in lr_schedules.SCHEDULES:
        raise ValueError(f"optim.schedule={name!r}; valid: {list(lr_schedules.SCHEDULES)}")
    if by_epoch and name != "mmcv_cosine":
        raise ValueError(f"optim.schedule_by_epoch=True needs optim.schedule='mmcv_cosine', got {name!r}")
    warmup_ratio, min_lr_ratio = float(_get(cfg, "warmup_init_ratio")), float(_get(cfg, "min_lr_ratio"))
    if name == "warmup_then_cosine":
        return lr_schedules.warmup_then_cosine(lr, warmup, total_steps, warmup_ratio, min_lr_ratio)
    per_iter = int(_get(cfg, "steps_per_lr_iteration"))
    max_iters = max(1, total_steps // per_iter)
    per_epoch = int(_get(cfg, "lr_iterations_per_epoch")) or max_iters
    return lr_schedules.mmcv_cosine(lr, min_lr_ratio, warmup_ratio, warmup // per_iter, max_iters,
                                    by_epoch=by_epoch, iters_per_epoch=per_epoch, steps_per_iter=per_iter)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """(clip -> AdamW masked by the `optim.decay_rules` rule set -> per-path lr multipliers, lr schedule).

    `cfg` is a ConfigDict/dict/object with the fields of `default_optim_config()`; missing fields take
    those defaults. The schedule is returned too so the train step can log the learning rate.
    """
    schedule = make_schedule(cfg, total_steps)
    rules = _get(cfg, "decay_rules")
    weight_decay.rule_set(rules)  # a bad name fails here, not inside the first step
    clip = _get(cfg, "grad_clip")
    parts = []
    if clip:
        if clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {clip}")
        parts.append(clip_by_global_norm(float(clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(_get(cfg, "b1")),
            b2=float(_get(cfg, "b2")),
            eps=float(_get(cfg, "eps")),
            weight_decay=float(_get(cfg, "weight_decay")),
            mask=lambda params: weight_decay.decay_mask(params, rules),
        )
    )
    multipliers = dict(_get(cfg, "lr_multipliers") or {})
    if multipliers:
        parts.append(scale_by_path(multipliers))
    return optax.chain(*parts), schedule

