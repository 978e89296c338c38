"""Dropout as `nn.Dropout`: zero each element with probability `rate`, scale the rest by 1 / (1 - rate).

The keep mask comes from `kernels.ops.dropout_keep_mask` (the policy's implementation: jax.random's
Bernoulli draw, or on CPU an unrolled Threefry that fuses with the multiply), keyed by the "dropout" rng.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clover_jax.kernels import ops


class Dropout(nn.Module):
    """Drop-in for `nn.Dropout(rate)(x, deterministic=...)`, drawing from the "dropout" rng collection."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = 1.0 - self.rate
        mask = ops.dropout_keep_mask(self.make_rng("dropout"), keep, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
