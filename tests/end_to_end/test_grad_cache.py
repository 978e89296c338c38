"""Gradient caching (`config.microbatches`): the chunked step equals the whole-batch step of tiny Clover.

Mesh data 4 x model 2, global batch 16 (two of test_clover_train's 8-row batches), dropout off
(`deterministic=True`: tiny Clover's only dropout is h_T's) so k = 1, 2, 4 compute the same function.
Compiles (each one to a few minutes on 2 busy cores): one train step per k (3), a value-and-grad pair
with the reference gradient scale, and, on one device, a pair with dropout on and a retrieval pair.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from clover_jax import grad_cache, optim, partitioning, tasks, train
from clover_jax.run_setup import ConfigError, check_microbatches, load_config_file, setup_run
from test_clover_train import (
    MODEL,
    STEP_RNG_SEED,
    boxed_abstract,
    host_params0,
    initial_state_and_step,
    loss_config,
    make_batch,
    mesh_of,
)

MESH = "data4_model2"
REPLICAS = 4


@pytest.fixture(scope="module", autouse=True)
def partitionable_rng():
    with jax.threefry_partitionable(True):
        yield


@functools.lru_cache(maxsize=None)
def batch16() -> dict[str, np.ndarray]:
    first, second = make_batch(0), make_batch(1)
    return {k: np.concatenate([first[k], second[k]]) for k in first}


class StepResult(NamedTuple):
    metrics: dict[str, np.ndarray]
    params: Any  # host copy after one step


@functools.lru_cache(maxsize=None)
def one_step(microbatches: int, grad_scale: str = "global") -> StepResult:
    """One optimizer step from `host_params0()`; k = 1 goes through the plain `loss_fn` path of the step."""
    mesh = mesh_of(MESH)
    cfg = loss_config(contrastive_grad_scale=grad_scale)
    if microbatches == 1:
        fns = {"loss_fn": tasks.pretrain_loss_fn(MODEL, cfg, REPLICAS, deterministic=True)}
    else:
        objective = tasks.pretrain_objective(MODEL, cfg, REPLICAS, deterministic=True)
        fns = {"loss_fn": None, "value_and_grad_fn": grad_cache.value_and_grad(objective, microbatches)}
    state, step = initial_state_and_step(mesh, **fns)
    state, metrics = step(state, partitioning.shard_batch(batch16(), mesh), jax.random.key(STEP_RNG_SEED))
    return StepResult(jax.device_get(metrics), jax.device_get(state.params))


def _leaves(tree: Any) -> list[tuple[str, np.ndarray]]:
    return [(optim.path_to_str(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _relative_diff(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref|, each over all leaves (a per-tensor ratio would be dominated by tensors
    whose gradient is zero analytically, e.g. attention key biases, and float noise numerically)."""
    diff = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(_leaves(got), _leaves(ref)))
    return diff / max(float(np.max(np.abs(b))) for _, b in _leaves(ref))


def _assert_same_step(got: StepResult, ref: StepResult, label: str) -> None:
    assert set(got.metrics) == set(ref.metrics)
    for key, value in ref.metrics.items():
        np.testing.assert_allclose(got.metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{label}: {key}")
    for (path, new), (_, old) in zip(_leaves(got.params), _leaves(ref.params)):
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6, err_msg=f"{label}: {path}")
    loss_rel = abs(float(got.metrics["loss"]) / float(ref.metrics["loss"]) - 1)
    param_diff = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(_leaves(got.params), _leaves(ref.params)))
    updates = lambda r: jax.tree.map(lambda p, p0: p - p0, r.params, host_params0())  # noqa: E731
    print(f"\n{label}: loss {float(got.metrics['loss']):.6f} vs {float(ref.metrics['loss']):.6f} (rel {loss_rel:.1e}); "
          f"grad_norm rel {abs(got.metrics['grad_norm'] / ref.metrics['grad_norm'] - 1):.1e}; params: max |diff| "
          f"{param_diff:.1e} (relative to max |param| {_relative_diff(got.params, ref.params):.1e}, "
          f"to max |update| {_relative_diff(updates(got), updates(ref)):.1e})")
    assert loss_rel <= 1e-5 and param_diff <= 1e-5


