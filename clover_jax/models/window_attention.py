"""Attention inside Swin windows: softmax(q k^T + bias + mask) v, in interchangeable implementations.

Every implementation takes q, k, v of shape (B, nW, H, N, D) (batch, windows, heads, window volume,
head dim; q already scaled), a relative-position `bias` (H, N, N) shared by all windows, and an optional
additive shift `mask` (nW, N, N) constant, and returns (B, nW, H, N, D). They differ in how the work is
laid out, which matters more than FLOPs here (stage-1 windows are small matmuls over large batches):

  "einsum"     autodiff of the plain formulation; the reference the others are tested against.
  "fused"      custom VJP that stores only q, k, v, the output and the per-row log-sum-exp, recomputes
               the probabilities in the backward, folds the softmax backward into one pass and sums the
               bias gradient over windows as a matmul (XLA's column reduce of that sum is slow on CPU).
               No (N, N) tensor outlives its block, so it also lowers peak memory.
  "per_clip"   "fused", mapped over clips with `lax.map`, so one clip's (nW, H, N, N) scores stay in
               cache on CPU instead of streaming the whole batch's through memory.
  "dot_product" `jax.nn.dot_product_attention` with the bias and mask as one additive bias (cuDNN's
               fused attention on GPU when its constraints hold, XLA elsewhere).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _scores(q: Array, k: Array, bias: Array, mask: Array | None) -> Array:
    """(B, nW, H, N, N) float32 scores q k^T + bias (+ mask)."""
    s = jnp.einsum("bwhqd,bwhkd->bwhqk", q, k, preferred_element_type=jnp.float32)
    s = s + bias.astype(jnp.float32)
    if mask is not None:
        s = s + mask.astype(jnp.float32)[:, None]
    return s


def einsum_attention(q: Array, k: Array, v: Array, bias: Array, mask: Array | None) -> Array:
    """Plain formulation; gradients by autodiff."""
    probs = jax.nn.softmax(_scores(q, k, bias, mask), axis=-1).astype(v.dtype)
    return jnp.einsum("bwhqk,bwhkd->bwhqd", probs, v)


def _fused_forward(q, k, v, bias, mask):
    s = _scores(q, k, bias, mask)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - row_max)
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("bwhqk,bwhkd->bwhqd", (e / total).astype(v.dtype), v)
    return out, row_max + jnp.log(total)


@jax.custom_vjp
def _fused(q: Array, k: Array, v: Array, bias: Array, mask: Array) -> Array:
    return _fused_forward(q, k, v, bias, mask)[0]


def _fused_fwd(q, k, v, bias, mask):
    out, lse = _fused_forward(q, k, v, bias, mask)
    return out, (q, k, v, bias, mask, out, lse)


def _fused_bwd(residuals, g_out):
    q, k, v, bias, mask, out, lse = residuals
    probs = jnp.exp(_scores(q, k, bias, mask) - lse)  # float32, recomputed instead of stored
    dtype = v.dtype
    g_v = jnp.einsum("bwhqk,bwhqd->bwhkd", probs.astype(dtype), g_out)
    g_probs = jnp.einsum("bwhqd,bwhkd->bwhqk", g_out, v, preferred_element_type=jnp.float32)
    # softmax backward: rowsum(g_probs * probs) equals rowsum(g_out * out), which is N/D times cheaper.
    delta = jnp.sum(g_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    g_scores = probs * (g_probs - delta)
    g_q = jnp.einsum("bwhqk,bwhkd->bwhqd", g_scores.astype(dtype), k)
    g_k = jnp.einsum("bwhqk,bwhqd->bwhkd", g_scores.astype(dtype), q)
    rows = g_scores.shape[0] * g_scores.shape[1]
    g_bias = jnp.ones((rows,), jnp.float32) @ g_scores.reshape(rows, -1)  # sum over (B, nW) as a matmul
    g_bias = g_bias.reshape(bias.shape).astype(bias.dtype)
    return g_q, g_k, g_v, g_bias, jnp.zeros_like(mask)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _as_mask(mask: Array | None, q: Array) -> Array:
    """A missing mask becomes a (1, N, N) zero so the custom VJP has one signature."""
    if mask is None:
        n = q.shape[-2]
        return jnp.zeros((1, n, n), jnp.float32)
    return jnp.asarray(mask, jnp.float32)


def fused_attention(q: Array, k: Array, v: Array, bias: Array, mask: Array | None) -> Array:
    """Custom-VJP attention over the whole batch of windows (see the module docstring)."""
    return _fused(q, k, v, bias, _as_mask(mask, q))


def per_clip_attention(q: Array, k: Array, v: Array, bias: Array, mask: Array | None) -> Array:
    """`fused_attention` applied to one clip at a time (`lax.map` over the leading axis)."""
    mask = _as_mask(mask, q)
    return jax.lax.map(lambda qkv: _fused(qkv[0][None], qkv[1][None], qkv[2][None], bias, mask)[0], (q, k, v))


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array, mask: Array | None) -> Array:
    """`jax.nn.dot_product_attention` over B*nW sequences; bias (+ mask) broadcast to (B*nW, H, N, N)."""
    b, nw, h, n, d = q.shape
    total_bias = bias.astype(jnp.float32)[None]
    if mask is not None:
        total_bias = total_bias + jnp.asarray(mask, jnp.float32)[:, None]
    total_bias = jnp.broadcast_to(total_bias, (b, nw, h, n, n)).reshape(b * nw, h, n, n).astype(q.dtype)
    to_bnhd = lambda x: jnp.swapaxes(x.reshape(b * nw, h, n, d), 1, 2)  # noqa: E731  (batch, seq, heads, dim)
    out = jax.nn.dot_product_attention(to_bnhd(q), to_bnhd(k), to_bnhd(v), bias=total_bias, scale=1.0)
    return jnp.swapaxes(out, 1, 2).reshape(b, nw, h, n, d)


AttentionFn = Callable[[Array, Array, Array, Array, "Array | None"], Array]

ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "einsum": einsum_attention,
    "fused": fused_attention,
    "per_clip": per_clip_attention,
    "dot_product": dot_product_attention,
}

# "auto" resolves by the backend the model is traced for (measured: benchmarks/swin_attention.py).
DEFAULT_BY_BACKEND = {"cpu": "fused", "gpu": "dot_product", "tpu": "fused"}


def resolve_attention(name: str, backend: str | None = None) -> str:
    """The implementation name `name` stands for ("auto" -> this backend's default)."""
    if name == "auto":
        backend = backend or jax.default_backend()
        return DEFAULT_BY_BACKEND.get(backend, "fused")
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention={name!r}; valid: 'auto', {', '.join(repr(k) for k in ATTENTION_IMPLEMENTATIONS)}"
        )
    return name


def window_attention(q: Array, k: Array, v: Array, bias: Array, mask: np.ndarray | None, *, implementation: str
                     ) -> Array:
    """softmax(q k^T + bias + mask) v over (B, nW, H, N, D) windows with the named implementation."""
    return ATTENTION_IMPLEMENTATIONS[resolve_attention(implementation)](q, k, v, bias, mask)
