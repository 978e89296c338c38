"""Tiny Clover's pre-training step on 8 virtual devices: mesh invariance, global-batch losses, golden specs.

Dropout: the step runs with dropout on (`pretrain_loss_fn` is non-deterministic; tiny Clover's only
dropout is h_T's 0.1) and the same rng on every mesh. That gives the same masks on every mesh because
the threefry RNG is partitionable (jax's default since 0.5; the module fixture pins it on).

Compiles (tens of seconds each on 2 cores): one train step per mesh (3), 3 grad scales at once, one forward.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from clover_jax import losses, optim, partitioning, tasks
from clover_jax import train_step as ts
from clover_jax.models import clover

GOLDEN_SPECS = pathlib.Path(__file__).with_name("golden_partition_specs_clover.json")
REGEN_ENV = "CLOVER_REGEN_GOLDEN"
GOLDEN_MESH = {"data": 2, "fsdp": 2, "model": 2}
GOLDEN_PRESETS = ("tiny", "base")
MODEL_BASE_DEPTHS = clover.clover_config("base").video.depths

GLOBAL_BATCH, TEXT_LEN = 8, 12
MASK_ID, CLS_ID, SEP_ID = 103, 101, 102
MESHES = {
    "single": {"data": 1, "fsdp": 1, "model": 1},
    "data4_model2": {"data": 4, "model": 2},
    "data2_fsdp2_model2": {"data": 2, "fsdp": 2, "model": 2},
}
# Adam's first update is lr * g / (|g| + eps), about lr * sign(g): with the paper's eps=1e-8 an entry whose
# true gradient is below float32 summation noise (~1e-6 here) may flip sign on another mesh (a 2*lr jump).
# That is the optimizer amplifying rounding, not a sharding bug; eps=lr makes the first update 1-Lipschitz
# in the gradient, so the <= 1e-5 parameter check measures the sharded gradients through the real chain.
OPTIM = dict(lr=1e-3, eps=1e-3, warmup_steps=0, grad_clip=15.0)
TOTAL_STEPS = 20
STEP_RNG_SEED = 7
MODEL = clover.clover_config("tiny")
TERM_WEIGHTS_NO_MLM = {name: (0.0 if name == "mlm" else 1.0) for name in losses.TERM_NAMES}


@pytest.fixture(scope="module", autouse=True)
def partitionable_rng():
    """Same dropout masks on every mesh: the threefry bits must not depend on how arrays are split."""
    with jax.threefry_partitionable(True):
        yield


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Random video, fixed-block video masks, padded texts with two masked positions per row."""
    rng = np.random.default_rng(seed)
    hp, wp = MODEL.token_grid
    video = rng.normal(size=(GLOBAL_BATCH, MODEL.num_frames, MODEL.image_size, MODEL.image_size, 3))
    video_mask = np.zeros((GLOBAL_BATCH, hp, wp), np.float32)
    for i in range(GLOBAL_BATCH):
        top, left = 2 * (i % 4), 4 * (i // 4)
        video_mask[i, top : top + 6, left : left + 8] = 1.0
    lengths = TEXT_LEN - 2 * (np.arange(GLOBAL_BATCH) % 3)  # 12, 10, 8, 12, ...
    text_mask = (np.arange(TEXT_LEN)[None, :] < lengths[:, None]).astype(np.int32)
    text_ids = rng.integers(1000, 30000, size=(GLOBAL_BATCH, TEXT_LEN)).astype(np.int32)
    text_ids[:, 0] = CLS_ID
    text_ids[np.arange(GLOBAL_BATCH), lengths - 1] = SEP_ID
    text_ids *= text_mask
    masked_positions = np.zeros((GLOBAL_BATCH, TEXT_LEN), bool)
    masked_positions[:, [2, 5]] = True
    text_ids_masked = np.where(masked_positions, MASK_ID, text_ids).astype(np.int32)
    mlm_labels = np.where(masked_positions, text_ids, -100).astype(np.int32)
    return dict(
        video=video.astype(np.float32), video_mask=video_mask, text_ids=text_ids,
        text_ids_masked=text_ids_masked, text_mask=text_mask, mlm_labels=mlm_labels,
    )


@functools.lru_cache(maxsize=None)
def boxed_abstract(preset: str) -> Any:
    """Boxed parameter shapes (with logical axes) of a preset; nothing is allocated."""
    config = clover.clover_config(preset)
    return jax.eval_shape(lambda: clover.init_params(config, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def host_params0() -> Any:
    """One initialisation, on the host, shared by every mesh (so the meshes start from identical params)."""
    init = jax.jit(lambda rng: nn.unbox(clover.init_params(MODEL, rng)))
    return jax.device_get(init(jax.random.key(0)))


def mesh_of(name: str) -> jax.sharding.Mesh:
    axes = MESHES[name]
    return partitioning.make_mesh(axes, jax.devices()[: math.prod(axes.values())])


def loss_config(**overrides: Any):
    cfg = losses.default_loss_config()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


class StepResult(NamedTuple):
    metrics: dict[str, np.ndarray]
    params: Any  # host copy after one step
    live_state: ts.TrainState  # device state after one step (donated by whoever steps it next)
    step: Any
    batch: Any  # the batch on this mesh


@functools.lru_cache(maxsize=None)
def initial_state_and_step(mesh: jax.sharding.Mesh, **step_fns: Any) -> tuple[ts.TrainState, Any]:
    """The train state from `host_params0()` on `mesh` and a train step built from `step_fns` (the
    `loss_fn` / `value_and_grad_fn` keywords of `make_train_step`)."""
    param_sh = partitioning.param_shardings(boxed_abstract("tiny"), mesh)
    params = jax.device_put(host_params0(), param_sh)
    tx, schedule = optim.make_optimizer(OPTIM, TOTAL_STEPS)
    state_sh = ts.train_state_shardings(tx, params, param_sh, mesh)
    state = ts.create_train_state(params, tx, state_sh)
    step = ts.make_train_step(tx=tx, state_shardings=state_sh, batch_sharding=partitioning.batch_sharding(mesh),
                              mesh=mesh, schedule=schedule, **step_fns)
    return state, step


def one_step(mesh_name: str) -> StepResult:
    mesh = mesh_of(mesh_name)
    loss_fn = tasks.pretrain_loss_fn(MODEL, loss_config(), partitioning.num_data_replicas(mesh))
    state, step = initial_state_and_step(mesh, loss_fn=loss_fn)
    batch = partitioning.shard_batch(make_batch(), mesh)
    state, metrics = step(state, batch, jax.random.key(STEP_RNG_SEED))
    return StepResult(jax.device_get(metrics), jax.device_get(state.params), state, step, batch)


def _flat_leaves(shardings: Any) -> list[tuple[str, Any]]:
    flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return [(optim.path_to_str(p), s) for p, s in flat]


def _shapes(preset: str) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed_abstract(preset)))[0]
    return {optim.path_to_str(p): tuple(x.shape) for p, x in flat}


def _flat(tree: Any) -> list[tuple[str, np.ndarray]]:
    return [(optim.path_to_str(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ---- 1. mesh invariance and the global batch -------------------------------------------------------


@pytest.mark.parametrize("mesh_name", ["data4_model2", "data2_fsdp2_model2"])
def test_one_step_matches_single_device(mesh_name):
    ref, got = one_step("single"), one_step(mesh_name)
    for key in ("loss", "mlm", "nce_video_anchor", "nce_text_anchor", "grad_norm", "param_norm"):
        np.testing.assert_allclose(got.metrics[key], ref.metrics[key], rtol=1e-5, err_msg=key)
    worst = max((float(np.max(np.abs(a - b))), path) for (path, a), (_, b) in zip(_flat(got.params), _flat(ref.params)))
    print(f"\n{mesh_name}: loss {float(got.metrics['loss']):.6f} vs 1 device {float(ref.metrics['loss']):.6f}; "
          f"grad_norm {float(got.metrics['grad_norm']):.4f} vs {float(ref.metrics['grad_norm']):.4f}; "
          f"max |param diff| after one step {worst[0]:.2e} at {worst[1]}")
    assert worst[0] <= 1e-5, worst
    # The parameters really are split on this mesh (vocab x embed over model x fsdp where present).
    words = got.live_state.params["text_encoder"]["embeddings"]["word_embeddings"]["embedding"]
    assert not words.sharding.is_fully_replicated
    assert words.sharding.spec == P("model", "fsdp" if "fsdp" in MESHES[mesh_name] else None)
    # The step really moved the parameters (else equality would prove nothing).
    moved = max(float(np.max(np.abs(a - b))) for (_, a), (_, b) in zip(_flat(ref.params), _flat(host_params0())))
    assert moved > 1e-4


@functools.lru_cache(maxsize=None)
def local_shard_losses(num_shards: int) -> list[float]:
    """The loss of each data shard's rows on their own (what a per-device loss without gathering gives)."""
    loss_fn = jax.jit(tasks.pretrain_loss_fn(MODEL, loss_config(), 1))
    batch, rows = make_batch(), GLOBAL_BATCH // num_shards
    rng = jax.random.fold_in(jax.random.key(STEP_RNG_SEED), 0)  # the step folds its rng with step 0
    return [float(loss_fn(host_params0(), {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}, rng)[0])
            for i in range(num_shards)]


def test_global_loss_uses_the_global_batch():
    """On data=4 the step's loss is the 8-row loss (similarities over all 8 clips), not a 2-row shard's."""
    global_loss = float(one_step("data4_model2").metrics["loss"])
    local = local_shard_losses(4)
    print(f"\nglobal loss {global_loss:.4f}; per-shard local losses {[round(x, 4) for x in local]}")
    np.testing.assert_allclose(global_loss, float(one_step("single").metrics["loss"]), rtol=1e-5)
    assert all(abs(x - global_loss) > 0.5 for x in local)
    assert abs(np.mean(local) - global_loss) > 0.5


# ---- 3. the reference's contrastive gradient scale -------------------------------------------------


def test_reference_and_official_grad_scales_on_data4():
    """On data=4: "reference" divides the contrastive gradient by our 4 replicas, "official" by the official
    run's 32 GPUs (`loss.official_replicas`), whatever our replica count; the loss value never changes."""
    mesh = mesh_of("data4_model2")
    replicas = partitioning.num_data_replicas(mesh)
    assert replicas == 4
    no_mlm = dict(TERM_WEIGHTS_NO_MLM)
    scales = {"global": 1, "reference": replicas, "official": losses.default_loss_config().official_replicas}
    assert scales["official"] == 32
    fns = [tasks.pretrain_loss_fn(MODEL, loss_config(loss_weights=no_mlm, contrastive_grad_scale=name), replicas)
           for name in scales]
    param_sh = partitioning.param_shardings(boxed_abstract("tiny"), mesh)
    rules = partitioning.rules_for_mesh(partitioning.LOGICAL_RULES, mesh)

    def all_scales(params, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return tuple(jax.value_and_grad(fn, has_aux=True)(params, batch, rng) for fn in fns)

    all_scales = jax.jit(all_scales, in_shardings=(param_sh, partitioning.batch_sharding(mesh),
                                                   partitioning.replicated(mesh)))
    params = jax.device_put(host_params0(), param_sh)
    results = jax.device_get(all_scales(params, partitioning.shard_batch(make_batch(), mesh), jax.random.key(3)))
    (loss_g, _), grads_g = results[0]
    for (name, divisor), ((loss_s, _), grads_s) in zip(list(scales.items())[1:], results[1:]):
        assert float(loss_s) == float(loss_g)  # same value, only the gradient is scaled
        worst_rel = 0.0
        for (path, g), (_, r) in zip(_flat(grads_g), _flat(grads_s)):
            np.testing.assert_allclose(r * divisor, g, rtol=1e-6, atol=1e-12, err_msg=f"{name}: {path}")
            scale = np.max(np.abs(g))
            if scale > 0:
                worst_rel = max(worst_rel, float(np.max(np.abs(r * divisor - g)) / scale))
        print(f"\n{name} grads x{divisor} vs global: worst relative diff {worst_rel:.1e}")
    assert all(np.all(np.isfinite(g)) for _, g in _flat(grads_g))
    assert max(float(np.max(np.abs(g))) for _, g in _flat(grads_g)) > 1e-3


# ---- 4. descent ------------------------------------------------------------------------------------


def test_ten_steps_lower_the_loss():
    result = one_step("single")
    state, history = result.live_state, [float(result.metrics["loss"])]
    for _ in range(9):
        state, metrics = result.step(state, result.batch, jax.random.key(STEP_RNG_SEED))
        history.append(float(metrics["loss"]))
    print(f"\ntotal loss over 10 steps on one batch: first {history[0]:.4f}, last {history[-1]:.4f}; "
          f"{[round(x, 3) for x in history]}")
    assert int(state.step) == 10
    assert all(np.isfinite(history))
    # lr 1e-3 overshoots once (step 2) on this 50-nat loss, then descends steadily.
    assert history[-1] < 0.9 * history[0] and history[-1] == min(history), history


# ---- 2. golden partition specs ----------------------------------------------------------------------


def spec_tables() -> dict[str, dict[str, str]]:
    mesh = partitioning.make_mesh(GOLDEN_MESH)
    return {preset: partitioning.partition_spec_table(boxed_abstract(preset), mesh) for preset in GOLDEN_PRESETS}


def _describe_diff(golden: dict[str, str], table: dict[str, str], limit: int = 12) -> str:
    lines = [f"  changed {k}: golden {golden[k]} -> now {table[k]}" for k in sorted(golden.keys() & table.keys())
             if golden[k] != table[k]]
    lines += [f"  new     {k}: {table[k]}" for k in sorted(table.keys() - golden.keys())]
    lines += [f"  gone    {k}: was {golden[k]}" for k in sorted(golden.keys() - table.keys())]
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def test_partition_specs_match_golden_json():
    tables = spec_tables()
    if os.environ.get(REGEN_ENV) == "1":
        GOLDEN_SPECS.write_text(json.dumps({"mesh": GOLDEN_MESH, "presets": tables}, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN_SPECS.read_text())
    assert golden["mesh"] == GOLDEN_MESH
    for preset in GOLDEN_PRESETS:
        if tables[preset] != golden["presets"][preset]:
            pytest.fail(
                f"Clover '{preset}' partition specs on mesh {GOLDEN_MESH} differ from {GOLDEN_SPECS.name}:\n"
                f"{_describe_diff(golden['presets'][preset], tables[preset])}\n"
                f"If the change is intended (a renamed/added parameter or a new sharding rule), regenerate with\n"
                f"  {REGEN_ENV}=1 .venv/bin/python -m pytest tests/test_clover_train.py -k golden\n"
                f"and review the JSON diff before committing."
            )


def test_golden_specs_are_sane_for_base():
    """Big matrices are sharded; only small tensors (tables, position rows, conv taps) stay replicated."""
    mesh = partitioning.make_mesh(GOLDEN_MESH)
    shardings = partitioning.param_shardings(boxed_abstract("base"), mesh)
    specs = {path: s.spec for path, s in _flat_leaves(shardings)}
    shapes = _shapes("base")
    assert specs.keys() == shapes.keys()
    for path, spec in specs.items():
        if math.prod(shapes[path]) >= 2**18 and len(shapes[path]) >= 2:
            assert any(axis is not None for axis in spec), (path, shapes[path], spec)
    assert specs["text_encoder/embeddings/word_embeddings/embedding"] == P("model", "fsdp")
    assert specs["mlm_head/decoder/kernel"] == P("fsdp", "model")
    assert specs["text_encoder/encoder/layer_0/intermediate/dense/kernel"] == P("fsdp", "model")
    tables = [p for p in specs if p.endswith("relative_position_bias_table")]
    assert len(tables) == sum(MODEL_BASE_DEPTHS) and all(specs[p] == P(None, None) for p in tables)


# ---- 5. errors ---------------------------------------------------------------------------------------


def test_batch_not_divisible_by_data_axes_names_both_numbers():
    mesh = mesh_of("data2_fsdp2_model2")
    with pytest.raises(ValueError, match=r"global batch size 6 is not divisible by 4.*'data': 2, 'fsdp': 2"):
        partitioning.check_global_batch(6, mesh)
    partitioning.check_global_batch(8, mesh)


def test_vocab_not_divisible_by_model_axis_names_the_param():
    mesh = partitioning.make_mesh({"model": 8})
    vocab = MODEL.text.vocab_size
    assert vocab % 8
    with pytest.raises(ValueError) as err:
        partitioning.param_shardings(boxed_abstract("tiny"), mesh)
    message = str(err.value)
    named = re.match(r"parameter (\S+): dimension (\d) has size (\d+)", message)
    assert named, message
    vocab_params = {path for path, shape in _shapes("tiny").items() if vocab in shape}
    assert named.group(1) in vocab_params and int(named.group(3)) == vocab, message
    assert "mesh axis model of size 8" in message