@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatched_step_equals_whole_batch_step(microbatches):
    ref, got = one_step(1), one_step(microbatches)
    assert {"loss", "mlm", "nce_video_anchor", "rank_text_anchor", "acc_t2v", "grad_norm", "lr"} <= set(ref.metrics)
    assert bool(got.metrics["finite"])
    _assert_same_step(got, ref, f"k={microbatches} vs k=1")
    moved = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(_leaves(ref.params), _leaves(host_params0())))
    assert moved > 1e-4  # the step really moved the parameters


def _value_and_grads(mesh_name: str, fns: tuple, batch: dict[str, np.ndarray], seed: int) -> tuple:
    """The outputs of each `fn(params, batch, rng)` of `fns` (value-and-grad functions) on one mesh, one jit."""
    mesh = mesh_of(mesh_name)
    param_sh = partitioning.param_shardings(boxed_abstract("tiny"), mesh)
    rules = partitioning.rules_for_mesh(partitioning.LOGICAL_RULES, mesh)

    def all_fns(params, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return tuple(fn(params, batch, rng) for fn in fns)

    in_shardings = (param_sh, partitioning.batch_sharding(mesh), partitioning.replicated(mesh))
    all_fns = jax.jit(all_fns, in_shardings=in_shardings)
    params = jax.device_put(host_params0(), param_sh)
    return jax.device_get(all_fns(params, partitioning.shard_batch(batch, mesh), jax.random.key(seed)))


def _assert_same_value_and_grad(got: tuple, ref: tuple, label: str) -> None:
    ((loss, metrics), grads), ((ref_loss, ref_metrics), ref_grads) = got, ref
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=f"{label}: {key}")
    worst = _relative_diff(grads, ref_grads)
    print(f"\n{label}: loss {float(loss):.6f} vs {float(ref_loss):.6f}; max |grad diff| / max |grad| {worst:.1e}")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert worst <= 1e-5


def test_reference_grad_scale_is_unchanged_by_microbatching():
    cfg = loss_config(contrastive_grad_scale="reference")
    plain = tasks.pretrain_loss_fn(MODEL, cfg, REPLICAS, deterministic=True)
    cached = grad_cache.value_and_grad(tasks.pretrain_objective(MODEL, cfg, REPLICAS, deterministic=True), 2)
    got, ref = _value_and_grads(MESH, (cached, jax.value_and_grad(plain, has_aux=True)), batch16(), STEP_RNG_SEED)
    _assert_same_value_and_grad(got, ref, "reference scale, k=2 vs k=1")
    # The scale is in effect: the contrastive gradient is divided by the 4 replicas, MLM's is not.
    whole = one_step(1).metrics
    assert float(got[0][0]) == pytest.approx(float(whole["loss"]), rel=1e-6)
    assert float(optax.global_norm(got[1])) < 0.6 * float(whole["grad_norm"])


