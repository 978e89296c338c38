"""Attention inside Swin windows, the math: softmax(scale q k^T + bias + mask) v per head.

The qkv projections arrive as the Dense emits them, (B, nW, N, 3, H, D) (batch, windows, window volume,
q/k/v, heads, head dim), with a relative-position `bias` (H, N, N) shared by all windows and an optional
additive shift `mask` (nW, N, N); the output is (B, nW, N, H, D). This is the reference every faster
implementation (`clover_jax/kernels/`) is tested against; autodiff gives its gradients.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _scores(q: Array, k: Array, bias: Array, mask: Array | None) -> Array:
    """(B, nW, H, N, N) float32 scores q k^T + bias (+ mask)."""
    s = jnp.einsum("bwhqd,bwhkd->bwhqk", q, k, preferred_element_type=jnp.float32)
    s = s + bias.astype(jnp.float32)
    if mask is not None:
        s = s + mask.astype(jnp.float32)[:, None]
    return s


def einsum_attention(qkv: Array, bias: Array, mask: Array | None, scale: float) -> Array:
    """Plain formulation; gradients by autodiff."""
    q, k, v = split_heads(qkv, scale)
    probs = jax.nn.softmax(_scores(q, k, bias, mask), axis=-1).astype(v.dtype)
    return jnp.einsum("bwhqk,bwhkd->bwqhd", probs, v)


def split_heads(qkv: Array, scale: float) -> tuple[Array, Array, Array]:
    """(B, nW, N, 3, H, D) projections -> q (scaled), k, v, each (B, nW, H, N, D)."""
    qkv = jnp.transpose(qkv, (3, 0, 1, 4, 2, 5))
    return qkv[0] * jnp.asarray(scale, qkv.dtype), qkv[1], qkv[2]
