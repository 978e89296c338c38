"""Retrieval on the device mesh: the gallery stays sharded over every device, queries go in blocks, and top-k
lists and ranks are exact, equal to `retrieval.py`'s numpy ranking (the reference the tests compare with).

The gallery's rows (L2-normalised as in `retrieval.l2_normalize`) are split over all devices of the mesh,
padded to a multiple of the device count; padding rows have id -1 and never count. For each block of queries
(replicated), every device scores the block against its own rows only, then
  * top-k: each device keeps its best k (ties: lower index), the k-lists are all-gathered and merged by
    (score descending, index ascending): the first k of a full stable sort, whatever the device count;
  * ranks: a query's positive score is the max over its own rows (pmax over devices); each device counts its
    rows scoring STRICTLY above it and the counts are summed (psum). 1 + that sum is the reference's rank,
    with its tie rule (a tie with the positive never pushes it down). Rows whose float32 score lies within
    float32's error bound of the positive's are re-scored in double-float (`compensated_scores`), the positive
    too, so ranks are those of the exact cosines of the float32 rows (the reference computes them in float64)
    whatever the device count, shard layout or matmul kernel. A device re-scores up to `near_slots` such rows
    per query; queries with more run again, alone, with enough slots.
Top-k orders by the float32 cosines. A device holds its shard, one (block, shard rows) score matrix and the near
rows of a few queries at a time, never the whole gallery or similarity matrix; the host receives (block, k) lists
and (block,) ranks. The queries may be host rows or a sharded gallery themselves (the evaluator's captions and
clips): then each block of its rows is gathered onto every device in turn, and no process ever holds either side
whole (`mesh_gallery.py`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clover_jax.evaluators import compensated_scores, retrieval
from clover_jax.evaluators.mesh_gallery import (  # noqa: F401  (the gallery builders are this module's API too)
    ShardedGallery,
    _axes,
    _normalize_f32,
    gallery_from_local,
    row_values,
    shard_gallery,
    shard_gallery_from_reader,
)

DEFAULT_QUERY_BLOCK = 1024
# One block's per-device (queries, shard rows) float32 score matrix stays under 2**25 floats (128 MiB): the query
# block shrinks (down to 8 rows) as the shard grows.
SCORE_BUDGET = 1 << 25
# Rows per query and device re-scored in double-float on the first pass (near the positive's score), and the
# most gathered floats (queries * slots * dim) per device that re-scoring holds at once.
NEAR_SLOTS = 16
NEAR_BUDGET = 1 << 21
_IN_FLIGHT = 2  # query blocks dispatched ahead of the one read back (bounds the replicated query copies)


# ---- per-device programs (inside shard_map: q is the replicated block, g / ids / labels the local shard) ----

def _scores(q: jax.Array, g: jax.Array) -> jax.Array:
    return jax.lax.dot_general(q, g, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST,
                               preferred_element_type=jnp.float32)


def _block_top_k(q: jax.Array, g: jax.Array, ids: jax.Array, *, k: int, local_k: int, axes: tuple[str, ...]
                 ) -> tuple[jax.Array, jax.Array]:
    s = _scores(q, g)
    # XLA sorts floats in total order (-0.0 before 0.0); numpy's ordering sees one value, so fold the zeros.
    s = jnp.where(ids[None, :] < 0, -jnp.inf, jnp.where(s == 0, 0.0, s))
    values, rows = jax.lax.top_k(s, local_k)  # equal values: lower row first
    values = jax.lax.all_gather(values, axes, axis=1, tiled=True, to="invarying")
    index = jax.lax.all_gather(jnp.take(ids, rows), axes, axis=1, tiled=True, to="invarying")
    neg, index = jax.lax.sort((-values, index), dimension=1, num_keys=2)
    return -neg[:, :k], index[:, :k]


def _rescored_near_rows(q: jax.Array, s: jax.Array, near: jax.Array, own: jax.Array, g: jax.Array,
                        near_slots: int) -> tuple[tuple[jax.Array, jax.Array], jax.Array, jax.Array]:
    """((hi, lo) double-float scores, picked, picked and own) of the first `near_slots` near rows of each query,
    (queries, near_slots) each; `picked` is False on slots beyond a query's near rows."""
    _, cols = jax.lax.top_k(jnp.where(near, 1.0, 0.0), near_slots)  # equal keys: lower row first
    picked = jnp.take_along_axis(near, cols, axis=1)
    exact = compensated_scores.dot(q[:, None, :], jnp.take(g, cols, axis=0))
    return exact, picked, picked & jnp.take_along_axis(own, cols, axis=1)


