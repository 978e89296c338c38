"""Dropout keep masks from a counter-based Threefry-2x32 hash written as plain element-wise ops.

`nn.Dropout` draws its mask with `jax.random.bernoulli`, whose Threefry primitive XLA:CPU lowers as a rolled
loop of 5 steps over whole arrays (jax/_src/random/threefry2x32.py), so every step streams the counters
through memory. Here the same cipher (20 rounds, key injection every 4; Salmon et al., SC 2011) is unrolled
in jnp and fuses with the multiply: a dropout over the fusion encoder's (16, 12, 94, 94) attention
probabilities took 1.5 ms instead of 7.4 ms on the 2-core machine of `benchmarks/`.

Each element's bits are the first output word of Threefry-2x32 keyed by two words drawn from the module's
"dropout" rng, with the element's flat index as the counter (`lax.iota`, which XLA partitions with the
array, so a sharded batch draws the same mask as an unsharded one). An element is kept when its bits fall
below round(keep * 2^32): keep probability exact to 2^-32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SCOPE = "cpu_threefry_dropout"  # name scope of the mask's ops (tests look for it)
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32 rotation schedule, alternating per 4 rounds
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: Array, bits: int) -> Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """Threefry-2x32 (20 rounds) of the uint32 counter words (x0, x1) under the key (k0, k1), element-wise."""
    keys = (k0, k1, k0 ^ k1 ^ _KEY_PARITY)
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for step in range(5):
        for bits in _ROTATIONS[step % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, bits) ^ x0
        x0 = x0 + keys[(step + 1) % 3]
        x1 = x1 + keys[(step + 2) % 3] + np.uint32(step + 1)
    return x0, x1


def keep_mask(key: Array, keep: float, shape: tuple[int, ...]) -> Array:
    """Boolean array of `shape`, each element True with probability `keep` (to 2^-32), from `key`."""
    with jax.named_scope(SCOPE):
        return _keep_mask_ops(key, keep, shape)


def _keep_mask_ops(key: Array, keep: float, shape: tuple[int, ...]) -> Array:
    k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
    counters = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    bits, _ = threefry2x32(k0, k1, counters, jnp.zeros_like(counters))
    threshold = min(round(keep * 2.0**32), 2**32 - 1)
    return bits < np.uint32(threshold)
