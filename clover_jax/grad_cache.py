"""Gradient caching: the exact value and gradient of a global-batch contrastive loss, computed in k chunks.

A contrastive loss couples every row of the global batch, so a plain gradient-accumulation loop cannot
split it. Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup") splits the step into three phases:
  1. forward each chunk without keeping activations, collecting only the embeddings the loss reads;
  2. the loss on the concatenated global embeddings and its gradient w.r.t. those embeddings;
  3. re-run each chunk under `jax.vjp` with the embedding gradients as cotangents, summing the
     parameter gradients over chunks.
Peak activation memory is that of one chunk; the cost is one extra forward pass. Losses that are means
over examples (Clover's MLM) ride along: each chunk returns its sum, divided by the global count.

Chunking keeps every chunk spread over all data-parallel devices without communication: chunk j holds
rows j, j+k, j+2k, ... of the batch, so with contiguous rows per device each device owns B/(k*D) rows of
every chunk. Embeddings are put back in the original row order before the loss.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Embeddings = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Metrics]]  # (params, batch, rng) -> (loss, metrics)
ValueAndGradFn = Callable[[Any, Any, jax.Array], tuple[tuple[jax.Array, Metrics], Any]]


class EmbeddingLoss(NamedTuple):
    """A loss written as `loss(embed(params, batch, rng))`, the form gradient caching needs.

    embed(params, batch, rng) -> (embeddings {name: (rows, E)}, per-example loss summed over the rows).
      Row i of every embedding depends only on row i of the batch (and the rng).
    normalizer(batch) -> the positive scalar the per-example sum is divided by (e.g. the number of
      labelled positions of the whole batch), computed from the global batch.
    loss(embeddings, per_example_mean) -> (loss, metrics) on global-batch embeddings.
    prepare(batch) -> the batch with per-row inputs that depend on the whole global batch (e.g. per-row loss
      weights), added before it is split into chunks; the identity by default.
    """

    embed: Callable[[Any, Any, jax.Array], tuple[Embeddings, jax.Array]]
    normalizer: Callable[[Any], jax.Array]
    loss: Callable[[Embeddings, jax.Array], tuple[jax.Array, Metrics]]
    prepare: Callable[[Any], Any] = lambda batch: batch


def plain_loss_fn(objective: EmbeddingLoss) -> LossFn:
    """`(params, batch, rng) -> (loss, metrics)` on the whole batch at once (k = 1)."""

    def loss_fn(params: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        batch = objective.prepare(batch)
        embeddings, per_example_sum = objective.embed(params, batch, rng)
        return objective.loss(embeddings, per_example_sum / objective.normalizer(batch))

    return loss_fn


def check_microbatches(global_batch: int, microbatches: int, num_data_replicas: int) -> None:
    """Raises ValueError unless `microbatches` is a positive int splitting the batch into equal chunks
    that each still divide evenly over the data-parallel replicas."""
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"microbatches={microbatches!r} must be a positive integer")
    if global_batch % microbatches:
        raise ValueError(f"microbatches={microbatches} does not divide the global batch size {global_batch}")
    chunk = global_batch // microbatches
    if chunk % num_data_replicas:
        raise ValueError(
            f"microbatches={microbatches} makes chunks of {chunk} rows (global batch {global_batch}), not "
            f"divisible by the {num_data_replicas} data-parallel replicas; need global batch divisible by "
            f"microbatches x replicas = {microbatches * num_data_replicas}"
        )


def to_chunks(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B/k, ...) where chunk j holds rows j, j+k, j+2k, ... (shard-local, see module doc)."""
    chunks = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(chunks, (None, "batch") + (None,) * (x.ndim - 1))