def _block_ranks(q: jax.Array, q_label: jax.Array, g: jax.Array, g_label: jax.Array, *, axes: tuple[str, ...],
                 near_slots: int) -> tuple[jax.Array, jax.Array]:
    """(ranks, near) of a query block: near is the most near rows any device found for each query; a query
    with more than `near_slots` gets a rank that is not exact (the caller runs it again with more slots)."""
    # The barrier keeps one materialised score matrix (fused into several consumers the dot could be computed
    # more than once, by kernels that round differently).
    s = jax.lax.optimization_barrier(_scores(q, g))
    valid = (g_label >= 0)[None, :]
    owns = lambda label: g_label[None, :] == label[:, None]  # noqa: E731
    estimate = jax.lax.pmax(jnp.max(jnp.where(owns(q_label), s, -jnp.inf), axis=1), axes)[:, None]
    # |float32 - exact| <= bound for every score, the positive's estimate included: a row more than twice
    # that above the estimate is above the positive, one more than twice below is not; the rest are near.
    margin = 2.0 * compensated_scores.float32_error_bound(q.shape[-1])
    is_near = lambda s, estimate: (jnp.abs(s - estimate) <= margin) & valid  # noqa: E731
    surely_above = jnp.sum((s > estimate + margin) & valid, axis=1, dtype=jnp.int32)
    near_here = jnp.sum(is_near(s, estimate), axis=1, dtype=jnp.int32)
    near_total = jax.lax.psum(near_here, axes)

    sub_block = _sub_block(q.shape[0], near_slots, q.shape[1])

    def rescore(start: jax.Array) -> tuple[Any, ...]:  # `sub_block` queries: within NEAR_BUDGET floats
        q_, s_, estimate_, label, total = (jax.lax.dynamic_slice_in_dim(x, start, sub_block)  # slices, not copies
                                           for x in (q, s, estimate, q_label, near_total))
        run = lambda: _rescored_near_rows(q_, s_, is_near(s_, estimate_), owns(label), g, near_slots)  # noqa: E731
        # A query whose one near row (over all devices) is its positive ranks by the float32 counts alone; the
        # condition is the same on every device (a psum), so all skip or none.
        skip = lambda: jax.tree.map(jnp.zeros_like, jax.eval_shape(run))  # noqa: E731
        return jax.lax.cond(jnp.any(total > 1), run, skip)

    starts = jnp.arange(0, q.shape[0], sub_block, dtype=jnp.int32)
    exact, picked, picked_own = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), jax.lax.map(rescore, starts))
    best_hi = jax.lax.pmax(jnp.max(jnp.where(picked_own, exact[0], -jnp.inf), axis=1), axes)[:, None]
    best_lo = jax.lax.pmax(jnp.max(jnp.where(picked_own & (exact[0] == best_hi), exact[1], -jnp.inf), axis=1),
                           axes)[:, None]
    near_above = jnp.sum(picked & compensated_scores.greater(exact, (best_hi, best_lo)), axis=1, dtype=jnp.int32)
    return 1 + jax.lax.psum(surely_above + near_above, axes), jax.lax.pmax(near_here, axes)


def _sub_block(block: int, near_slots: int, dim: int) -> int:
    """The most queries (a divisor of `block`) whose gathered near rows fit NEAR_BUDGET floats."""
    sub = max(1, min(block, NEAR_BUDGET // (near_slots * dim)))
    while block % sub:
        sub -= 1
    return sub


@functools.lru_cache(maxsize=64)
def _top_k_fn(mesh: Mesh, k: int, local_k: int) -> Callable:
    axes = _axes(mesh)
    body = functools.partial(_block_top_k, k=k, local_k=local_k, axes=axes)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axes, None), P(axes)), out_specs=(P(), P())))


