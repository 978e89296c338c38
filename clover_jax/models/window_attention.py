"""Attention inside Swin windows: softmax(q k^T + bias + mask) v, in interchangeable implementations.

Every implementation takes the qkv projections (B, nW, N, 3, H, D) as the Dense emits them (batch,
windows, window volume, q/k/v, heads, head dim), a relative-position `bias` (H, N, N) shared by all
windows, an optional additive shift `mask` (nW, N, N) constant and the q scale, and returns
(B, nW, N, H, D). They differ in how the work is
laid out, which matters more than FLOPs here (stage-1 windows are small matmuls over large batches):

  "einsum"     autodiff of the plain formulation; the reference the others are tested against.
  "fused"      custom VJP that stores only qkv and the output, recomputes the probabilities in the
               backward, folds the softmax backward into one pass, sums the bias gradient over windows
               as a matmul (XLA's column reduce of that sum is slow on CPU), runs every product over one
               flattened (B*nW*H) batch dimension and returns the qkv gradient as one tensor in the
               layout qkv came in. No (N, N) tensor outlives its block, so it also lowers peak memory.
  "chunked"    "fused" computed over chunks of about CHUNK_ROWS (window, head) pairs at a time, so each
               chunk's (N, N) scores stay in cache instead of streaming the whole batch's through memory
               between the products and the softmax (CPU). Up to MAX_UNROLLED_CHUNKS large chunks are independent
               ops that XLA:CPU runs concurrently; otherwise they run as a map (forward) and a scan (backward). The
               chunks are sliced from qkv as it arrives and the qkv gradient is written in that layout, so
               the per-head relayouts happen chunk by chunk in cache, not over the whole batch.
  "per_clip"   "fused" inside a video encoder that `Clover` runs one clip at a time (a rematerialised
               scan over clips): a clip's windows stay in cache on CPU and no batch-wide Swin activation
               is stored. Here, for one call over windows, it is "fused".
  "dot_product" `jax.nn.dot_product_attention` with the bias and mask as one additive bias (cuDNN's
               fused attention on GPU when its constraints hold, XLA elsewhere).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from clover_jax.models.clip_groups import clip_chunk_counts

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
    q, k, v = _split_heads(qkv, scale)
    probs = jax.nn.softmax(_scores(q, k, bias, mask), axis=-1).astype(v.dtype)
    return jnp.einsum("bwhqk,bwhkd->bwqhd", probs, v)


def _split_heads(qkv: Array, scale: float) -> tuple[Array, Array, Array]:
    """(B, nW, N, 3, H, D) projections -> q (scaled), k, v, each (B, nW, H, N, D)."""
    qkv = jnp.transpose(qkv, (3, 0, 1, 4, 2, 5))
    return qkv[0] * jnp.asarray(scale, qkv.dtype), qkv[1], qkv[2]


def _flat_heads(qkv: Array, scale: float) -> tuple[Array, Array, Array]:
    """(B, nW, N, 3, H, D) -> q (scaled), k, v as (B*nW*H, N, D): one batch dimension per product, which
    XLA's CPU dot emitters run about a quarter faster than three (b, w, h) batch dimensions."""
    b, nw, n, _, h, d = qkv.shape
    return tuple(x.reshape(b * nw * h, n, d) for x in _split_heads(qkv, scale))


def _fused_probs(q: Array, k: Array, bias: Array, mask: Array, shape: tuple[int, ...]) -> Array:
    """softmax(q k^T + bias + mask) in float32 as (B*nW*H, N, N); bias and mask are added as one table."""
    b, nw, h, n = shape
    table = bias.astype(jnp.float32)[None] + mask.astype(jnp.float32)[:, None]  # (nW or 1, H, N, N)
    s = jnp.einsum("xqd,xkd->xqk", q, k, preferred_element_type=jnp.float32)
    s = s.reshape(b, table.shape[0], -1, h, n, n) + table[:, None]  # windows grouped by shift-mask row
    return jax.nn.softmax(s, axis=-1).reshape(b * nw * h, n, n)


def _fused_forward(qkv, bias, mask, scale):
    b, nw, n, _, h, d = qkv.shape
    q, k, v = _flat_heads(qkv, scale)
    probs = _fused_probs(q, k, bias, mask, (b, nw, h, n))
    out = jnp.einsum("xqk,xkd->xqd", probs.astype(v.dtype), v)
    return jnp.transpose(out.reshape(b, nw, h, n, d), (0, 1, 3, 2, 4))  # (B, nW, N, H, D)


