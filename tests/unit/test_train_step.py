"""The sharded train step on a toy two-tower model: mesh-invariance, gather, decay mask, finite flag, descent."""
from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clover_jax import losses, optim, partitioning, weight_decay
from clover_jax import train_step as ts
from clover_jax.models import layers
from clover_jax.param_paths import path_to_str

GLOBAL_BATCH, FEATURES, TEXT_LEN, VOCAB = 8, 8, 6, 32
MESHES = {
    "single": {"data": 1, "fsdp": 1, "model": 1},
    "data4_model2": {"data": 4, "model": 2},
    "data2_fsdp2_model2": {"data": 2, "fsdp": 2, "model": 2},
}


class ToyTwoTower(nn.Module):
    """Video features (B, F) and token ids (B, L) -> two (B, 8) embeddings, every param logically named."""

    @nn.compact
    def __call__(self, video, video_mask, text_ids):
        mask_token = layers.param_with_axes(self, "mask_token", nn.initializers.normal(1.0), (FEATURES,),
                                            ("embed",), jnp.float32)
        v = video * (1.0 - video_mask[:, None]) + mask_token * video_mask[:, None]
        v = nn.with_logical_constraint(v, ("batch", "embed"))
        v = layers.gelu(layers.dense(16, ("embed", "mlp"), name="video_fc1")(v))
        v = layers.dense(8, ("mlp", "embed"), name="video_fc2")(v)
        v = layers.layer_norm(name="video_norm")(v)

        words = layers.param_with_axes(self, "word_embeddings", layers.NORMAL_02, (VOCAB, 8), ("vocab", "embed"),
                                       jnp.float32)
        pos = layers.param_with_axes(self, "position_embeddings", layers.NORMAL_02, (TEXT_LEN, 8), (None, "embed"),
                                     jnp.float32)
        t = words[text_ids] * 20.0 + pos[None]
        t = nn.with_logical_constraint(t, ("batch", None, "embed"))
        t = layers.dense(8, ("embed", "heads"), name="text_attn")(t).mean(axis=1)
        t = layers.dense(8, ("heads", "embed"), name="text_proj")(jnp.tanh(t))
        return v, t


def toy_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "video": rng.normal(size=(GLOBAL_BATCH, FEATURES)).astype(np.float32),
        "video_mask": (rng.uniform(size=GLOBAL_BATCH) < 0.3).astype(np.float32),
        "text_ids": rng.integers(0, VOCAB, size=(GLOBAL_BATCH, TEXT_LEN)).astype(np.int32),
        "loss_factor": np.ones(GLOBAL_BATCH, np.float32),  # set to inf to make the loss non-finite
    }


def toy_init(rng):
    b = toy_batch()
    return ToyTwoTower().init(rng, b["video"], b["video_mask"], b["text_ids"])["params"]


def toy_embeddings(params, batch):
    return ToyTwoTower().apply({"params": params}, batch["video"], batch["video_mask"], batch["text_ids"])


def toy_loss(params, batch, rng):
    v, t = toy_embeddings(params, batch)
    loss = losses.symmetric_infonce(v, t) * batch["loss_factor"][0]
    return loss, {"rng_probe": jax.random.uniform(rng),
                  "cos_pos": jnp.mean(jnp.sum(losses.l2_normalize(v) * losses.l2_normalize(t), -1))}


OPTIM = dict(lr=3e-2, warmup_steps=2, weight_decay=0.1, grad_clip=15.0, lr_multipliers={"text_proj": 2.0})
TOTAL_STEPS = 20


class Setup(NamedTuple):
    mesh: jax.sharding.Mesh
    state0: ts.TrainState
    step: object
    batch_sharding: jax.sharding.NamedSharding
    schedule: object

    def fresh_state(self) -> ts.TrainState:
        return jax.tree.map(jnp.copy, self.state0)

    def put(self, batch):
        return partitioning.shard_batch(batch, self.mesh)


@functools.lru_cache(maxsize=None)
def setup(mesh_name: str) -> Setup:
    axes = MESHES[mesh_name]
    devices = jax.devices()[: int(np.prod(list(axes.values())))]
    mesh = partitioning.make_mesh(axes, devices)
    params, param_sh = partitioning.create_sharded(toy_init, mesh, partitioning.LOGICAL_RULES, jax.random.key(0))
    tx, schedule = optim.make_optimizer(OPTIM, TOTAL_STEPS)
    state_sh = ts.train_state_shardings(tx, params, param_sh, mesh)
    state0 = ts.create_train_state(params, tx, state_sh)
    batch_sh = partitioning.batch_sharding(mesh)
    step = ts.make_train_step(toy_loss, tx, state_shardings=state_sh, batch_sharding=batch_sh, mesh=mesh,
                              schedule=schedule)
    return Setup(mesh, state0, step, batch_sh, schedule)


