"""Window attention for accelerators: the same function as `models/window_attention.einsum_attention`.

  "fused"        custom VJP that stores only qkv and the output, recomputes the probabilities in the
                 backward, folds the softmax backward into one pass, sums the bias gradient over windows
                 as a matmul, runs every product over one flattened (B*nW*H) batch dimension and returns
                 the qkv gradient as one tensor in the layout qkv came in. No (N, N) tensor outlives its
                 block, which lowers peak memory (the TPU default).
  "dot_product"  `jax.nn.dot_product_attention` with the bias and mask as one additive bias (cuDNN's fused
                 attention on GPU when its constraints hold, XLA elsewhere; the GPU default).

The helpers of the recomputing backward are shared with the CPU's `chunked` kernel (`cpu/window_attention.py`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from clover_jax.models.window_attention import split_heads

Array = jax.Array


def flat_heads(qkv: Array, scale: float) -> tuple[Array, Array, Array]:
    """(B, nW, N, 3, H, D) -> q (scaled), k, v as (B*nW*H, N, D): one batch dimension per product, which
    XLA's CPU dot emitters run about a quarter faster than three (b, w, h) batch dimensions."""
    b, nw, n, _, h, d = qkv.shape
    return tuple(x.reshape(b * nw * h, n, d) for x in split_heads(qkv, scale))


def _fused_probs(q: Array, k: Array, bias: Array, mask: Array, shape: tuple[int, ...]) -> Array:
    """softmax(q k^T + bias + mask) in float32 as (B*nW*H, N, N); bias and mask are added as one table."""
    b, nw, h, n = shape
    table = bias.astype(jnp.float32)[None] + mask.astype(jnp.float32)[:, None]  # (nW or 1, H, N, N)
    s = jnp.einsum("xqd,xkd->xqk", q, k, preferred_element_type=jnp.float32)
    s = s.reshape(b, table.shape[0], -1, h, n, n) + table[:, None]  # windows grouped by shift-mask row
    return jax.nn.softmax(s, axis=-1).reshape(b * nw * h, n, n)


def _fused_forward(qkv, bias, mask, scale):
    b, nw, n, _, h, d = qkv.shape
    q, k, v = flat_heads(qkv, scale)
    probs = _fused_probs(q, k, bias, mask, (b, nw, h, n))
    out = jnp.einsum("xqk,xkd->xqd", probs.astype(v.dtype), v)
    return jnp.transpose(out.reshape(b, nw, h, n, d), (0, 1, 3, 2, 4))  # (B, nW, N, H, D)


def recomputing_vjp(forward: Callable, backward: Callable, static_argnums: tuple[int, ...] = (3,)) -> Callable:
    """forward(qkv, bias, mask, scale, *static) as a custom VJP (scale and the rest static) whose only
    residuals are qkv, bias, mask and the output; backward(scale, *static, residuals, g_out) recomputes
    whatever else it needs."""
    op = jax.custom_vjp(forward, nondiff_argnums=static_argnums)

    def forward_with_residuals(qkv, bias, mask, *static):
        out = forward(qkv, bias, mask, *static)
        return out, (qkv, bias, mask, out)

    op.defvjp(forward_with_residuals, backward)
    return op


def grad_rows(g_out: Array, out: Array) -> tuple[Array, Array]:
    """The output gradient as (B, nW, H, N, D) and the softmax-backward row term rowsum(g_probs * probs),
    which equals rowsum(g_out * out) (N/D times cheaper), as (B, nW, H, N) in float32."""
    delta = jnp.sum(g_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, nW, N, H)
    return jnp.transpose(g_out, (0, 1, 3, 2, 4)), jnp.transpose(delta, (0, 1, 3, 2))


def probs_backward(probs: Array, q: Array, k: Array, v: Array, g: Array, delta: Array, scale: float
                   ) -> tuple[Array, Array, Array, Array]:
    """Gradients of probs @ v, probs = softmax(q k^T + ...) over one batch dimension x (q already scaled):
    those of the unscaled q, of k and of v, and the scores' (float32, for the bias gradient), from float32
    `probs` and `delta` (x, N, 1)."""
    dtype = v.dtype
    g_v = jnp.einsum("xqk,xqd->xkd", probs.astype(dtype), g)
    g_scores = probs * (jnp.einsum("xqd,xkd->xqk", g, v, preferred_element_type=jnp.float32) - delta)
    g_q = jnp.einsum("xqk,xkd->xqd", g_scores.astype(dtype), k) * jnp.asarray(scale, dtype)
    g_k = jnp.einsum("xqk,xqd->xkd", g_scores.astype(dtype), q)
    return g_q, g_k, g_v, g_scores


def _as_qkv_layout(g_q: Array, g_k: Array, g_v: Array, shape: tuple[int, ...]) -> Array:
    """Three gradients in (B, nW, H, N, D) order (any leading split) -> one (B, nW, N, 3, H, D) tensor, the
    layout qkv arrived in."""
    b, nw, n, _, h, d = shape
    g_qkv = jnp.stack([x.reshape(b, nw, h, n, d) for x in (g_q, g_k, g_v)], axis=3)  # (B, nW, H, 3, N, D)
    return jnp.transpose(g_qkv, (0, 1, 4, 3, 2, 5))


def _fused_bwd(scale, residuals, g_out):
    qkv, bias, mask, out = residuals
    b, nw, n, _, h, d = qkv.shape
    q, k, v = flat_heads(qkv, scale)
    probs = _fused_probs(q, k, bias, mask, (b, nw, h, n))  # float32, recomputed instead of stored
    g, delta = grad_rows(g_out, out)
    g_q, g_k, g_v, g_scores = probs_backward(probs, q, k, v, g.reshape(q.shape), delta.reshape(-1, n, 1), scale)
    rows = b * nw
    g_bias = jnp.ones((rows,), jnp.float32) @ g_scores.reshape(rows, -1)  # sum over (B, nW) as a matmul
    g_bias = g_bias.reshape(bias.shape).astype(bias.dtype)
    return _as_qkv_layout(g_q, g_k, g_v, qkv.shape), g_bias, jnp.zeros_like(mask)


_fused = recomputing_vjp(_fused_forward, _fused_bwd)


def as_mask(mask: Array | None, n: int) -> Array:
    """A missing mask becomes a (1, N, N) zero so the custom VJP has one signature."""
    if mask is None:
        return jnp.zeros((1, n, n), jnp.float32)
    return jnp.asarray(mask, jnp.float32)


def fused_attention(qkv: Array, bias: Array, mask: Array | None, scale: float) -> Array:
    """Custom-VJP attention over the whole batch of windows (see the module docstring)."""
    return _fused(qkv, bias, as_mask(mask, qkv.shape[2]), scale)


def dot_product_attention(qkv: Array, bias: Array, mask: Array | None, scale: float) -> Array:
    """`jax.nn.dot_product_attention` over B*nW sequences; bias (+ mask) broadcast to (B*nW, H, N, N)."""
    b, nw, n, _, h, d = qkv.shape
    total_bias = bias.astype(jnp.float32)[None]
    if mask is not None:
        total_bias = total_bias + jnp.asarray(mask, jnp.float32)[:, None]
    total_bias = jnp.broadcast_to(total_bias, (b, nw, h, n, n)).reshape(b * nw, h, n, n).astype(qkv.dtype)
    q, k, v = (qkv[:, :, :, i].reshape(b * nw, n, h, d) for i in range(3))  # (batch, seq, heads, dim)
    out = jax.nn.dot_product_attention(q, k, v, bias=total_bias, scale=scale)
    return out.reshape(b, nw, n, h, d)