def _recomputing_vjp(forward: Callable, backward: Callable) -> Callable:
    """forward(qkv, bias, mask, scale) as a custom VJP (scale static) whose only residuals are qkv, bias,
    mask and the output; backward(scale, residuals, g_out) recomputes whatever else it needs."""
    op = jax.custom_vjp(forward, nondiff_argnums=(3,))

    def forward_with_residuals(qkv, bias, mask, scale):
        out = forward(qkv, bias, mask, scale)
        return out, (qkv, bias, mask, out)

    op.defvjp(forward_with_residuals, backward)
    return op


def _grad_rows(g_out: Array, out: Array) -> tuple[Array, Array]:
    """The output gradient as (B, nW, H, N, D) and the softmax-backward row term rowsum(g_probs * probs),
    which equals rowsum(g_out * out) (N/D times cheaper), as (B, nW, H, N) in float32."""
    delta = jnp.sum(g_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, nW, N, H)
    return jnp.transpose(g_out, (0, 1, 3, 2, 4)), jnp.transpose(delta, (0, 1, 3, 2))


def _probs_backward(probs: Array, q: Array, k: Array, v: Array, g: Array, delta: Array, scale: float
                    ) -> tuple[Array, Array, Array, Array]:
    """Gradients of probs @ v, probs = softmax(q k^T + ...) over one batch dimension x (q already scaled):
    those of the unscaled q, of k and of v, and the scores' (float32, for the bias gradient), from float32
    `probs` and `delta` (x, N, 1)."""
    dtype = v.dtype
    g_v = jnp.einsum("xqk,xqd->xkd", probs.astype(dtype), g)
    g_scores = probs * (jnp.einsum("xqd,xkd->xqk", g, v, preferred_element_type=jnp.float32) - delta)
    g_q = jnp.einsum("xqk,xkd->xqd", g_scores.astype(dtype), k) * jnp.asarray(scale, dtype)
    g_k = jnp.einsum("xqk,xqd->xkd", g_scores.astype(dtype), q)
    return g_q, g_k, g_v, g_scores


def _as_qkv_layout(g_q: Array, g_k: Array, g_v: Array, shape: tuple[int, ...]) -> Array:
    """Three gradients in (B, nW, H, N, D) order (any leading split) -> one (B, nW, N, 3, H, D) tensor, the
    layout qkv arrived in."""
    b, nw, n, _, h, d = shape
    g_qkv = jnp.stack([x.reshape(b, nw, h, n, d) for x in (g_q, g_k, g_v)], axis=3)  # (B, nW, H, 3, N, D)
    return jnp.transpose(g_qkv, (0, 1, 4, 3, 2, 5))


def _fused_bwd(scale, residuals, g_out):
    qkv, bias, mask, out = residuals
    b, nw, n, _, h, d = qkv.shape
    q, k, v = _flat_heads(qkv, scale)
    probs = _fused_probs(q, k, bias, mask, (b, nw, h, n))  # float32, recomputed instead of stored
    g, delta = _grad_rows(g_out, out)
    g_q, g_k, g_v, g_scores = _probs_backward(probs, q, k, v, g.reshape(q.shape), delta.reshape(-1, n, 1), scale)
    rows = b * nw
    g_bias = jnp.ones((rows,), jnp.float32) @ g_scores.reshape(rows, -1)  # sum over (B, nW) as a matmul
    g_bias = g_bias.reshape(bias.shape).astype(bias.dtype)
    return _as_qkv_layout(g_q, g_k, g_v, qkv.shape), g_bias, jnp.zeros_like(mask)


_fused = _recomputing_vjp(_fused_forward, _fused_bwd)


def _as_mask(mask: Array | None, n: int) -> Array:
    """A missing mask becomes a (1, N, N) zero so the custom VJP has one signature."""
    if mask is None:
        return jnp.zeros((1, n, n), jnp.float32)
    return jnp.asarray(mask, jnp.float32)


def fused_attention(qkv: Array, bias: Array, mask: Array | None, scale: float) -> Array:
    """Custom-VJP attention over the whole batch of windows (see the module docstring)."""
    return _fused(qkv, bias, _as_mask(mask, qkv.shape[2]), scale)