def test_official_mlm_mean_is_unchanged_by_microbatching():
    """mlm_mean="per_replica" (issue 31, D10): each of 4 official GPUs' mean over its own masked tokens, then
    their average; the per-row weights come from the whole batch, so chunking changes nothing."""
    cfg = loss_config(mlm_mean="per_replica", official_replicas=4)
    plain = tasks.pretrain_loss_fn(MODEL, cfg, REPLICAS, deterministic=True)
    cached = grad_cache.value_and_grad(tasks.pretrain_objective(MODEL, cfg, REPLICAS, deterministic=True), 2)
    batch = dict(batch16())
    labels = batch["mlm_labels"].copy()
    first = np.flatnonzero(labels[0] != -100)
    labels[0, first[: len(first) // 2]] = -100  # group 0 (rows 0-3) now holds fewer masked tokens than the others
    batch["mlm_labels"] = labels
    counts = (labels != -100).reshape(4, -1).sum(axis=1)
    assert len(set(counts.tolist())) > 1
    got, ref = _value_and_grads(MESH, (cached, jax.value_and_grad(plain, has_aux=True)), batch, STEP_RNG_SEED)
    _assert_same_value_and_grad(got, ref, "per-replica MLM mean, k=2 vs k=1")


def test_dropout_recomputation_is_exact():
    """With dropout on, chunk j uses fold_in(rng, j) in both forward passes, so the cached gradient is the
    gradient of the chunked loss (whose dropout masks differ from the whole-batch ones). One device."""
    objective = tasks.pretrain_objective(MODEL, loss_config(), 1)
    deterministic_loss = tasks.pretrain_loss_fn(MODEL, loss_config(), 1, deterministic=True)
    fns = (grad_cache.value_and_grad(objective, 2),
           jax.value_and_grad(grad_cache.chunked_loss_fn(objective, 2), has_aux=True),
           deterministic_loss)
    got, ref, (loss_without_dropout, _) = _value_and_grads("single", fns, make_batch(0), 3)
    _assert_same_value_and_grad(got, ref, "dropout on, k=2 cached vs autodiff of the chunked loss")
    assert abs(float(got[0][0]) - float(loss_without_dropout)) > 1e-4  # dropout is really on


def test_retrieval_microbatched_equals_whole_batch():
    """Symmetric InfoNCE of the dual encoder (tiny Clover has no dropout on that path). One device."""
    objective = tasks.retrieval_objective(MODEL, loss_config(), 1)
    fns = (grad_cache.value_and_grad(objective, 4), grad_cache.value_and_grad(objective, 1))
    got, ref = _value_and_grads("single", fns, make_batch(0), 5)
    _assert_same_value_and_grad(got, ref, "retrieval, k=4 vs k=1")


# ---- errors ------------------------------------------------------------------------------------------


def test_bad_microbatches_fail_with_the_numbers():
    grad_cache.check_microbatches(16, 4, 4)
    with pytest.raises(ValueError, match="microbatches=3 does not divide the global batch size 16"):
        grad_cache.check_microbatches(16, 3, 4)
    with pytest.raises(ValueError, match=r"chunks of 2 rows .* not divisible by the 4 data-parallel replicas"):
        grad_cache.check_microbatches(16, 8, 4)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="must be a positive integer"):
            grad_cache.check_microbatches(16, bad, 4)


def _config(spec: str, **values: Any) -> ml_collections.ConfigDict:
    config = load_config_file(spec)
    for key, value in values.items():
        config[key] = value
    return config


def test_run_config_checks_microbatches():
    mesh = partitioning.make_mesh({"data": 4, "model": 2})
    assert _config("configs/pretrain.py").microbatches == 1
    check_microbatches(_config("configs/pretrain.py", microbatches=4), mesh)  # batch 16 = 4 chunks x 4 replicas
    check_microbatches(_config("configs/finetune_retrieval.py:demo", microbatches=2), mesh)
    with pytest.raises(ConfigError, match="microbatches=3 does not divide the global batch size 16"):
        check_microbatches(_config("configs/pretrain.py", microbatches=3), mesh)
    with pytest.raises(ConfigError, match="not divisible by the 4 data-parallel replicas"):
        check_microbatches(_config("configs/pretrain.py", microbatches=8), mesh)
    with pytest.raises(ConfigError, match="gradient caching supports the tasks.*not 'qa_open_ended'"):
        check_microbatches(_config("configs/qa_synthetic.py:open", microbatches=2), mesh)


def test_train_builds_the_cached_step_for_microbatches():
    config = _config("configs/pretrain.py", microbatches=2, compilation_cache_dir="")
    run = setup_run(config)  # 8 devices on data: batch 16 = 2 chunks x 8 replicas
    assert set(train._gradient_fn(run, config)) == {"loss_fn", "value_and_grad_fn"}
    assert train._gradient_fn(run, config)["loss_fn"] is None
    config.microbatches = 1
    assert set(train._gradient_fn(run, config)) == {"loss_fn"}


def test_chunks_are_strided_rows_and_round_trip():
    x = jnp.arange(16 * 3).reshape(16, 3)
    chunks = grad_cache.to_chunks(x, 4)
    assert chunks.shape == (4, 4, 3)
    np.testing.assert_array_equal(chunks[1, :, 0], x[1::4, 0])
    np.testing.assert_array_equal(grad_cache.from_chunks(chunks), x)