@functools.lru_cache(maxsize=64)
def _ranks_fn(mesh: Mesh, near_slots: int) -> Callable:
    axes = _axes(mesh)
    body = functools.partial(_block_ranks, axes=axes, near_slots=near_slots)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(axes, None), P(axes)),
                                 out_specs=(P(), P())))


# ---- host side: query blocks in, small results out ----

def query_block_size(num_queries: int, rows_per_device: int, query_block: int | None = None) -> int:
    """Rows per query block: a power of two from 8 (few distinct compiles for a search service), at most
    `query_block` (default: 1024, less where the per-device score matrix would pass SCORE_BUDGET)."""
    if query_block is not None and query_block < 1:
        raise ValueError(f"query_block must be >= 1, got {query_block}")
    cap = query_block or max(8, min(DEFAULT_QUERY_BLOCK, SCORE_BUDGET // max(rows_per_device, 1)))
    block = 8
    while block < num_queries and block < cap:
        block *= 2
    return min(block, cap)


def _check_queries(gallery: ShardedGallery, queries: np.ndarray | jax.Array | ShardedGallery
                   ) -> np.ndarray | ShardedGallery:
    if isinstance(queries, ShardedGallery):
        if queries.dim != gallery.dim or queries.mesh != gallery.mesh:
            raise ValueError(f"query rows must be {gallery.dim}-dim on the gallery's mesh, got {queries.dim}-dim")
        return queries
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != gallery.dim:
        raise ValueError(f"queries must be (Q, {gallery.dim}) to match the gallery, got shape {queries.shape}")
    if queries.shape[0] and not np.issubdtype(queries.dtype, np.floating):
        raise ValueError(f"queries must be a float array, got dtype {queries.dtype}")
    if not np.all(np.isfinite(queries)):
        raise ValueError("queries contain NaN or inf: fix the embedding step before searching")
    return queries


def _num_queries(queries: np.ndarray | ShardedGallery) -> int:
    return queries.num_valid if isinstance(queries, ShardedGallery) else int(queries.shape[0])


def _replicated(host: np.ndarray, mesh: Mesh) -> jax.Array:
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda index: host[index])


def _padded(x: np.ndarray, rows: int, value: Any) -> np.ndarray:
    return np.concatenate([x, np.full((rows - len(x),) + x.shape[1:], value, x.dtype)]) if len(x) < rows else x


@functools.lru_cache(maxsize=64)
def _gather_fn(mesh: Mesh, fills: tuple[Any, ...]) -> Callable:
    """(positions, *row arrays) -> those rows of each, replicated on every device; a position past the end
    gives a row of the array's fill value. Each device gathers from its own shard and the rows are summed over
    the devices: no device receives a whole sharded array (a dynamic slice of one would all-gather it)."""
    def gather(positions: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(jnp.take(x, positions, axis=0, mode="fill", fill_value=fill) for x, fill in zip(xs, fills))
    return jax.jit(gather, out_shardings=NamedSharding(mesh, P()))


def _map_blocks(run: Callable[..., Any], mesh: Mesh, block: int, queries: np.ndarray | ShardedGallery,
                labels: np.ndarray | jax.Array | None = None, positions: np.ndarray | None = None
                ) -> list[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """`run(query block[, label block])` over the query rows in blocks, a few blocks in flight: for each block,
    its rows' positions and the host results led by their query ids. Host queries are normalised here; rows of a
    sharded query gallery (already normalised) are gathered block by block onto every device, `labels` then laid
    out as its rows. `positions`: only these rows (of the sharded array, or of the host queries)."""
    pending: list[tuple[np.ndarray, Any, Any]] = []
    results: list[tuple[np.ndarray, tuple[np.ndarray, ...]]] = []

    def read(where: np.ndarray, ids: Any, out: Any) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        ids = np.asarray(ids.addressable_data(0)) if isinstance(ids, jax.Array) else ids
        keep = (ids >= 0) & (where >= 0)
        outs = tuple(np.asarray(x.addressable_data(0))[keep] for x in jax.tree.leaves(out))
        return where[keep], (ids[keep],) + outs

    sharded = isinstance(queries, ShardedGallery)
    total = queries.embeddings.shape[0] if sharded else len(queries)
    todo = np.arange(total) if positions is None else np.asarray(positions)
    block = min(block, len(todo)) if sharded else block
    for start in range(0, len(todo), block):
        where = _padded(todo[start:start + block], block, -1)
        if sharded:  # padding rows: gathered from past the end (id -1, label -2: they own no row)
            rows = [queries.embeddings, queries.ids] + ([labels] if labels is not None else [])
            fills = (0.0, -1) + ((-2,) if labels is not None else ())
            q, ids, *y = _gather_fn(mesh, fills)(np.where(where >= 0, where, total).astype(np.int32), *rows)
            args = [q, *y]
        else:
            picked = todo[start:start + block]
            q = _padded(_normalize_f32(queries[picked]), block, 0.0)
            ids = _padded(picked, block, -1)
            args = [_replicated(q, mesh)]
            if labels is not None:  # padding queries own no row (-2 is neither a label nor the padding id)
                args.append(_replicated(_padded(labels[picked], block, -2), mesh))
        pending.append((where, ids, run(*args)))
        if len(pending) > _IN_FLIGHT:
            results.append(read(*pending.pop(0)))
    results += [read(*p) for p in pending]
    return results


def _in_query_order(parts: list[tuple[np.ndarray, tuple[np.ndarray, ...]]], num_queries: int, column: int
                    ) -> np.ndarray:
    first = parts[0][1][column]
    out = np.zeros((num_queries,) + first.shape[1:], first.dtype)
    for _, part in parts:
        out[part[0]] = part[column]
    return out


def top_k(gallery: ShardedGallery, queries: np.ndarray | jax.Array | ShardedGallery, k: int, *,
          query_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k) float32 cosines, indices (Q, k) int64 gallery rows) of each query's k most similar rows,
    most similar first; equal scores in ascending row order (so also which of a tie at place k gets in).
    `queries` may be a sharded gallery itself (results in the order of its ids)."""
    queries = _check_queries(gallery, queries)
    if not 1 <= k <= gallery.num_valid:
        raise ValueError(f"k must be in [1, {gallery.num_valid}] (the gallery's size), got {k}")
    num = _num_queries(queries)
    if num == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    fn = _top_k_fn(gallery.mesh, k, min(k, gallery.rows_per_device))
    block = query_block_size(num, gallery.rows_per_device, query_block)
    parts = _map_blocks(lambda q: fn(q, gallery.embeddings, gallery.ids), gallery.mesh, block, queries)
    return _in_query_order(parts, num, 1), _in_query_order(parts, num, 2).astype(np.int64)


def _check_labels(values: np.ndarray, size: int, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (size,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{name} must be ({size},) ints, got {values.dtype} {values.shape}")
    return values


def ranks(gallery: ShardedGallery, queries: np.ndarray | jax.Array | ShardedGallery, positives: np.ndarray,
          gallery_labels: np.ndarray | None = None, *, query_block: int | None = None) -> np.ndarray:
    """(Q,) int64 1-based rank of each query's best positive: 1 + the number of gallery rows scoring strictly
    above the highest-scoring row whose label is `positives[i]`. `gallery_labels` (N,) int by gallery id,
    default the id (one positive per query); `positives` by query id. A query whose label no row has gets
    rank 1 + N. `queries` may be a sharded gallery itself."""
    queries = _check_queries(gallery, queries)
    num = _num_queries(queries)
    positives = _check_labels(positives, num, "positives").astype(np.int32)
    if gallery_labels is None:
        labels = gallery.ids
    else:
        gallery_labels = _check_labels(gallery_labels, gallery.num_valid, "gallery_labels")
        if gallery_labels.min() < 0:
            raise ValueError("gallery_labels must be >= 0 (negative labels mark padding rows)")
        labels = row_values(gallery, gallery_labels)
    if num == 0:
        return np.zeros(0, np.int64)
    if isinstance(queries, ShardedGallery):
        positives = row_values(queries, positives, pad=-2)
    out = np.zeros(num, np.int64)
    passes = [(min(NEAR_SLOTS, gallery.rows_per_device), None)]  # (near slots, query positions: None = all)
    while passes:
        slots, positions = passes.pop(0)
        block = query_block_size(num if positions is None else len(positions), gallery.rows_per_device,
                                 query_block)
        fn = _ranks_fn(gallery.mesh, slots)
        parts = _map_blocks(lambda q, y: fn(q, y, gallery.embeddings, labels), gallery.mesh, block, queries,
                            positives, positions)
        where, ids, rank, near = (np.concatenate(x) for x in zip(*[(w, *r) for w, r in parts]))
        out[ids] = rank
        # Queries with more near rows than slots run again, grouped by the power of two of slots they need (a
        # whole shard never overflows).
        over = near > slots
        need = np.minimum(1 << np.ceil(np.log2(near[over])).astype(np.int64), gallery.rows_per_device)
        passes += [(int(n), where[over][need == n]) for n in np.unique(need)]
    return out


def retrieval_metrics_on_mesh(video_emb: np.ndarray, text_emb: np.ndarray, text_to_video: np.ndarray, mesh: Mesh,
                              *, query_block: int | None = None) -> dict[str, float]:
    """`retrieval.retrieval_metrics` (same keys, same values) with each gallery sharded over `mesh`: videos for
    text->video, captions (labelled by their video) for video->text. Float32 inputs rank exactly as there."""
    video_emb, text_emb, text_to_video = retrieval.check_pairs(video_emb, text_emb, text_to_video)
    retrieval.check_captions(text_to_video, video_emb.shape[0])
    videos = shard_gallery(video_emb, mesh)
    t2v = ranks(videos, text_emb, text_to_video, query_block=query_block)
    del videos  # frees its device buffers before the caption gallery is placed
    texts = shard_gallery(text_emb, mesh)
    v2t = ranks(texts, video_emb, np.arange(video_emb.shape[0]), text_to_video, query_block=query_block)
    return retrieval.metrics_from_ranks(t2v, v2t)


def retrieval_metrics_of_galleries(videos: ShardedGallery, texts: ShardedGallery, text_to_video: np.ndarray, *,
                                   query_block: int | None = None) -> dict[str, float]:
    """`retrieval_metrics_on_mesh` of two sharded galleries (e.g. `gallery_from_local`'s), each the other's
    queries: no process holds either whole, only `text_to_video` (by caption id) and the ranks."""
    text_to_video = _check_labels(text_to_video, texts.num_valid, "text_to_video")
    if text_to_video.size and (text_to_video.min() < 0 or text_to_video.max() >= videos.num_valid):
        raise ValueError(f"text_to_video has indices outside [0, {videos.num_valid})")
    retrieval.check_captions(text_to_video, videos.num_valid)
    t2v = ranks(videos, texts, text_to_video, query_block=query_block)
    v2t = ranks(texts, videos, np.arange(videos.num_valid), text_to_video, query_block=query_block)
    return retrieval.metrics_from_ranks(t2v, v2t)


def block_memory(gallery: ShardedGallery, num_queries: int, k: int | None = None,
                 query_block: int | None = None) -> dict[str, int]:
    """Per-device bytes of one query block's compiled program (XLA's memory_analysis): `argument` (shard,
    ids/labels, block), `output`, `temp`, and `block` rows; top-k with k, else ranks' first pass. Compiles, runs
    nothing."""
    slots = min(NEAR_SLOTS, gallery.rows_per_device)
    block = query_block_size(num_queries, gallery.rows_per_device, query_block)
    replicated = NamedSharding(gallery.mesh, P())
    q = jax.ShapeDtypeStruct((block, gallery.dim), jnp.float32, sharding=replicated)
    if k is None:
        y = jax.ShapeDtypeStruct((block,), jnp.int32, sharding=replicated)
        lowered = _ranks_fn(gallery.mesh, slots).lower(q, y, gallery.embeddings, gallery.ids)
    else:
        lowered = _top_k_fn(gallery.mesh, k, min(k, gallery.rows_per_device)).lower(q, gallery.embeddings,
                                                                                      gallery.ids)
    m = lowered.compile().memory_analysis()
    return dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                temp=int(m.temp_size_in_bytes), block=block)
