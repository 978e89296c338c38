"""The unrolled Threefry equals JAX's, and `Dropout` keeps the right share, scales, and ignores sharding."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry2x32_p
from jax.sharding import NamedSharding, PartitionSpec

from clover_jax.kernels.cpu.dropout import keep_mask, threefry2x32
from clover_jax.kernels.execution import policy_for, use
from clover_jax.models.dropout import Dropout
from clover_jax.partitioning import make_mesh


def test_threefry_matches_jax_primitive_bit_for_bit():
    rng = np.random.default_rng(0)
    words = [jnp.asarray(rng.integers(0, 2**32, size=(4096,), dtype=np.uint64).astype(np.uint32)) for _ in range(4)]
    ours = threefry2x32(words[0][0], words[1][0], words[2], words[3])
    reference = threefry2x32_p.bind(jnp.broadcast_to(words[0][0], (4096,)), jnp.broadcast_to(words[1][0], (4096,)),
                                    words[2], words[3])
    for a, b in zip(ours, reference):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.25])
def test_keep_share_within_four_sigma(keep):
    n = 1 << 20
    share = float(jnp.mean(keep_mask(jax.random.key(7), keep, (n,))))
    assert abs(share - keep) < 4 * (keep * (1 - keep) / n) ** 0.5


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_dropout_scales_kept_and_zeroes_dropped(platform):
    """Under each platform's policy (CPU: the unrolled Threefry; TPU: jax.random's Bernoulli draw)."""
    x = jnp.asarray(np.random.default_rng(1).uniform(1.0, 2.0, size=(64, 96)), jnp.float32)
    policy = policy_for(platform, 1)
    with use(policy):
        y = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
        other = Dropout(0.1).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
    kept = np.asarray(y) != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / 0.9, rtol=1e-6)
    assert not np.array_equal(np.asarray(other) != 0, kept)  # another key, another mask


def test_each_policy_draws_with_its_own_kernel():
    x = jnp.ones((64, 96), jnp.float32)
    masks = {}
    for platform in ("cpu", "tpu"):
        with use(policy_for(platform, 1)):
            masks[platform] = np.asarray(Dropout(0.1).apply({}, x, deterministic=False,
                                                            rngs={"dropout": jax.random.key(3)})) != 0
    assert not np.array_equal(masks["cpu"], masks["tpu"])  # same key, different generators


def test_dropout_identity_and_extremes():
    x = jnp.ones((8, 8))
    rngs = {"dropout": jax.random.key(0)}
    assert Dropout(0.5).apply({}, x, deterministic=True) is x
    assert Dropout(0.0).apply({}, x, deterministic=False, rngs=rngs) is x
    np.testing.assert_array_equal(np.asarray(Dropout(1.0).apply({}, x, deterministic=False, rngs=rngs)), 0.0)


def test_mask_does_not_depend_on_sharding():
    mesh = make_mesh({"data": 8})
    shape = (16, 4, 30, 30)
    draw = jax.jit(lambda key: keep_mask(key, 0.9, shape).astype(jnp.int8))
    whole = np.asarray(draw(jax.random.key(5)))
    sharded = jax.jit(lambda key: keep_mask(key, 0.9, shape).astype(jnp.int8),
                      out_shardings=NamedSharding(mesh, PartitionSpec("data")))(jax.random.key(5))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), whole)
