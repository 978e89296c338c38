"""Retrieval on the device mesh: the gallery stays sharded over every device, queries go in blocks, and top-k
lists and ranks are exact, equal to `retrieval.py`'s numpy ranking (the reference the tests compare with).

The gallery's rows (L2-normalised as in `retrieval.l2_normalize`) are split over all devices of the mesh,
padded to a multiple of the device count; padding rows have id -1 and never count. For each block of queries
(replicated), every device scores the block against its own rows only, then
  * top-k: each device keeps its best k (ties: lower index), the k-lists are all-gathered and merged by
    (score descending, index ascending): the first k of a full stable sort, whatever the device count;
  * ranks: a query's positive score is the max over its own rows (pmax over devices); each device counts its
    rows scoring STRICTLY above it and the counts are summed (psum). 1 + that sum is the reference's rank,
    with its tie rule (a tie with the positive never pushes it down).
A device holds its shard and one (block, shard rows) score matrix, never the whole gallery or similarity
matrix; the host receives (block, k) lists and (block,) ranks. Scores are float32 cosines.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clover_jax.evaluators import retrieval

DEFAULT_QUERY_BLOCK = 1024
# One block's per-device (queries, shard rows) float32 score matrix stays under 2**25 floats (128 MiB): the query
# block shrinks (down to 8 rows) as the shard grows.
SCORE_BUDGET = 1 << 25
_IN_FLIGHT = 2  # query blocks dispatched ahead of the one read back (bounds the replicated query copies)


@dataclasses.dataclass(frozen=True)
class ShardedGallery:
    """Unit-norm gallery rows split over every device of `mesh` (row i of the padded array lives on device
    i // rows_per_device, in mesh order)."""
    embeddings: jax.Array  # (num_devices * rows_per_device, E) float32; padding rows are zero
    ids: jax.Array  # (same rows,) int32: the row's index in the caller's gallery, -1 on padding rows
    num_valid: int
    mesh: Mesh

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def rows_per_device(self) -> int:
        return int(self.embeddings.shape[0]) // self.mesh.size


def _axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def _row_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(_axes(mesh), *([None] * (ndim - 1))))


