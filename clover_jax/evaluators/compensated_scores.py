"""Cosine scores to about twice float32's precision, for the few gallery rows whose float32 score lies too close
to a query's positive to rank by: each product exact (Dekker's split), summed pairwise in double-float arithmetic
(a score is hi + lo, two float32s), in a fixed order, so that every device count and shard layout gets the same
value and ranks agree with float64 arithmetic on the float32 rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_SPLIT = 4097.0  # 2**12 + 1: splits a float32's 24-bit significand into two halves whose products are exact
_UNIT_ROUNDOFF = 2.0 ** -24


def float32_error_bound(dim: int) -> float:
    """A bound on |float32 dot - exact dot| for two unit rows of `dim` entries: 2 * dim * 2**-24, twice the
    textbook gamma_dim that holds for any summation order (headroom for kernels that round differently, such as
    a multi-pass float32 matmul; not measured on one)."""
    return 2.0 * dim * _UNIT_ROUNDOFF


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = _SPLIT * a
    high = c - (c - a)
    return high, a - high


def _two_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    p = a * b
    a_high, a_low = _split(a)
    b_high, b_low = _split(b)
    return p, ((a_high * b_high - p) + a_high * b_low + a_low * b_high) + a_low * b_low


def _add(x: tuple[jax.Array, jax.Array], y: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    s, e = _two_sum(x[0], y[0])
    e = e + (x[1] + y[1])
    high = s + e
    return high, e - (high - s)  # renormalised: high = round(high + low), so pairs compare lexicographically


def dot(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hi, lo) float32 with hi + lo the dot product of float32 `a` and `b` over their last axis (broadcast),
    within a few 1e-16 of the exact value for unit rows of a few hundred entries (float64 gives about 1e-17)."""
    hi, lo = _two_product(a.astype(jnp.float32), b.astype(jnp.float32))
    width = hi.shape[-1]
    size = 1 << max(width - 1, 0).bit_length()
    if size != width:
        pad = [(0, 0)] * (hi.ndim - 1) + [(0, size - width)]
        hi, lo = jnp.pad(hi, pad), jnp.pad(lo, pad)
    while size > 1:  # each product (p, e) is already renormalised: p = round(p + e)
        size //= 2
        hi, lo = _add((hi[..., :size], lo[..., :size]), (hi[..., size:], lo[..., size:]))
    return hi[..., 0], lo[..., 0]


def greater(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> jax.Array:
    """a > b for renormalised (hi, lo) pairs."""
    return (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] > b[1]))