def from_chunks(chunks: jax.Array) -> jax.Array:
    """Inverse of `to_chunks`: (k, B/k, ...) -> (B, ...) in the original row order."""
    k, rows = chunks.shape[:2]
    x = jnp.swapaxes(chunks, 0, 1).reshape(k * rows, *chunks.shape[2:])
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def chunked_loss_fn(objective: EmbeddingLoss, microbatches: int) -> Callable[[Any, Any, jax.Array],
                                                                               tuple[jax.Array, Metrics]]:
    """The loss `value_and_grad(objective, microbatches)` differentiates, as a plain differentiable function:
    chunk j embedded with rng `fold_in(rng, j)`. Keeps every chunk's activations (a reference for tests)."""

    def loss_fn(params: Any, batch: Any, rng: jax.Array) -> tuple[jax.Array, Metrics]:
        batch = objective.prepare(batch)
        chunks = jax.tree.map(lambda x: to_chunks(x, microbatches), batch)
        embed = lambda xs: objective.embed(params, xs[0], jax.random.fold_in(rng, xs[1]))  # noqa: E731
        embeddings, sums = jax.lax.map(embed, (chunks, jnp.arange(microbatches)))
        embeddings = jax.tree.map(from_chunks, embeddings)
        return objective.loss(embeddings, jnp.sum(sums) / objective.normalizer(batch))

    return loss_fn


def value_and_grad(objective: EmbeddingLoss, microbatches: int) -> ValueAndGradFn:
    """`(params, batch, rng) -> ((loss, metrics), grads)` of the objective over the global batch, run as
    `microbatches` chunks (a drop-in for `jax.value_and_grad(loss_fn, has_aux=True)`; see the module doc).

    Chunk j's dropout rng is `fold_in(rng, j)` in both forward passes, so the recomputation is exact and
    the result equals the gradient of `chunked_loss_fn`. With dropout on, these masks differ from the
    ones the whole-batch loss draws from `rng` (same distribution, other samples); with dropout off the
    value and gradient equal the whole-batch ones up to float summation order. microbatches=1 is plain
    `jax.value_and_grad` of `plain_loss_fn`.
    """
    if microbatches == 1:
        return jax.value_and_grad(plain_loss_fn(objective), has_aux=True)

    def value_and_grad_fn(params: Any, batch: Any, rng: jax.Array) -> tuple[tuple[jax.Array, Metrics], Any]:
        k = microbatches
        batch = objective.prepare(batch)
        chunks = jax.tree.map(lambda x: to_chunks(x, k), batch)
        chunk_ids = jnp.arange(k)

        def embed_chunk(p: Any, chunk: Any, j: jax.Array) -> tuple[Embeddings, jax.Array]:
            return objective.embed(p, chunk, jax.random.fold_in(rng, j))

        # Phase 1: forward only; nothing is kept for a backward pass.
        def forward(carry: None, xs: tuple[Any, jax.Array]) -> tuple[None, tuple[Embeddings, jax.Array]]:
            return carry, embed_chunk(params, *xs)

        _, (chunk_embeddings, chunk_sums) = jax.lax.scan(forward, None, (chunks, chunk_ids))

        # Phase 2: the global loss and its gradient w.r.t. the embeddings and the per-example mean.
        normalizer = objective.normalizer(batch)
        embeddings = jax.tree.map(from_chunks, chunk_embeddings)
        (loss, metrics), (d_embeddings, d_mean) = jax.value_and_grad(objective.loss, argnums=(0, 1), has_aux=True)(
            embeddings, jnp.sum(chunk_sums) / normalizer)
        d_chunk_embeddings = jax.tree.map(lambda g: to_chunks(g, k), d_embeddings)
        d_sum = d_mean / normalizer

        # Phase 3: backpropagate each chunk's cotangents through its recomputed forward.
        def backward(grads: Any, xs: tuple[Any, jax.Array, Embeddings]) -> tuple[Any, None]:
            chunk, j, d_chunk = xs
            _, pullback = jax.vjp(lambda p: embed_chunk(p, chunk, j), params)
            (chunk_grads,) = pullback((d_chunk, d_sum))
            return jax.tree.map(jnp.add, grads, chunk_grads), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(backward, zeros, (chunks, chunk_ids, d_chunk_embeddings))
        return (loss, metrics), grads

    return value_and_grad_fn
