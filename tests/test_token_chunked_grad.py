"""The token-chunked Dense kernel gradient equals the plain one, sharded or not, and falls back where it cannot."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from clover_jax.models import token_chunked_grad as tcg
from clover_jax.sharding import make_mesh


def _grads(x: np.ndarray, features: int, chunked: bool):
    layer = nn.Dense(features, dot_general=tcg.token_chunked_dot_general if chunked else None)
    params = layer.init(jax.random.key(0), x[:1])

    def loss(params, x):
        y = layer.apply(params, x)
        return jnp.sum(jnp.sin(y) * y)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _assert_close(a, b, rtol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = float(jnp.max(jnp.abs(v))) or 1.0
        assert float(jnp.max(jnp.abs(u - v))) <= rtol * scale


def _assert_sharded_chunked_equals_plain(x: np.ndarray, partials: str) -> None:
    """Loss and gradients of the chunked Dense on a batch sharded over the 8 devices equal the plain Dense's,
    and the chunked path really ran: its `partials` (chunks, C, D) sums are in the program."""
    mesh = make_mesh({"data": -1})
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    chunked, params = _grads(x, 16, chunked=True)
    plain, _ = _grads(x, 16, chunked=False)
    (loss_c, grads_c), (loss_p, grads_p) = chunked(params, x_sharded), plain(params, x)
    np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=1e-6)
    _assert_close(grads_c, grads_p)
    assert partials in str(jax.make_jaxpr(chunked)(params, x))


@pytest.mark.parametrize("shape", [(8, 4, 128, 8), (8, 512, 8)])
def test_chunked_kernel_gradient_equals_plain_on_a_sharded_batch(monkeypatch, shape):
    monkeypatch.setattr(tcg, "ROWS_PER_CHUNK", 128)  # 512 tokens per clip -> 4 chunks of 128
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    _assert_sharded_chunked_equals_plain(x, f"f32[8,4,{shape[-1]},16]")  # (batch, chunks, C, D)


def test_clip_chunked_kernel_gradient_equals_plain_on_a_sharded_batch():
    """Too few tokens per clip for chunks inside a clip: chunks of whole clips, as many as the 8 devices."""
    x = np.random.default_rng(3).standard_normal((16, 2, 4, 8)).astype(np.float32)  # 8 tokens per clip
    assert tcg._clip_groups(16) == jax.device_count() == 8 and tcg._clip_groups(4) == 0
    _assert_sharded_chunked_equals_plain(x, "f32[8,8,16]")  # 8 chunks of 2 clips


def test_clip_groups_by_device_count(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert [tcg._clip_groups(b) for b in (1, 2, 3, 4, 6, 8, 16, 32)] == [0, 0, 0, 4, 6, 4, 4, 4]
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    assert [tcg._clip_groups(b) for b in (4, 6, 12, 16)] == [4, 6, 4, 4]
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert [tcg._clip_groups(b) for b in (4, 8, 12, 16, 64)] == [0, 8, 0, 8, 8]


def test_unchunkable_shapes_use_the_plain_contraction(monkeypatch):
    monkeypatch.setattr(tcg, "ROWS_PER_CHUNK", 128)
    assert tcg._rows_per_chunk(512) == 128 and tcg._rows_per_chunk(12544) == 128 and tcg._rows_per_chunk(97) == 97
    rng = np.random.default_rng(1)
    for x in (rng.standard_normal((300, 8)), rng.standard_normal((4, 131, 8)), rng.standard_normal((2, 1, 8))):
        x = x.astype(np.float32)  # 2-D, 1-token chunks (131 is prime), and one token
        kernel_grad = tcg.kernel_grad(x, np.ones(x.shape[:-1] + (16,), np.float32), jnp.float32)
        np.testing.assert_allclose(np.asarray(kernel_grad),
                                   np.broadcast_to(x.reshape(-1, 8).sum(0)[:, None], (8, 16)), rtol=1e-5, atol=1e-5)
        chunked, params = _grads(x, 16, chunked=True)
        plain, _ = _grads(x, 16, chunked=False)
        _assert_close(chunked(params, x), plain(params, x))


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 256, 8)), jnp.bfloat16)
    kernel = jnp.ones((8, 4), jnp.bfloat16)
    _, vjp = jax.vjp(lambda x, k: tcg.token_chunked_dot_general(x, k, (((2,), (0,)), ((), ()))), x, kernel)
    g_x, g_kernel = vjp(jnp.ones((2, 256, 4), jnp.bfloat16))
    assert g_x.dtype == jnp.bfloat16 and g_kernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g_kernel, np.float32)[:, 0],
                               np.asarray(x, np.float32).reshape(-1, 8).sum(0), rtol=2e-2, atol=0.5)