@functools.lru_cache(maxsize=None)
def one_step(mesh_name: str):
    s = setup(mesh_name)
    state, metrics = s.step(s.fresh_state(), s.put(toy_batch()), jax.random.key(7))
    return jax.device_get(state), jax.device_get(metrics), state


@pytest.mark.parametrize("mesh_name", ["data4_model2", "data2_fsdp2_model2"])
def test_one_step_matches_single_device(mesh_name):
    ref_state, ref_metrics, _ = one_step("single")
    state, metrics, live_state = one_step(mesh_name)
    assert abs(float(metrics["loss"]) - float(ref_metrics["loss"])) <= 1e-5 * abs(float(ref_metrics["loss"]))
    for key in ("grad_norm", "param_norm", "lr", "cos_pos", "rng_probe"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    flat_ref = jax.tree_util.tree_flatten_with_path(ref_state.params)[0]
    flat = jax.tree.leaves(state.params)
    for (path, ref), got in zip(flat_ref, flat):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert int(state.step) == 1
    # Params stay sharded as the rules say (e.g. vocab x embed on model x fsdp).
    expected = setup(mesh_name).state0.params["word_embeddings"].sharding
    assert live_state.params["word_embeddings"].sharding.is_equivalent_to(expected, 2)
    assert not setup(mesh_name).state0.params["word_embeddings"].sharding.is_fully_replicated


def test_global_loss_is_gathered_not_local():
    """The step's loss is the loss over all 8 rows, not over one data shard's 2 rows."""
    _, metrics, _ = one_step("data4_model2")
    params0 = jax.device_get(setup("single").state0.params)
    batch = toy_batch()
    global_loss = float(toy_loss(params0, batch, jax.random.key(0))[0])
    local_rows = GLOBAL_BATCH // 4
    local_loss = float(toy_loss(params0, {k: v[:local_rows] for k, v in batch.items()}, jax.random.key(0))[0])
    np.testing.assert_allclose(float(metrics["loss"]), global_loss, rtol=1e-5)
    assert abs(local_loss - global_loss) > 0.1


def test_step_metrics():
    _, metrics, _ = one_step("data2_fsdp2_model2")
    assert set(metrics) == {"loss", "rng_probe", "cos_pos", "grad_norm", "param_norm", "lr", "finite"}
    assert bool(metrics["finite"])
    np.testing.assert_allclose(metrics["lr"], OPTIM["lr"] * 1e-3, rtol=1e-5)  # first warm-up step
    expected_probe = jax.random.uniform(jax.random.fold_in(jax.random.key(7), 0))
    np.testing.assert_allclose(metrics["rng_probe"], expected_probe, rtol=1e-6)
    params0 = jax.device_get(setup("single").state0.params)
    grads = jax.grad(lambda p: toy_loss(p, toy_batch(), jax.random.key(0))[0])(params0)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-5)


def test_non_finite_loss_sets_flag():
    s = setup("data4_model2")
    batch = dict(toy_batch(), loss_factor=np.full(GLOBAL_BATCH, np.inf, np.float32))
    _, metrics = s.step(s.fresh_state(), s.put(batch), jax.random.key(0))
    assert not bool(metrics["finite"])
    _, good = s.step(s.fresh_state(), s.put(toy_batch()), jax.random.key(0))
    assert bool(good["finite"])


def test_non_finite_gradient_with_finite_loss_sets_flag():
    """`finite` reads the gradient norm: a NaN gradient under a finite loss (sqrt at 0 times 0) is caught."""
    s = setup("single")
    tx, _ = optim.make_optimizer(OPTIM, TOTAL_STEPS)

    def nan_grad_loss(params, batch, rng):
        loss, aux = toy_loss(params, batch, rng)
        return loss + jnp.sum(jnp.sqrt(jnp.abs(params["text_proj"]["kernel"] * 0.0))), aux

    step = ts.make_train_step(nan_grad_loss, tx, state_shardings=jax.tree.map(lambda x: x.sharding, s.state0),
                              batch_sharding=s.batch_sharding, mesh=s.mesh)
    _, metrics = step(s.fresh_state(), s.put(toy_batch()), jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])


@pytest.mark.parametrize("scale", [0.1, 10.0, np.inf, np.nan])
def test_clip_matches_optax(scale):
    """optim.clip_by_global_norm (one scalar factor) = optax's (a division per element), below and above the
    threshold and for non-finite norms."""
    rng = np.random.default_rng(0)
    tree = {"a": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)))}
    tree = jax.tree.map(lambda x: x * scale, tree)
    ours, _ = optim.clip_by_global_norm(15.0).update(tree, optax.EmptyState())
    ref, _ = optax.clip_by_global_norm(15.0).update(tree, optax.EmptyState())
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)