def _padded_rows(n: int, mesh: Mesh) -> int:
    return -(-n // mesh.size) * mesh.size


def _put_rows(host: np.ndarray, mesh: Mesh, pad_value: Any, transform: Callable[[np.ndarray], np.ndarray]
              = lambda x: x) -> jax.Array:
    """Rows of a host array split over the mesh, padded with `pad_value`; `transform` runs per shard (so a
    memory-mapped gallery is read, and normalised, one shard at a time)."""
    n, padded = host.shape[0], _padded_rows(host.shape[0], mesh)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(padded)
        rows = transform(np.asarray(host[start:min(stop, n)]))
        out = np.full((stop - start,) + rows.shape[1:], pad_value, rows.dtype)
        out[:len(rows)] = rows
        return out

    dtype = transform(np.asarray(host[:1])).dtype
    return jax.make_array_from_callback((padded,) + host.shape[1:], _row_sharding(mesh, host.ndim), shard, dtype)


def _ids(n: int, mesh: Mesh) -> jax.Array:
    return _put_rows(np.arange(n, dtype=np.int32), mesh, -1)


def _normalize_f32(x: np.ndarray) -> np.ndarray:
    return retrieval.l2_normalize(x).astype(np.float32, copy=False)


def _device_gallery(x: jax.Array, mesh: Mesh) -> tuple[jax.Array, jax.Array, bool]:
    """(normalised padded rows, ids, all finite) of a device array, computed on the devices."""
    n, padded = x.shape[0], _padded_rows(x.shape[0], mesh)

    def build(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = jnp.pad(x.astype(jnp.float32), ((0, padded - n), (0, 0)))
        norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        ids = jnp.arange(padded, dtype=jnp.int32)
        return x / jnp.maximum(norm, 1e-8), jnp.where(ids < n, ids, -1), jnp.all(jnp.isfinite(x))

    out = (_row_sharding(mesh, 2), _row_sharding(mesh, 1), NamedSharding(mesh, P()))
    emb, ids, finite = jax.jit(build, out_shardings=out)(x)
    return emb, ids, bool(np.asarray(finite.addressable_data(0)))


def shard_gallery(embeddings: np.ndarray | jax.Array, mesh: Mesh) -> ShardedGallery:
    """(N, E) embeddings (any scale; rows are L2-normalised) split by rows over every device of `mesh`.

    A numpy array (or np.memmap) is normalised on the host one shard at a time, with the very function the
    reference uses; a jax.Array is normalised on its devices (one committed to other devices than the mesh's goes
    through the host). Every process passes the same gallery.
    """
    if (isinstance(embeddings, jax.Array) and getattr(embeddings, "committed", False)
            and set(embeddings.devices()) != set(mesh.devices.flat)):
        embeddings = np.asarray(embeddings)
    if isinstance(embeddings, jax.Array):
        if embeddings.ndim != 2 or embeddings.shape[0] == 0 or not jnp.issubdtype(embeddings.dtype, jnp.floating):
            raise ValueError(f"gallery must be a non-empty (N, E) float array, got {embeddings.dtype} "
                             f"{embeddings.shape}")
        emb, ids, finite = _device_gallery(embeddings, mesh)
        if not finite:
            raise ValueError("gallery contains NaN or inf: fix the embedding step before searching it")
        return ShardedGallery(emb, ids, int(embeddings.shape[0]), mesh)
    if not isinstance(embeddings, np.memmap):  # a memmap is checked shard by shard as it is read
        embeddings = retrieval.check_embeddings("gallery", embeddings)
    elif embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"gallery must be a non-empty (N, E) array, got shape {embeddings.shape}")

    def normalize(rows: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(rows)):
            raise ValueError("gallery contains NaN or inf: fix the embedding step before searching it")
        return _normalize_f32(rows)

    emb = _put_rows(embeddings, mesh, 0.0, normalize)
    return ShardedGallery(emb, _ids(embeddings.shape[0], mesh), int(embeddings.shape[0]), mesh)


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


def _block_ranks(q: jax.Array, q_label: jax.Array, g: jax.Array, g_label: jax.Array, *, axes: tuple[str, ...]
                 ) -> jax.Array:
    # The barrier keeps one materialised score matrix: fused into its two consumers the dot could be computed
    # twice, possibly by two kernels that round differently, and a tie with the positive would stop being one.
    s = jax.lax.optimization_barrier(_scores(q, g))
    own = g_label[None, :] == q_label[:, None]
    best = jax.lax.pmax(jnp.max(jnp.where(own, s, -jnp.inf), axis=1), axes)
    above = (s > best[:, None]) & (g_label >= 0)[None, :]
    return 1 + jax.lax.psum(jnp.sum(above, axis=1, dtype=jnp.int32), axes)


@functools.lru_cache(maxsize=64)
def _top_k_fn(mesh: Mesh, k: int, local_k: int) -> Callable:
    axes = _axes(mesh)
    body = functools.partial(_block_top_k, k=k, local_k=local_k, axes=axes)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axes, None), P(axes)), out_specs=(P(), P())))


@functools.lru_cache(maxsize=64)
def _ranks_fn(mesh: Mesh) -> Callable:
    axes = _axes(mesh)
    body = functools.partial(_block_ranks, axes=axes)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(axes, None), P(axes)), out_specs=P()))


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


def _check_queries(gallery: ShardedGallery, queries: np.ndarray | jax.Array) -> np.ndarray:
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != gallery.dim:
        raise ValueError(f"queries must be (Q, {gallery.dim}) to match the gallery, got shape {queries.shape}")
    if queries.shape[0] and not np.issubdtype(queries.dtype, np.floating):
        raise ValueError(f"queries must be a float array, got dtype {queries.dtype}")
    if not np.all(np.isfinite(queries)):
        raise ValueError("queries contain NaN or inf: fix the embedding step before searching")
    return queries


def _replicated(host: np.ndarray, mesh: Mesh) -> jax.Array:
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, P()), lambda index: host[index])


def _padded(x: np.ndarray, rows: int, value: Any) -> np.ndarray:
    return np.concatenate([x, np.full((rows - len(x),) + x.shape[1:], value, x.dtype)]) if len(x) < rows else x


