"""Clip groups of the Swin encoder: how many the execution policy gives by platform and mesh size, the row
split, and the same values and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clover_jax.kernels.execution import MAX_STAGES, policy_for, use
from clover_jax.kernels.ops import join_clip_groups, split_clip_groups
from clover_jax.models.swin3d import SwinTransformer3D, swin3d_config
from clover_jax.partitioning import make_mesh
from clover_jax.run_setup import ConfigError, execution_policy
from configs import pretrain


def test_auto_groups_by_platform_and_device_count():
    cpu_one = policy_for("cpu", 1)
    assert cpu_one.clip_groups == (2,) and cpu_one.stage_clip_groups(0, 16) == 2
    assert cpu_one.stage_clip_groups(1, 16) == 1  # later stages: one group
    assert cpu_one.stage_clip_groups(0, 15) == 1  # an odd batch stays whole
    assert policy_for("cpu", 8).clip_groups == ()  # a sharded batch's shares may not split
    assert policy_for("gpu", 1).clip_groups == () and policy_for("tpu", 1).clip_groups == ()
    assert policy_for("cpu", 1, {"cpu": {"first_stage_clip_groups": 4}}).clip_groups == (4,)
    every = policy_for("tpu", 4, {"clip_groups": 3})
    assert every.clip_groups == (3,) * MAX_STAGES
    assert every.stage_clip_groups(2, 6) == 3 and every.stage_clip_groups(2, 8) == 1
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="kernels.clip_groups must be an int >= 0"):
            policy_for("cpu", 1, {"clip_groups": bad})


def test_split_and_join():
    x = np.arange(12 * 2).reshape(12, 2)
    groups = split_clip_groups(x, 3)
    assert len(groups) == 3
    for g, rows in enumerate(groups):
        np.testing.assert_array_equal(rows, x[g::3])
    np.testing.assert_array_equal(join_clip_groups(groups), x)
    assert split_clip_groups(x, 1)[0] is x and join_clip_groups([x]) is x


def test_config_keys_reach_the_policy():
    config = pretrain.get_config("tiny")
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    assert execution_policy(config, mesh).clip_groups == (2,)  # auto, one CPU device
    config.kernels.clip_groups = 2
    assert execution_policy(config, mesh).clip_groups == (2,) * MAX_STAGES
    config.kernels.clip_groups = -3
    with pytest.raises(ConfigError, match="kernels.clip_groups"):
        execution_policy(config, mesh)
    legacy = pretrain.get_config("tiny")  # a config saved before `kernels`: model.clip_groups / model.attention
    legacy.model.clip_groups, legacy.model.attention = 3, "fused"
    assert execution_policy(legacy, mesh).clip_groups == (3,) * MAX_STAGES
    assert execution_policy(legacy, mesh).window_attention == "fused"


@pytest.mark.parametrize("groups", [2, 0])
def test_groups_give_the_same_features_and_gradients(groups):
    # Two stages (unshifted + shifted blocks, one patch merging); 3 clips x 2 masks = 6 rows. 2: both stages
    # in 2 groups; 0 (auto) on a single CPU device: the first stage in 2 groups, then regrouped to 1.
    model = SwinTransformer3D(swin3d_config("tiny", depths=(2, 2), num_heads=(1, 2)))
    whole, grouped = policy_for("cpu", 1, {"clip_groups": 1}), policy_for("cpu", 1, {"clip_groups": groups})
    rng = np.random.default_rng(0)
    video = rng.standard_normal((3, 4, 32, 32, 3)).astype(np.float32)
    token_mask = np.stack([np.zeros((3, 8, 8)), rng.random((3, 8, 8)) < 0.5], axis=1).astype(np.float32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), video, token_mask)["params"]

    def loss(p):
        out, features = model.apply({"params": p}, video, token_mask, return_features=True)
        return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1]))), (out, features)

    def grad(policy):
        with use(policy):
            return jax.jit(jax.grad(loss, has_aux=True))(params)

    (g_whole, (out_whole, feat_whole)), (g_grouped, (out_grouped, feat_grouped)) = grad(whole), grad(grouped)
    assert out_grouped.shape == out_whole.shape == (6, 2, 4, 4, 64)
    np.testing.assert_allclose(out_grouped, out_whole, rtol=0, atol=1e-5)
    assert len(feat_grouped) == len(feat_whole) == 4
    for a, b in zip(feat_whole, feat_grouped):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_grouped)):  # f32 reassociation only
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * (1 + np.abs(a).max()))
