"""Clip groups of the Swin encoder: how many by backend, the row split, and the same values and gradients."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clover_jax.models.clip_groups import (
    AUTO,
    CPU_STAGE_GROUPS,
    join_clip_groups,
    resolve_clip_groups,
    split_clip_groups,
)
from clover_jax.models.swin3d import SwinTransformer3D, swin3d_config
from clover_jax.run import model_config_from
from configs import pretrain


def test_resolve_by_backend_and_batch():
    cpu_auto = resolve_clip_groups(AUTO, 16, 4, backend="cpu", devices=1)
    assert cpu_auto == (CPU_STAGE_GROUPS + (1, 1, 1, 1))[:4] and max(cpu_auto) > 1
    assert resolve_clip_groups(AUTO, 16, 4, backend="cpu", devices=8) == (1,) * 4  # shares may not divide
    assert resolve_clip_groups(AUTO, 16, 4, backend="gpu", devices=1) == (1,) * 4
    assert resolve_clip_groups(AUTO, 15, 4, backend="cpu", devices=1) == (1,) * 4  # an odd batch stays whole
    assert resolve_clip_groups(3, 6, 2) == (3, 3) and resolve_clip_groups(3, 8, 2) == (1, 1)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="clip_groups must be an int >= 0"):
            resolve_clip_groups(bad, 8, 4)
    with pytest.raises(ValueError, match="clip_groups"):
        swin3d_config("tiny", clip_groups=-2)


def test_split_interleaves_rows_and_join_inverts():
    x = jnp.arange(24.0).reshape(6, 2, 2)
    groups = split_clip_groups(x, 3)
    assert len(groups) == 3
    for g, rows in enumerate(groups):
        np.testing.assert_array_equal(rows, x[g::3])
    np.testing.assert_array_equal(join_clip_groups(groups), x)
    assert split_clip_groups(x, 1)[0] is x and join_clip_groups([x]) is x


def test_config_flag_reaches_the_encoder():
    config = pretrain.get_config("tiny")
    assert model_config_from(config).video.clip_groups == AUTO
    config.model.clip_groups = 2
    assert model_config_from(config).video.clip_groups == 2


@pytest.mark.parametrize("groups", [2, AUTO])
def test_groups_give_the_same_features_and_gradients(groups, monkeypatch):
    # Two stages (unshifted + shifted blocks, one patch merging); 3 clips x 2 masks = 6 rows. 2: both stages
    # in 2 groups; AUTO as on a single CPU device: the first stage in 2 groups, then regrouped to 1.
    monkeypatch.setattr("clover_jax.models.clip_groups.CPU_STAGE_GROUPS", (2,))  # the suite runs on 8 devices
    monkeypatch.setattr("clover_jax.models.swin3d.resolve_clip_groups",
                        functools.partial(resolve_clip_groups, backend="cpu", devices=1))
    base = dict(depths=(2, 2), num_heads=(1, 2))
    whole, grouped = SwinTransformer3D(swin3d_config("tiny", clip_groups=1, **base)), SwinTransformer3D(
        swin3d_config("tiny", clip_groups=groups, **base))
    rng = np.random.default_rng(0)
    video = rng.standard_normal((3, 4, 32, 32, 3)).astype(np.float32)
    token_mask = np.stack([np.zeros((3, 8, 8)), rng.random((3, 8, 8)) < 0.5], axis=1).astype(np.float32)
    params = jax.jit(whole.init)(jax.random.PRNGKey(0), video, token_mask)["params"]

    def loss(p, model):
        out, features = model.apply({"params": p}, video, token_mask, return_features=True)
        return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1]))), (out, features)

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (g_whole, (out_whole, feat_whole)), (g_grouped, (out_grouped, feat_grouped)) = (
        grad(params, whole), grad(params, grouped))
    assert out_grouped.shape == out_whole.shape == (6, 2, 4, 4, 64)
    np.testing.assert_allclose(out_grouped, out_whole, rtol=0, atol=1e-5)
    assert len(feat_grouped) == len(feat_whole) == 4
    for a, b in zip(feat_whole, feat_grouped):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_whole), jax.tree.leaves(g_grouped)):  # f32 reassociation only
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * (1 + np.abs(a).max()))