# (window, head) pairs per chunk; a chunk's float32 (N, N) scores are CHUNK_ROWS * 154 KB at N = 196. Fewer,
# larger chunks cost fewer small per-chunk ops (measured with the loop): on the Intel host of `benchmarks/` (2 cores,
# 2 MiB L2 each) 64 took stage 1 of the `tiny` step (16 x 64 windows, 1 head) from 280 to 241 ms forward +
# backward and stage 2 from 126 to 109 ms against 16 (benchmarks/window_attention.py), and the whole step
# 2.47 / 2.54 s -> 2.41 / 2.39 s in alternating runs. `tiny` then runs one clip's windows per chunk.
CHUNK_ROWS = 64


# When a clip is one window (the late stages, where the window covers the whole frame), a chunk takes several
# clips instead: the fewest chunks `clip_groups.clip_chunk_counts` allows (at least four, which the benchmark
# host runs concurrently when unrolled) with at most CHUNK_ROWS 196-token windows' worth of scores each.
# Measured there (forward + backward of one attention core over 16 clips, benchmarks/window_attention.py):
# `small`'s stage 3 (196 tokens, 12 heads) 45.3 -> 37.0 ms, its stage 4 (64 tokens, 24 heads: a loop of 16
# chunks before) 23.8 -> 9.7 ms, `tiny`'s stage 4 (196 tokens, 8 heads) 30.4 -> 22.9 ms. Grouping clips of
# several windows was slower (`tiny`'s stage 3: 51.8 -> 54.7 ms).
MAX_CHUNK_SCORES = CHUNK_ROWS * 196 * 196


