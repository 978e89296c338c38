"""The jitted, sharded training step: TrainState, its shardings, and `make_train_step`.

One pure step under one `jax.jit` with explicit in/out shardings and the state donated (no pmap).
Losses see global-batch arrays; GSPMD inserts the collectives (jax-anchors §11.1).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from clover_jax import partitioning
from clover_jax.grad_cache import LossFn, ValueAndGradFn

RESERVED_METRICS = ("loss", "grad_norm", "param_norm", "lr", "finite")


@struct.dataclass
class TrainState:
    """Everything that changes across steps. `params` stay float32; compute dtype is the model's business."""

    step: jax.Array
    params: Any
    opt_state: Any


def train_state_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, mesh: Mesh
) -> TrainState:
    """TrainState of shardings: step replicated, params as given, optimizer state following params."""
    return TrainState(
        step=partitioning.replicated(mesh),
        params=param_shardings,
        opt_state=partitioning.opt_state_shardings(tx, abstract_params, param_shardings, mesh),
    )


def create_train_state(params: Any, tx: optax.GradientTransformation, state_shardings: TrainState) -> TrainState:
    """TrainState at step 0 with `tx.init(params)`, placed on `state_shardings` (donates `params`)."""
    init = jax.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
        out_shardings=state_shardings,
        donate_argnums=0,
    )
    return init(params)


def make_train_step(
    loss_fn: LossFn | None,
    tx: optax.GradientTransformation,
    *,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    mesh: Mesh,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    rules: partitioning.Rules = partitioning.LOGICAL_RULES,
    skip_nonfinite: bool = False,
    value_and_grad_fn: ValueAndGradFn | None = None,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Jitted `step(state, batch, rng) -> (state, metrics)`; the input state is donated.

    `loss_fn(params, batch, rng) -> (loss, aux_metrics)` is traced under `mesh` and the logical axis
    `rules` (the run's `config.sharding_rules`), so a `nn.with_logical_constraint` in the loss (gradient
    caching's chunk re-assembly) maps to mesh axes; the models add none. Every leaf of `batch` has the
    global batch as its leading dimension (sharded by `batch_sharding`; `sharding.shard_batch` checks it
    divides by the data replicas, as does jit itself); `rng` is replicated and folded
    with `state.step`. Metrics: loss, every aux entry, grad_norm (before clipping), param_norm (after the
    update), lr (`schedule(step)`; only when `schedule` is given), and `finite` (loss and the gradient norm
    finite: false when any gradient is NaN or inf). With `skip_nonfinite`, a non-finite step leaves params
    and optimizer state unchanged (the step counter still advances).

    `value_and_grad_fn(params, batch, rng) -> ((loss, aux), grads)` replaces
    `jax.value_and_grad(loss_fn, has_aux=True)` when given (e.g. `grad_cache.value_and_grad`, which runs
    the batch in chunks); pass `loss_fn=None` then.
    """
    if (loss_fn is None) == (value_and_grad_fn is None):
        raise ValueError("make_train_step: pass exactly one of loss_fn and value_and_grad_fn")
    if value_and_grad_fn is None:
        value_and_grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    replicated = partitioning.replicated(mesh)
    mesh_rules = partitioning.rules_for_mesh(rules, mesh)

    def step(state: TrainState, batch: Any, rng: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(rng, state.step)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(mesh_rules):
            (loss, aux), grads = value_and_grad_fn(state.params, batch, rng)
        clash = sorted(set(aux) & set(RESERVED_METRICS))
        if clash:
            raise ValueError(f"loss_fn aux metrics {clash} clash with the step's own metrics {RESERVED_METRICS}")
        grad_norm = optax.global_norm(grads)
        # A NaN or inf in any gradient makes the norm non-finite, so this needs no pass of its own over the
        # gradients; a norm that overflows float32 (some |g| > 1e19) counts as non-finite too.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": grad_norm,
            "param_norm": optax.global_norm(params),
            "finite": finite,
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
