"""A Dense `dot_general` whose kernel gradient is summed over cache-sized token chunks (the CPU kernel).

The kernel gradient of y = x @ W is x^T g, a contraction over every token. XLA:CPU canonicalises that dot by
transposing a whole (tokens, features) operand in memory first; for Swin's stage-1 activations (about 200k
tokens of the `tiny` step) those strided copies took longer than the matmuls. Summing x_c^T g_c over chunks
of at most `CpuTuning.rows_per_chunk` tokens (1024: a chunk of 32-128 float32 channels is 128-512 KB, inside
L2) keeps each chunk's transpose in cache: on the 2-core machine of `benchmarks/` the qkv kernel gradient of
stage 1 went from 20 ms to 8 ms in isolation, and the `tiny` step fell by about 10% together with the layout
of `chunked` attention.

Chunking inside a clip pays only when a chunk has at least `min_rows_per_width` (2) times as many tokens as the
wider of C and D: below that, writing and summing the (C, D) partials moves more memory than the transpose it
avoids (`small`'s stage 3, 196 tokens per clip against 1536 channels, was slower chunked). There (`small`'s
stages 2-4: 784, 196 and 64 tokens per clip) the gradient is summed over the fewest chunks of whole clips
`clip_chunks.clip_chunk_counts` allows instead. Forward + backward of one unshifted block of `small` (16
clips, alternating runs), before -> after: stage 2 270 / 268 -> 236 / 235 ms, stage 3 196 / 198 -> 177 / 172
ms, stage 4 220 / 211 -> 187 / 184 ms. Partial sums above `max_partial_bytes` fall back to one contraction.

Only the gradient changes; the forward product and the input gradient are those of `lax.dot_general`.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from clover_jax.kernels.cpu.clip_chunks import clip_chunk_counts
from clover_jax.kernels.execution import ExecutionPolicy

Array = jax.Array
SCOPE = "cpu_token_chunked_grad"  # name scope of the kernel gradient's ops (tests look for it)


def rows_per_chunk(tokens: int, limit: int) -> int:
    """The largest divisor of `tokens` that is at most `limit`."""
    return max(r for r in range(1, min(tokens, limit) + 1) if tokens % r == 0)


def whole_clip_chunks(clips: int, policy: ExecutionPolicy) -> int:
    """Chunks of whole clips for the late stages: the fewest `clip_chunk_counts` allows, 0 if none."""
    return min(clip_chunk_counts(clips, policy.devices, policy.cpu.min_clip_chunks), default=0)


def kernel_grad(x: Array, g: Array, kernel_dtype, policy: ExecutionPolicy) -> Array:
    """sum over every leading axis of x[..., :, None] * g[..., None, :], i.e. x^T g with tokens flattened,
    as (C, D) in `kernel_dtype`. The leading (batch) axis stays a batch axis of the chunked product (chunks
    inside a clip, or whole-clip chunks as many as a multiple of the device count), so a batch sharded over
    devices is summed locally first."""
    c, d = x.shape[-1], g.shape[-1]
    tuning = policy.cpu
    if x.ndim >= 3:
        b, tokens = x.shape[0], math.prod(x.shape[1:-1])
        rows = rows_per_chunk(tokens, tuning.rows_per_chunk)
        chunks = tokens // rows
        if rows >= tuning.min_rows_per_width * max(c, d, 32) and b * chunks * c * d * 4 <= tuning.max_partial_bytes:
            partial = jnp.einsum("bnrc,bnrd->bncd", x.reshape(b, chunks, rows, c), g.reshape(b, chunks, rows, d),
                                 preferred_element_type=jnp.float32)
            # the sum over partials as a matmul: XLA:CPU's reduce over the leading axes is far slower
            total = jnp.ones((b * chunks,), jnp.float32) @ partial.reshape(b * chunks, c * d)
            return total.reshape(c, d).astype(kernel_dtype)
        groups = whole_clip_chunks(b, policy)
        if groups and groups * c * d * 4 <= tuning.max_partial_bytes:
            # too few tokens per clip for chunks inside a clip (the late stages): a chunk of b / groups whole clips
            partial = jnp.einsum("nrc,nrd->ncd", x.reshape(groups, -1, c), g.reshape(groups, -1, d),
                                 preferred_element_type=jnp.float32)
            total = jnp.ones((groups,), jnp.float32) @ partial.reshape(groups, c * d)
            return total.reshape(c, d).astype(kernel_dtype)
    # otherwise exactly what autodiff of the plain Dense would emit
    _, kernel_vjp = jax.vjp(lambda kernel: jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))),
                            jnp.zeros((c, d), x.dtype))
    return kernel_vjp(g.astype(x.dtype))[0].astype(kernel_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: Array, kernel: Array, policy: ExecutionPolicy) -> Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, kernel, policy):
    return _matmul(x, kernel, policy), (x, kernel)


def _matmul_bwd(policy, residuals, g):
    x, kernel = residuals
    g_x = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ()))).astype(x.dtype)
    with jax.named_scope(SCOPE):
        return g_x, kernel_grad(x, g, kernel.dtype, policy)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def token_chunked_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                              preferred_element_type=None, *, policy: ExecutionPolicy) -> Array:
    """`lax.dot_general` for nn.Dense (lhs (..., C) contracted with a (C, D) kernel) whose kernel gradient
    is `kernel_grad`; the plain dot for any other contraction."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    dense_like = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
                  and not batch[0] and precision is None and preferred_element_type is None)
    if dense_like:
        return _matmul(lhs, rhs, policy)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
