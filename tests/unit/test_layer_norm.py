"""The CPU LayerNorm kernel (`kernels/cpu/layer_norm.py`), the math (`models/layer_norm.py`) and `layers.LayerNorm`:
nn.LayerNorm's parameters, values and gradients, both row sums."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clover_jax.kernels.cpu.layer_norm import layer_norm_fn
from clover_jax.models.layer_norm import layer_norm
from clover_jax.models.layers import LayerNorm


def _inputs(shape=(3, 5, 7, 32), seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 3.0 + 1.5, jnp.float32)  # off-centre, wide rows
    scale = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x, scale, bias, g


def _flax(x, scale, bias, eps):
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False).apply({"params": {"scale": scale, "bias": bias}}, x)


IMPLEMENTATIONS = {"cpu_matvec_sums": lambda x, s, b, eps: layer_norm_fn(x, s, b, eps, True),
                   "cpu_jnp_sums": lambda x, s, b, eps: layer_norm_fn(x, s, b, eps, False),
                   "math": layer_norm}


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_value_and_gradients_equal_flax(name, eps):
    x, scale, bias, g = _inputs()
    out, vjp = jax.vjp(lambda *a: IMPLEMENTATIONS[name](*a, eps), x, scale, bias)
    ref_out, ref_vjp = jax.vjp(lambda *a: _flax(*a, eps), x, scale, bias)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(vjp(g), ref_vjp(g), ("x", "scale", "bias")):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))), err_msg=name)


def test_gradient_matches_finite_differences():
    x, scale, bias, g = _inputs((2, 3, 16), seed=1)
    x64 = np.asarray(x, np.float64)

    def f64(xv):  # float64 reference of sum(g * LN(x))
        mu = xv.mean(-1, keepdims=True)
        var = ((xv - mu) ** 2).mean(-1, keepdims=True)
        return float(np.sum(np.asarray(g, np.float64) * ((xv - mu) / np.sqrt(var + 1e-5) * np.asarray(scale)
                                                         + np.asarray(bias))))

    grad = jax.grad(lambda xv: jnp.sum(g * layer_norm_fn(xv, scale, bias, 1e-5, True)))(x)
    for idx in [(0, 0, 0), (1, 2, 15), (0, 1, 7)]:
        step = np.zeros_like(x64)
        step[idx] = 1e-4
        numeric = (f64(x64 + step) - f64(x64 - step)) / 2e-4
        assert abs(float(grad[idx]) - numeric) < 1e-3 * max(1.0, abs(numeric)), (idx, float(grad[idx]), numeric)


def test_module_has_flax_parameters_and_float32_output():
    x, *_ = _inputs((2, 4, 8))
    module = LayerNorm(epsilon=1e-5, axis="embed")
    params = nn.unbox(module.init(jax.random.key(0), x))["params"]
    ref = nn.LayerNorm(epsilon=1e-5).init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref) == {"scale": (8,), "bias": (8,)}
    np.testing.assert_array_equal(params["scale"], 1.0)
    np.testing.assert_array_equal(params["bias"], 0.0)
    boxed = module.init(jax.random.key(0), x)["params"]["scale"]
    assert boxed.names == ("embed",)
    out = module.apply({"params": params}, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, _flax(x.astype(jnp.bfloat16).astype(jnp.float32), params["scale"],
                                          params["bias"], 1e-5), rtol=1e-5, atol=1e-5)


def test_constant_rows_normalise_to_bias():
    """A row with zero variance maps to `bias` (rsqrt(eps) * 0), with finite gradients."""
    x = jnp.full((4, 16), 3.25, jnp.float32)
    scale, bias = jnp.full((16,), 2.0), jnp.linspace(-1, 1, 16)
    out, vjp = jax.vjp(lambda *a: layer_norm_fn(*a, 1e-5, True), x, scale, bias)
    np.testing.assert_allclose(out, jnp.broadcast_to(bias, (4, 16)), atol=1e-6)
    assert all(bool(jnp.all(jnp.isfinite(t))) for t in vjp(jnp.ones_like(x)))
