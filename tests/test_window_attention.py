"""Window-attention implementations: each equals the plain einsum reference in values and gradients,
alone and inside a Swin3D stage; the multi-mask patch embedding equals separate masked passes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clover_jax.models import window_attention as wa
from clover_jax.models.swin3d import SwinTransformer3D, shift_attention_mask, swin3d_config
from tests.test_swin3d import random_params

VARIANTS = [name for name in wa.ATTENTION_IMPLEMENTATIONS if name != "einsum"]


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    b, nw, h, n, d = 2, 8, 2, 98, 16
    q, k, v, g = (jnp.asarray(rng.standard_normal((b, nw, h, n, d)), jnp.float32) for _ in range(4))
    bias = jnp.asarray(rng.standard_normal((h, n, n)), jnp.float32)
    mask = shift_attention_mask((4, 14, 14), (2, 7, 7), (1, 3, 3))  # 8 windows of 98 tokens, 4 regions
    return q, k, v, g, bias, mask


def _value_and_grads(name, q, k, v, g, bias, mask):
    loss = lambda q, k, v, bias: jnp.sum(wa.window_attention(q, k, v, bias, mask, implementation=name) * g)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_equals_reference(inputs, name, with_mask):
    q, k, v, g, bias, mask = inputs
    mask = mask if with_mask else None
    ref_value, ref_grads = _value_and_grads("einsum", q, k, v, g, bias, mask)
    value, grads = _value_and_grads(name, q, k, v, g, bias, mask)
    errors = [_rel_err(value, ref_value)] + [_rel_err(a, r) for a, r in zip(grads, ref_grads)]
    print(f"\n{name} mask={with_mask}: relative errors value,dq,dk,dv,dbias = {['%.1e' % e for e in errors]}")
    assert max(errors) < 1e-5, errors
    assert float(jnp.abs(ref_grads[3]).max()) > 0  # the bias gradient is really exercised


def test_resolve_attention():
    assert wa.resolve_attention("auto", "cpu") == wa.DEFAULT_BY_BACKEND["cpu"]
    assert wa.resolve_attention("auto", "gpu") == "dot_product"
    assert wa.resolve_attention("per_clip") == "per_clip"
    with pytest.raises(ValueError, match="model.attention='flash'.*'einsum'"):
        wa.resolve_attention("flash")
    with pytest.raises(ValueError, match="model.attention"):
        swin3d_config("tiny", attention="flash")


def test_swin_stage_variants_match_reference():
    """One stage (unshifted + shifted block, window shrunk in time) with every implementation: outputs
    and parameter gradients equal the einsum reference (relative-position table included)."""
    rng = np.random.default_rng(1)
    video = jnp.asarray(rng.standard_normal((2, 4, 32, 32, 3)), jnp.float32)
    readout = jnp.asarray(rng.standard_normal(64), jnp.float32)
    results = {}
    for name in wa.ATTENTION_IMPLEMENTATIONS:
        config = swin3d_config("tiny", depths=(2, 2), num_heads=(1, 2), attention=name)
        params = random_params(config, seed=0)
        model = SwinTransformer3D(config)
        loss = lambda p: jnp.sum(model.apply({"params": p}, video) @ readout)  # noqa: E731
        results[name] = jax.jit(jax.value_and_grad(loss))(params)
    ref_value, ref_grads = results.pop("einsum")
    for name, (value, grads) in results.items():
        errors = jax.tree.map(_rel_err, grads, ref_grads)
        worst = max(jax.tree.leaves(errors))
        print(f"\n{name}: loss rel err {_rel_err(value, ref_value):.1e}, worst param-gradient rel err {worst:.1e}")
        assert _rel_err(value, ref_value) < 1e-5
        assert worst < 1e-4, errors


def test_multi_mask_equals_separate_passes():
    """A (B, K, Hp, Wp) mask gives row b*K + j = clip b under mask j, from one patch embedding."""
    config = swin3d_config("tiny", depths=(2,), num_heads=(1,))
    params = random_params(config, seed=2)
    model = SwinTransformer3D(config)
    rng = np.random.default_rng(3)
    video = jnp.asarray(rng.standard_normal((2, 4, 32, 32, 3)), jnp.float32)
    masks = jnp.asarray(rng.random((2, 2, 8, 8)) < 0.4, jnp.float32)
    forward = jax.jit(lambda v, m: model.apply({"params": params}, v, m))
    both = np.asarray(forward(video, masks))
    assert both.shape[0] == 4
    for j in range(2):
        np.testing.assert_allclose(both[j::2], np.asarray(forward(video, masks[:, j])), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, K, Hp, Wp\)"):
        model.apply({"params": params}, video, masks[:, :, :4])
