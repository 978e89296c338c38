"""A Dense `dot_general` whose kernel gradient is summed over cache-sized token chunks (the CPU fast path).

The kernel gradient of y = x @ W is x^T g, a contraction over every token. XLA:CPU canonicalises that dot by
transposing a whole (tokens, features) operand in memory first; for Swin's stage-1 activations (about 200k
tokens of the `tiny` step) those strided copies took longer than the matmuls. Summing x_c^T g_c over chunks
of at most ROWS_PER_CHUNK tokens keeps each chunk's transpose in cache: on the 2-core machine of
`benchmarks/` the qkv kernel gradient of stage 1 went from 20 ms to 8 ms in isolation, and the `tiny` step
fell by about 10% together with the layout of `chunked` attention (README, Performance). Where a clip has too
few tokens for such chunks (the late stages), the sum runs over a few chunks of whole clips.

Only the gradient changes; the forward product and the input gradient are those of `lax.dot_general`.
Other backends get the plain dot (GPU and TPU matmul units read transposed operands directly).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from clover_jax.models.clip_groups import clip_chunk_counts

Array = jax.Array

ROWS_PER_CHUNK = 1024  # tokens per chunk: a chunk of 32-128 float32 channels is 128-512 KB, inside L2
MAX_PARTIAL_BYTES = 64 << 20  # bigger (chunks, C, D) partial sums fall back to the plain contraction
# Chunking pays only when a chunk has at least twice as many tokens as the wider of C and D: below that,
# writing and summing the (C, D) partials moves more memory than the whole-operand transpose it avoids
# (measured: `small`'s stage 3, 196 tokens per clip against 1536 channels, was slower chunked).
MIN_ROWS_PER_WIDTH = 2
# Below that (`small`'s stages 2-4: 784, 196 and 64 tokens per clip against 192-3072 channels) the gradient
# is summed over the fewest chunks of whole clips `clip_groups.clip_chunk_counts` allows instead, which XLA:CPU
# runs faster than autodiff's one contraction over every token of the batch. Forward + backward of one unshifted
# block of `small` (16 clips, alternating runs on the benchmark host of `benchmarks/`), before -> after: stage 2
# 270 / 268 -> 236 / 235 ms, stage 3 196 / 198 -> 177 / 172 ms, stage 4 220 / 211 -> 187 / 184 ms.


def _rows_per_chunk(tokens: int) -> int:
    """The largest divisor of `tokens` that is at most ROWS_PER_CHUNK."""
    return max(r for r in range(1, min(tokens, ROWS_PER_CHUNK) + 1) if tokens % r == 0)


def _clip_groups(clips: int) -> int:
    """Chunks of whole clips for the late stages: the fewest `clip_chunk_counts` allows, 0 if none."""
    return min(clip_chunk_counts(clips), default=0)


def kernel_grad(x: Array, g: Array, kernel_dtype) -> Array:
    """sum over every leading axis of x[..., :, None] * g[..., None, :], i.e. x^T g with tokens flattened,
    as (C, D) in `kernel_dtype`. The leading (batch) axis stays a batch axis of the chunked product (chunks
    inside a clip, or whole-clip chunks as many as a multiple of the device count), so a batch sharded over
    devices is summed locally first."""
    c, d = x.shape[-1], g.shape[-1]
    if x.ndim >= 3:
        b, tokens = x.shape[0], math.prod(x.shape[1:-1])
        rows = _rows_per_chunk(tokens)
        chunks = tokens // rows
        if rows >= MIN_ROWS_PER_WIDTH * max(c, d, 32) and b * chunks * c * d * 4 <= MAX_PARTIAL_BYTES:
            partial = jnp.einsum("bnrc,bnrd->bncd", x.reshape(b, chunks, rows, c), g.reshape(b, chunks, rows, d),
                                 preferred_element_type=jnp.float32)
            # the sum over partials as a matmul: XLA:CPU's reduce over the leading axes is far slower
            total = jnp.ones((b * chunks,), jnp.float32) @ partial.reshape(b * chunks, c * d)
            return total.reshape(c, d).astype(kernel_dtype)
        groups = _clip_groups(b)
        if groups and groups * c * d * 4 <= MAX_PARTIAL_BYTES:
            # too few tokens per clip for chunks inside a clip (the late stages): a chunk of b / groups whole clips
            partial = jnp.einsum("nrc,nrd->ncd", x.reshape(groups, -1, c), g.reshape(groups, -1, d),
                                 preferred_element_type=jnp.float32)
            total = jnp.ones((groups,), jnp.float32) @ partial.reshape(groups, c * d)
            return total.reshape(c, d).astype(kernel_dtype)
    # otherwise exactly what autodiff of the plain Dense would emit
    _, kernel_vjp = jax.vjp(lambda kernel: jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))),
                            jnp.zeros((c, d), x.dtype))
    return kernel_vjp(g.astype(x.dtype))[0].astype(kernel_dtype)


@jax.custom_vjp
def _matmul(x: Array, kernel: Array) -> Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, kernel):
    return _matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, g):
    x, kernel = residuals
    g_x = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ()))).astype(x.dtype)
    return g_x, kernel_grad(x, g, kernel.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def token_chunked_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                              preferred_element_type=None) -> Array:
    """`lax.dot_general` for nn.Dense (lhs (..., C) contracted with a (C, D) kernel) whose kernel gradient
    is `kernel_grad`, on the CPU backend; the plain dot elsewhere or for any other contraction."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    dense_like = (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,) and rhs.ndim == 2
                  and not batch[0] and precision is None and preferred_element_type is None)
    if dense_like and jax.default_backend() == "cpu":
        return _matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
