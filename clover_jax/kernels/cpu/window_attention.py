"""`chunked` window attention (the CPU kernel): "fused" computed over cache-sized chunks of windows.

Each chunk holds about `CpuTuning.chunk_rows` (window, head) pairs, so its (N, N) scores stay in cache
instead of streaming the whole batch's through memory between the products and the softmax. Up to
`max_unrolled_chunks` large chunks are independent ops that XLA:CPU runs concurrently; otherwise they run
as a map (forward) and a scan (backward). The chunks are sliced from qkv as it arrives and the qkv gradient
is written in that layout, so the per-head relayouts happen chunk by chunk in cache, not over the whole batch.
On a batch-sharded mesh (`policy.batch_shards`) each loop step takes one chunk of every shard (`_shard_steps`).

Sizes, measured on the Intel host of `benchmarks/` (2 cores, 2 MiB L2 each; benchmarks/window_attention.py):
- chunk_rows 64 against 16 took stage 1 of the `tiny` step (16 x 64 windows, 1 head) from 280 to 241 ms
  forward + backward and stage 2 from 126 to 109 ms, the whole step 2.47 / 2.54 s -> 2.41 / 2.39 s.
- Unrolling (XLA:CPU runs independent ops concurrently, a loop body's one after another, and each small
  batched dot on one thread): stage 1 321 -> 255 ms, stage 2 166 -> 104 ms, the `tiny` step 2.91 -> 2.61 s.
  Past either bound the loop keeps compile time in check (the suite's 64² clips gain nothing from it).
- One window per clip (the late stages): a chunk takes several whole clips, the fewest chunks
  `clip_chunks.clip_chunk_counts` allows with at most chunk_rows 196-token windows' worth of scores each:
  `small`'s stage 3 45.3 -> 37.0 ms, its stage 4 23.8 -> 9.7 ms, `tiny`'s stage 4 30.4 -> 22.9 ms.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from clover_jax.kernels.attention import as_mask, grad_rows, probs_backward, recomputing_vjp
from clover_jax.kernels.cpu.clip_chunks import clip_chunk_counts
from clover_jax.kernels.execution import ExecutionPolicy

Array = jax.Array
SCOPE = "cpu_chunked_attention"  # name scope of this kernel's ops (tests look for it in lowered programs)


def max_chunk_scores(policy: ExecutionPolicy) -> int:
    """Scores a chunk of whole single-window clips may hold: chunk_rows windows of 196 tokens."""
    return policy.cpu.chunk_rows * 196 * 196


def chunk_windows(num_windows: int, heads: int, clips: int, n: int, policy: ExecutionPolicy) -> int:
    """Windows per chunk. Several windows per clip: the largest divisor of that count with windows * heads <=
    chunk_rows, so a chunk never straddles two clips' shift-mask rows. One window per clip: clips / m for the
    fewest chunks m of `clip_chunk_counts` holding at most `max_chunk_scores` scores each (else 1)."""
    rows = policy.cpu.chunk_rows
    if num_windows > 1:
        return max(c for c in range(1, num_windows + 1) if num_windows % c == 0 and (c * heads <= rows or c == 1))
    counts = clip_chunk_counts(clips, policy.devices, policy.cpu.min_clip_chunks)
    return next((clips // m for m in counts if clips // m * heads * n * n <= max_chunk_scores(policy)), 1)


def unrolled(chunks: int, rows: int, n: int, policy: ExecutionPolicy) -> bool:
    """Whether `chunks` chunks of `rows` (window, head) pairs of n tokens run as independent ops."""
    return chunks <= policy.cpu.max_unrolled_chunks and rows * n * n >= policy.cpu.min_unrolled_scores


def _map_chunks(fn: Callable, xs: tuple[Array, ...], unroll: bool) -> Array:
    """jax.lax.map(fn, xs), or with `unroll` one independent op group per chunk."""
    if not unroll:
        return jax.lax.map(fn, xs)
    return jnp.stack([fn(tuple(x[i] for x in xs)) for i in range(xs[0].shape[0])])


def _scan_chunks(fn: Callable, init: Array, xs: tuple[Array, ...], unroll: bool) -> tuple[Array, Array]:
    """jax.lax.scan(fn, init, xs), or with `unroll` one op group per chunk (only the small carry links them)."""
    if not unroll:
        return jax.lax.scan(fn, init, xs)
    carry, ys = init, []
    for i in range(xs[0].shape[0]):
        carry, y = fn(carry, tuple(x[i] for x in xs))
        ys.append(y)
    return carry, jnp.stack(ys)


def _shard_steps(m: int, b: int, nw: int, c: int, policy: ExecutionPolicy) -> int:
    """Batch shards the chunk loop steps over together: step i runs chunk i of every shard's contiguous block
    (vmapped), so on a batch-sharded mesh each device works on its own rows; a loop over the global chunk order
    would gather every chunk to every device. 1 where the shards do not split into whole chunks."""
    shards = policy.batch_shards
    if shards > 1 and b % shards == 0 and (b // shards * nw) % c == 0 and m % shards == 0:
        return shards
    return 1


def _by_step(x: Array, shards: int) -> Array:
    """(m, ...) chunks -> (m / shards, shards, ...): step i holds chunk i of every shard's block."""
    return jnp.swapaxes(x.reshape(shards, x.shape[0] // shards, *x.shape[1:]), 0, 1)


def _from_steps(x: Array) -> Array:
    """Inverse of `_by_step`: (m / shards, shards, ...) -> (m, ...) in the global chunk order."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def _chunk_qkv(x: Array, scale: float) -> tuple[Array, Array, Array]:
    """One chunk's (c, N, 3, H, D) projections -> q (scaled), k, v as (c*H, N, D). The transpose touches one
    chunk only, so it stays in cache instead of relaying out the whole batch's qkv in memory."""
    c, n, _, h, d = x.shape
    t = jnp.transpose(x, (2, 0, 3, 1, 4)).reshape(3, c * h, n, d)
    return t[0] * jnp.asarray(scale, x.dtype), t[1], t[2]


def _chunk_probs(q: Array, k: Array, bias: Array, mask: Array, index: Array, c: int) -> Array:
    """softmax(q k^T + bias + mask) in float32 for chunk `index` of c windows, as (c*H, N, N)."""
    h, n, _ = bias.shape
    rows = mask if mask.shape[0] == 1 else jax.lax.dynamic_slice_in_dim(mask, (index * c) % mask.shape[0], c)
    table = jnp.broadcast_to(rows.astype(jnp.float32)[:, None] + bias.astype(jnp.float32)[None], (c, h, n, n))
    s = jnp.einsum("xqd,xkd->xqk", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(s + table.reshape(c * h, n, n), axis=-1)


def _chunked_forward(qkv, bias, mask, scale, policy):
    with jax.named_scope(SCOPE):
        return _chunked_forward_ops(qkv, bias, mask, scale, policy)


def _chunked_forward_ops(qkv, bias, mask, scale, policy):
    b, nw, n, _, h, d = qkv.shape
    c = chunk_windows(nw, h, b, n, policy)

    def chunk(args):
        index, x = args
        q, k, v = _chunk_qkv(x, scale)
        out = jnp.einsum("xqk,xkd->xqd", _chunk_probs(q, k, bias, mask, index, c).astype(v.dtype), v)
        return jnp.transpose(out.reshape(c, h, n, d), (0, 2, 1, 3))  # (c, N, H, D)

    m = b * nw // c
    chunks = qkv.reshape(m, c, n, 3, h, d)  # windows are major, so chunking is a free reshape
    shards = _shard_steps(m, b, nw, c, policy)
    unroll = unrolled(m // shards, c * h, n, policy)  # per device, a step is one chunk
    if shards == 1:
        return _map_chunks(chunk, (jnp.arange(m), chunks), unroll).reshape(b, nw, n, h, d)
    out = _map_chunks(jax.vmap(chunk), (_by_step(jnp.arange(m), shards), _by_step(chunks, shards)), unroll)
    return _from_steps(out).reshape(b, nw, n, h, d)


def _chunked_bwd(scale, policy, residuals, g_out):
    with jax.named_scope(SCOPE):
        return _chunked_bwd_ops(scale, policy, residuals, g_out)


def _chunked_bwd_ops(scale, policy, residuals, g_out):
    qkv, bias, mask, out = residuals
    b, nw, n, _, h, d = qkv.shape
    c = chunk_windows(nw, h, b, n, policy)
    m = b * nw // c

    def chunk_grads(args):
        index, x, g_o, o = args
        q, k, v = _chunk_qkv(x, scale)
        g, delta = grad_rows(g_o[None], o[None])  # this chunk as a batch of one clip, in cache
        probs = _chunk_probs(q, k, bias, mask, index, c)
        g_q, g_k, g_v, g_scores = probs_backward(probs, q, k, v, g.reshape(c * h, n, d), delta.reshape(c * h, n, 1),
                                                 scale)
        g_bias = jnp.ones((c,), jnp.float32) @ g_scores.reshape(c, -1)  # window sum as a matmul
        g_x = jnp.stack([y.reshape(c, h, n, d) for y in (g_q, g_k, g_v)], axis=1)  # (c, 3, H, N, D)
        return g_bias, jnp.transpose(g_x, (0, 3, 1, 2, 4))  # (c, N, 3, H, D): the layout qkv came in

    shards = _shard_steps(m, b, nw, c, policy)
    xs = (jnp.arange(m), qkv.reshape(m, c, n, 3, h, d), g_out.reshape(m, c, n, h, d), out.reshape(m, c, n, h, d))
    if shards == 1:
        def chunk(g_bias, args):
            d_bias, g_x = chunk_grads(args)
            return g_bias + d_bias, g_x
    else:
        xs = tuple(_by_step(x, shards) for x in xs)

        def chunk(g_bias, args):
            d_bias, g_x = jax.vmap(chunk_grads)(args)
            return g_bias + jnp.sum(d_bias, axis=0), g_x

    g_bias, g_qkv = _scan_chunks(chunk, jnp.zeros((h * n * n,), jnp.float32), xs,
                                 unrolled(m // shards, c * h, n, policy))
    g_qkv = g_qkv if shards == 1 else _from_steps(g_qkv)
    return g_qkv.reshape(qkv.shape), g_bias.reshape(bias.shape).astype(bias.dtype), jnp.zeros_like(mask)


_chunked = recomputing_vjp(_chunked_forward, _chunked_bwd, static_argnums=(3, 4))


def chunked_attention(qkv: Array, bias: Array, mask: Array | None, scale: float, policy: ExecutionPolicy) -> Array:
    """Custom-VJP attention over cache-sized chunks of windows, sized by `policy.cpu` (module docstring)."""
    return _chunked(qkv, bias, as_mask(mask, qkv.shape[2]), scale, policy)
