"""LayerNorm over the last axis with a hand-written VJP and row sums as matrix-vector products (the CPU kernel).

The same function (statistics and output in float32) as `nn.LayerNorm(dtype=float32)`. Two things differ,
both for XLA:CPU:

- On CPU the per-row sums over C are matrix-vector products with a ones vector. XLA:CPU hands reductions
  to YNNPACK (`xla_cpu_flags.py`), which cannot take a broadcast inside its fusion, so the broadcast row
  statistics and the (C,) scale of autodiff's LayerNorm backward were each written out as a full
  activation-sized tensor first. In the `tiny` Swin's first stage (16 clips, 8x224²) that was about a
  dozen 26 MB tensors per block.
- The backward is the closed form gx = r (g - mean(g) - x̂ mean(g x̂)) with g = dy * scale; it recomputes
  x̂ from x and the two (rows, 1) statistics instead of storing it.

`by_matmul=False` sums with `jnp.sum` (tests compare both).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
SCOPE = "cpu_matvec_layer_norm"  # name scope of this kernel's ops (tests look for it)


def _row_sum(x: Array, by_matmul: bool) -> Array:
    """Sum over the last axis, kept as a trailing axis of 1."""
    if by_matmul:
        return (x @ jnp.ones((x.shape[-1],), x.dtype))[..., None]
    return jnp.sum(x, axis=-1, keepdims=True)


def _column_sum(x: Array) -> Array:
    """Sum over every axis but the last."""
    return jnp.sum(x.reshape(-1, x.shape[-1]), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_fn(x: Array, scale: Array, bias: Array, eps: float, by_matmul: bool) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, all float32."""
    return _forward(x, scale, bias, eps, by_matmul)[0]


def _forward(x, scale, bias, eps, by_matmul):
    with jax.named_scope(SCOPE):
        return _forward_ops(x, scale, bias, eps, by_matmul)


def _forward_ops(x, scale, bias, eps, by_matmul):
    c = x.shape[-1]
    mean = _row_sum(x, by_matmul) / c
    centred = x - mean
    rstd = jax.lax.rsqrt(_row_sum(centred * centred, by_matmul) / c + eps)
    return centred * rstd * scale + bias, (x, mean, rstd, scale)


def _backward(eps, by_matmul, residuals, g_out):
    with jax.named_scope(SCOPE):
        return _backward_ops(eps, by_matmul, residuals, g_out)


def _backward_ops(eps, by_matmul, residuals, g_out):
    x, mean, rstd, scale = residuals
    c = x.shape[-1]
    x_hat = (x - mean) * rstd
    g = g_out * scale
    g_x = rstd * (g - _row_sum(g, by_matmul) / c - x_hat * (_row_sum(g * x_hat, by_matmul) / c))
    return g_x, _column_sum(g_out * x_hat), _column_sum(g_out)


layer_norm_fn.defvjp(_forward, _backward)

