"""LayerNorm over the last axis, the math: (x - mean) / sqrt(var + eps) * scale + bias, all float32.

The same function as `nn.LayerNorm(dtype=float32)`, gradients by autodiff; `layers.LayerNorm` is its module
and `kernels.ops.layer_norm` picks this or a backend kernel (`kernels/cpu/layer_norm.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """Normalised over the last axis with the biased variance, then scaled and shifted."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps) * scale + bias
