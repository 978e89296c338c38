"""The CPU kernel `kernels/cpu/dense_grad.py`: the token-chunked Dense kernel gradient equals the plain one, sharded
or not, and falls back where it cannot."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from clover_jax.kernels.cpu import dense_grad
from clover_jax.kernels.execution import policy_for
from clover_jax.partitioning import make_mesh

CPU8 = policy_for("cpu", 8)  # the suite's 8 devices
ROWS_128 = policy_for("cpu", 8, {"cpu": {"rows_per_chunk": 128}})  # 512 tokens per clip -> 4 chunks of 128


def _grads(x: np.ndarray, features: int, chunked: bool, policy=CPU8):
    dot_general = functools.partial(dense_grad.token_chunked_dot_general, policy=policy) if chunked else None
    layer = nn.Dense(features, dot_general=dot_general)
    params = layer.init(jax.random.key(0), x[:1])

    def loss(params, x):
        y = layer.apply(params, x)
        return jnp.sum(jnp.sin(y) * y)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _assert_close(a, b, rtol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = float(jnp.max(jnp.abs(v))) or 1.0
        assert float(jnp.max(jnp.abs(u - v))) <= rtol * scale


def _assert_sharded_chunked_equals_plain(x: np.ndarray, partials: str, policy=CPU8) -> None:
    """Loss and gradients of the chunked Dense on a batch sharded over the 8 devices equal the plain Dense's,
    and the chunked path really ran: its `partials` (chunks, C, D) sums are in the program."""
    mesh = make_mesh({"data": -1})
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    chunked, params = _grads(x, 16, chunked=True, policy=policy)
    plain, _ = _grads(x, 16, chunked=False)
    (loss_c, grads_c), (loss_p, grads_p) = chunked(params, x_sharded), plain(params, x)
    np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=1e-6)
    _assert_close(grads_c, grads_p)
    assert partials in str(jax.make_jaxpr(chunked)(params, x))


@pytest.mark.parametrize("shape", [(8, 4, 128, 8), (8, 512, 8)])
def test_chunked_kernel_gradient_equals_plain_on_a_sharded_batch(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    _assert_sharded_chunked_equals_plain(x, f"f32[8,4,{shape[-1]},16]", ROWS_128)  # (batch, chunks, C, D)


def test_clip_chunked_kernel_gradient_equals_plain_on_a_sharded_batch():
    """Too few tokens per clip for chunks inside a clip: chunks of whole clips, as many as the 8 devices."""
    x = np.random.default_rng(3).standard_normal((16, 2, 4, 8)).astype(np.float32)  # 8 tokens per clip
    assert dense_grad.whole_clip_chunks(16, CPU8) == jax.device_count() == 8
    assert dense_grad.whole_clip_chunks(4, CPU8) == 0
    _assert_sharded_chunked_equals_plain(x, "f32[8,8,16]")  # 8 chunks of 2 clips


def test_clip_chunks_by_the_mesh_device_count():
    chunks = lambda devices, batches, **cpu: [dense_grad.whole_clip_chunks(b, policy_for("cpu", devices, {"cpu": cpu}))  # noqa: E731
                                              for b in batches]
    assert chunks(1, (1, 2, 3, 4, 6, 8, 16, 32)) == [0, 0, 0, 4, 6, 4, 4, 4]
    assert chunks(2, (4, 6, 12, 16)) == [4, 6, 4, 4]
    assert chunks(8, (4, 8, 12, 16, 64)) == [0, 8, 0, 8, 8]
    assert chunks(1, (4, 6, 12, 16), min_clip_chunks=6) == [0, 6, 6, 8]  # the config's size is used


def test_unchunkable_shapes_use_the_plain_contraction():
    assert dense_grad.rows_per_chunk(512, 128) == 128 and dense_grad.rows_per_chunk(12544, 128) == 128
    assert dense_grad.rows_per_chunk(97, 128) == 97
    rng = np.random.default_rng(1)
    for x in (rng.standard_normal((300, 8)), rng.standard_normal((4, 131, 8)), rng.standard_normal((2, 1, 8))):
        x = x.astype(np.float32)  # 2-D, 1-token chunks (131 is prime), and one token
        kernel_grad = dense_grad.kernel_grad(x, np.ones(x.shape[:-1] + (16,), np.float32), jnp.float32, ROWS_128)
        np.testing.assert_allclose(np.asarray(kernel_grad),
                                   np.broadcast_to(x.reshape(-1, 8).sum(0)[:, None], (8, 16)), rtol=1e-5, atol=1e-5)
        chunked, params = _grads(x, 16, chunked=True, policy=ROWS_128)
        plain, _ = _grads(x, 16, chunked=False)
        _assert_close(chunked(params, x), plain(params, x))


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 256, 8)), jnp.bfloat16)
    kernel = jnp.ones((8, 4), jnp.bfloat16)
    dims = (((2,), (0,)), ((), ()))
    _, vjp = jax.vjp(lambda x, k: dense_grad.token_chunked_dot_general(x, k, dims, policy=CPU8), x, kernel)
    g_x, g_kernel = vjp(jnp.ones((2, 256, 4), jnp.bfloat16))
    assert g_x.dtype == jnp.bfloat16 and g_kernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g_kernel, np.float32)[:, 0],
                               np.asarray(x, np.float32).reshape(-1, 8).sum(0), rtol=2e-2, atol=0.5)