def test_skip_nonfinite_keeps_params():
    s = setup("single")
    tx, schedule = optim.make_optimizer(OPTIM, TOTAL_STEPS)
    state_sh = jax.tree.map(lambda x: x.sharding, s.state0)
    step = ts.make_train_step(
        toy_loss, tx, state_shardings=state_sh, batch_sharding=s.batch_sharding, mesh=s.mesh, skip_nonfinite=True
    )
    batch = dict(toy_batch(), loss_factor=np.full(GLOBAL_BATCH, np.nan, np.float32))
    state, metrics = step(s.fresh_state(), s.put(batch), jax.random.key(0))
    assert not bool(metrics["finite"]) and "lr" not in metrics
    assert int(state.step) == 1
    for new, old in zip(jax.tree.leaves(state.params), jax.tree.leaves(s.state0.params)):
        np.testing.assert_array_equal(new, old)
    state, metrics = step(state, s.put(toy_batch()), jax.random.key(0))
    assert bool(metrics["finite"])
    assert not np.array_equal(state.params["text_proj"]["kernel"], s.state0.params["text_proj"]["kernel"])


def test_ten_steps_lower_the_loss():
    s = setup("data2_fsdp2_model2")
    state, batch, rng = s.fresh_state(), s.put(toy_batch()), jax.random.key(1)
    history = []
    for _ in range(10):
        state, metrics = s.step(state, batch, rng)
        history.append(float(metrics["loss"]))
    assert int(state.step) == 10
    assert history[-1] < 0.5 * history[0], history
    assert all(np.isfinite(history))


def test_weight_decay_mask_on_toy_params():
    params = jax.device_get(setup("single").state0.params)
    mask = weight_decay.decay_mask(params)
    decayed = sorted(path_to_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m)
    assert decayed == [
        "text_attn/kernel",
        "text_proj/kernel",
        "video_fc1/kernel",
        "video_fc2/kernel",
        "word_embeddings",
    ]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("video_encoder/layers_0/blocks_1/attn/relative_position_bias_table", False),
        ("video_encoder/mask_token", False),
        ("video_encoder/patch_embed/norm/scale", False),
        ("fusion/spatial_pos", False),
        ("fusion/temporal_pos", False),
        ("fusion/token_type_embeddings", False),
        ("text_encoder/embeddings/position_embeddings/embedding", False),
        ("text_encoder/embeddings/LayerNorm/bias", False),
        ("video_proj/ln1/scale", False),
        ("qa_head/fc1/bias", False),
        ("text_encoder/embeddings/word_embeddings/embedding", True),
        ("video_encoder/layers_0/blocks_1/attn/qkv/kernel", True),
        ("video_encoder/patch_embed/proj/kernel", True),
        ("mlm_head/decoder/kernel", True),
    ],
)
def test_decay_predicate_on_clover_paths(path, expected):
    assert weight_decay.decays(path) is expected


def test_schedule_warmup_and_cosine():
    tx, schedule = optim.make_optimizer(dict(lr=1.0, warmup_steps=10), total_steps=100)
    lrs = np.array([float(schedule(i)) for i in range(101)])
    np.testing.assert_allclose(lrs[[0, 10, 100]], [1e-3, 1.0, 1e-3], rtol=1e-4)
    assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) < 0)
    np.testing.assert_allclose(lrs[55], 1e-3 + (1 - 1e-3) * 0.5, rtol=1e-5)  # cosine midpoint
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.make_optimizer(dict(warmup_steps=100), total_steps=100)


def test_lr_multiplier_scales_only_its_subtree():
    params = jax.device_get(setup("single").state0.params)
    grads = jax.tree.map(jnp.ones_like, params)
    plain, _ = optim.make_optimizer(dict(lr=1.0, weight_decay=0.0), total_steps=10)
    scaled, _ = optim.make_optimizer(dict(lr=1.0, weight_decay=0.0, lr_multipliers={"text_proj": 10.0}), total_steps=10)
    up_plain, _ = plain.update(grads, plain.init(params), params)
    up_scaled, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(up_scaled["text_proj"]["kernel"], 10 * up_plain["text_proj"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(up_scaled["text_attn"]["kernel"], up_plain["text_attn"]["kernel"], rtol=1e-6)
    bad, _ = optim.make_optimizer(dict(lr_multipliers={"qa_head": 10.0}), total_steps=10)
    with pytest.raises(ValueError, match="qa_head"):
        bad.init(params)