def _chunk_windows(num_windows: int, heads: int, clips: int = 1, n: int = 196) -> int:
    """Windows per chunk. Several windows per clip: the largest divisor of that count with windows * heads <=
    CHUNK_ROWS, so a chunk never straddles two clips' shift-mask rows. One window per clip: clips / m for the
    fewest chunks m of `clip_chunk_counts` holding at most MAX_CHUNK_SCORES scores each (else 1)."""
    if num_windows > 1:
        return max(c for c in range(1, num_windows + 1) if num_windows % c == 0 and (c * heads <= CHUNK_ROWS or c == 1))
    return next((clips // m for m in clip_chunk_counts(clips) if clips // m * heads * n * n <= MAX_CHUNK_SCORES), 1)


# Up to MAX_UNROLLED_CHUNKS chunks per call, each of at least MIN_UNROLLED_SCORES float32 scores, are unrolled into
# independent ops instead of a loop: XLA:CPU runs independent ops concurrently on its thread pool but a loop body's
# ops one after another, and it runs each small batched dot on one thread, so unrolling is what puts both cores of
# the benchmark host on the attention products. Measured there (benchmarks/window_attention.py, same session):
# stage 1 forward + backward 321 -> 255 ms, stage 2 166 -> 104 ms; the `tiny` step 2.91 -> 2.61 s (16 chunks per
# call in every stage, 8 x 196^2 to 64 x 196^2 scores each). Past either bound the loop keeps compile time in
# check: many tiny chunks (the test suite's 64² clips: 9 x 98^2 scores) gain nothing from running concurrently.
MAX_UNROLLED_CHUNKS = 16
MIN_UNROLLED_SCORES = 1 << 18


def _unrolled(chunks: int, rows: int, n: int) -> bool:
    """Whether `chunks` chunks of `rows` (window, head) pairs of n tokens run as independent ops."""
    return chunks <= MAX_UNROLLED_CHUNKS and rows * n * n >= MIN_UNROLLED_SCORES


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


def _chunked_forward(qkv, bias, mask, scale):
    b, nw, n, _, h, d = qkv.shape
    c = _chunk_windows(nw, h, b, n)

    def chunk(args):
        index, x = args
        q, k, v = _chunk_qkv(x, scale)
        out = jnp.einsum("xqk,xkd->xqd", _chunk_probs(q, k, bias, mask, index, c).astype(v.dtype), v)
        return jnp.transpose(out.reshape(c, h, n, d), (0, 2, 1, 3))  # (c, N, H, D)

    chunks = qkv.reshape(b * nw // c, c, n, 3, h, d)  # windows are major, so chunking is a free reshape
    unroll = _unrolled(chunks.shape[0], c * h, n)
    return _map_chunks(chunk, (jnp.arange(chunks.shape[0]), chunks), unroll).reshape(b, nw, n, h, d)


def _chunked_bwd(scale, residuals, g_out):
    qkv, bias, mask, out = residuals
    b, nw, n, _, h, d = qkv.shape
    c = _chunk_windows(nw, h, b, n)
    m = b * nw // c

    def chunk(g_bias, args):
        index, x, g_o, o = args
        q, k, v = _chunk_qkv(x, scale)
        g, delta = _grad_rows(g_o[None], o[None])  # this chunk as a batch of one clip, in cache
        probs = _chunk_probs(q, k, bias, mask, index, c)
        g_q, g_k, g_v, g_scores = _probs_backward(probs, q, k, v, g.reshape(c * h, n, d), delta.reshape(c * h, n, 1),
                                                  scale)
        g_bias = g_bias + jnp.ones((c,), jnp.float32) @ g_scores.reshape(c, -1)  # window sum as a matmul
        g_x = jnp.stack([y.reshape(c, h, n, d) for y in (g_q, g_k, g_v)], axis=1)  # (c, 3, H, N, D)
        return g_bias, jnp.transpose(g_x, (0, 3, 1, 2, 4))  # (c, N, 3, H, D): the layout qkv came in

    g_bias, g_qkv = _scan_chunks(chunk, jnp.zeros((h * n * n,), jnp.float32),
                                 (jnp.arange(m), qkv.reshape(m, c, n, 3, h, d), g_out.reshape(m, c, n, h, d),
                                  out.reshape(m, c, n, h, d)), _unrolled(m, c * h, n))
    return g_qkv.reshape(qkv.shape), g_bias.reshape(bias.shape).astype(bias.dtype), jnp.zeros_like(mask)


_chunked = _recomputing_vjp(_chunked_forward, _chunked_bwd)


def chunked_attention(qkv: Array, bias: Array, mask: Array | None, scale: float) -> Array:
    """Custom-VJP attention over cache-sized chunks of windows (see the module docstring)."""
    return _chunked(qkv, bias, _as_mask(mask, qkv.shape[2]), scale)


def dot_product_attention(qkv: Array, bias: Array, mask: Array | None, scale: float) -> Array:
    """`jax.nn.dot_product_attention` over B*nW sequences; bias (+ mask) broadcast to (B*nW, H, N, N)."""
    b, nw, n, _, h, d = qkv.shape
    total_bias = bias.astype(jnp.float32)[None]
    if mask is not None:
        total_bias = total_bias + jnp.asarray(mask, jnp.float32)[:, None]
    total_bias = jnp.broadcast_to(total_bias, (b, nw, h, n, n)).reshape(b * nw, h, n, n).astype(qkv.dtype)
    q, k, v = (qkv[:, :, :, i].reshape(b * nw, n, h, d) for i in range(3))  # (batch, seq, heads, dim)
    out = jax.nn.dot_product_attention(q, k, v, bias=total_bias, scale=scale)
    return out.reshape(b, nw, n, h, d)


AttentionFn = Callable[[Array, Array, "Array | None", float], Array]

ATTENTION_IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "einsum": einsum_attention,
    "fused": fused_attention,
    "chunked": chunked_attention,
    "dot_product": dot_product_attention,
}

# "auto" resolves by the backend the model is traced for (measured: benchmarks/window_attention.py).
DEFAULT_BY_BACKEND = {"cpu": "chunked", "gpu": "dot_product", "tpu": "fused"}


CLIP_MAPPED = "per_clip"  # handled by the caller (Clover.encode_video); windows use "fused"
VALID_NAMES = ("auto", *ATTENTION_IMPLEMENTATIONS, CLIP_MAPPED)


def resolve_attention(name: str, backend: str | None = None) -> str:
    """The implementation name `name` stands for ("auto" -> this backend's default)."""
    if name == "auto":
        backend = backend or jax.default_backend()
        return DEFAULT_BY_BACKEND.get(backend, "fused")
    if name not in VALID_NAMES:
        raise ValueError(f"model.attention={name!r}; valid: {', '.join(repr(k) for k in VALID_NAMES)}")
    return name


def window_attention(qkv: Array, bias: Array, mask: np.ndarray | None, *, scale: float, implementation: str
                     ) -> Array:
    """softmax(scale q k^T + bias + mask) v per head, over windows of (B, nW, N, 3, H, D) projections
    (q, k, v stacked on axis 3, as the qkv Dense emits them); returns (B, nW, N, H, D)."""
    name = resolve_attention(implementation)
    return ATTENTION_IMPLEMENTATIONS["fused" if name == CLIP_MAPPED else name](qkv, bias, mask, scale)