def _map_blocks(run: Callable[..., Any], mesh: Mesh, block: int, queries: np.ndarray,
                labels: np.ndarray | None = None) -> list[tuple[np.ndarray, ...]]:
    """`run(query block[, label block])` over the queries in blocks, a few blocks in flight; host results."""
    pending: list[tuple[int, Any]] = []
    results: list[tuple[np.ndarray, ...]] = []

    def read(n: int, out: Any) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(x.addressable_data(0))[:n] for x in jax.tree.leaves(out))

    for start in range(0, len(queries), block):
        q = _padded(_normalize_f32(queries[start:start + block]), block, 0.0)
        args = [_replicated(q, mesh)]
        if labels is not None:  # padding queries own no row (-2 is neither a label nor the padding id)
            args.append(_replicated(_padded(labels[start:start + block], block, -2), mesh))
        pending.append((min(block, len(queries) - start), run(*args)))
        if len(pending) > _IN_FLIGHT:
            results.append(read(*pending.pop(0)))
    results += [read(*p) for p in pending]
    return results


def top_k(gallery: ShardedGallery, queries: np.ndarray | jax.Array, k: int, *, query_block: int | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k) float32 cosines, indices (Q, k) int64 gallery rows) of each query's k most similar rows,
    most similar first; equal scores in ascending row order (so also which of a tie at place k gets in)."""
    queries = _check_queries(gallery, queries)
    if not 1 <= k <= gallery.num_valid:
        raise ValueError(f"k must be in [1, {gallery.num_valid}] (the gallery's size), got {k}")
    if queries.shape[0] == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    fn = _top_k_fn(gallery.mesh, k, min(k, gallery.rows_per_device))
    block = query_block_size(queries.shape[0], gallery.rows_per_device, query_block)
    parts = _map_blocks(lambda q: fn(q, gallery.embeddings, gallery.ids), gallery.mesh, block, queries)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64)


def ranks(gallery: ShardedGallery, queries: np.ndarray | jax.Array, positives: np.ndarray,
          gallery_labels: np.ndarray | None = None, *, query_block: int | None = None) -> np.ndarray:
    """(Q,) int64 1-based rank of each query's best positive: 1 + the number of gallery rows scoring strictly
    above the highest-scoring row whose label is `positives[i]`. `gallery_labels` (N,) int, default the row
    index (one positive per query). A query whose label no row has gets rank 1 + N."""
    queries = _check_queries(gallery, queries)
    positives = np.asarray(positives)
    if positives.shape != (queries.shape[0],) or not np.issubdtype(positives.dtype, np.integer):
        raise ValueError(f"positives must be ({queries.shape[0]},) ints, one per query, got {positives.dtype} "
                         f"{positives.shape}")
    if gallery_labels is None:
        labels = gallery.ids
    else:
        gallery_labels = np.asarray(gallery_labels)
        if gallery_labels.shape != (gallery.num_valid,) or not np.issubdtype(gallery_labels.dtype, np.integer):
            raise ValueError(f"gallery_labels must be ({gallery.num_valid},) ints, got {gallery_labels.dtype} "
                             f"{gallery_labels.shape}")
        if gallery_labels.min() < 0:
            raise ValueError("gallery_labels must be >= 0 (negative labels mark padding rows)")
        labels = _put_rows(gallery_labels.astype(np.int32), gallery.mesh, -1)
    if queries.shape[0] == 0:
        return np.zeros(0, np.int64)
    fn = _ranks_fn(gallery.mesh)
    block = query_block_size(queries.shape[0], gallery.rows_per_device, query_block)
    parts = _map_blocks(lambda q, y: fn(q, y, gallery.embeddings, labels), gallery.mesh, block, queries,
                        positives.astype(np.int32))
    return np.concatenate([p[0] for p in parts]).astype(np.int64)


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


def block_memory(gallery: ShardedGallery, num_queries: int, k: int | None = None,
                 query_block: int | None = None) -> dict[str, int]:
    """Per-device bytes of one query block's compiled program (XLA's memory_analysis): `argument` (shard,
    ids/labels, block), `output`, `temp`, and `block` rows; top-k with k, else ranks. Compiles, runs nothing."""
    block = query_block_size(num_queries, gallery.rows_per_device, query_block)
    replicated = NamedSharding(gallery.mesh, P())
    q = jax.ShapeDtypeStruct((block, gallery.dim), jnp.float32, sharding=replicated)
    if k is None:
        y = jax.ShapeDtypeStruct((block,), jnp.int32, sharding=replicated)
        lowered = _ranks_fn(gallery.mesh).lower(q, y, gallery.embeddings, gallery.ids)
    else:
        lowered = _top_k_fn(gallery.mesh, k, min(k, gallery.rows_per_device)).lower(q, gallery.embeddings,
                                                                                      gallery.ids)
    m = lowered.compile().memory_analysis()
    return dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                temp=int(m.temp_size_in_bytes), block=block)
