"""The gallery of `mesh_retrieval`: rows L2-normalised as `retrieval.l2_normalize` does, split over every device
of a mesh and padded (id -1), built from a host array, from a row reader (a tensorstore array) or from each
process's own rows, so that no process need ever hold the whole gallery.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from clover_jax.evaluators import retrieval


@dataclasses.dataclass(frozen=True)
class ShardedGallery:
    """Unit-norm gallery rows split over every device of `mesh` (row i of the padded array lives on device
    i // rows_per_device, in mesh order); `ids` says which gallery row each is: ascending within each device's
    shard (so a device's first rows among equal scores are the lowest ids), in order across shards unless
    built by `gallery_from_local`."""
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


def _put_rows(read: Callable[[int, int], np.ndarray], shape: tuple[int, ...], mesh: Mesh, pad_value: Any,
              dtype: Any) -> jax.Array:
    """Rows [0, shape[0]) split over the mesh, padded with `pad_value`; `read(start, stop)` is called once per
    addressable shard, for that shard's rows only (a memory-mapped or tensorstore gallery is read, and
    normalised, one shard at a time, and each process reads only the rows of its own devices)."""
    n, padded = shape[0], _padded_rows(shape[0], mesh)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(padded)
        out = np.full((stop - start,) + tuple(shape[1:]), pad_value, dtype)
        if start < n:
            rows = read(start, min(stop, n))
            out[:len(rows)] = rows
        return out

    return jax.make_array_from_callback((padded,) + tuple(shape[1:]), _row_sharding(mesh, len(shape)), shard, dtype)


def _ids(n: int, mesh: Mesh) -> jax.Array:
    return _put_rows(lambda a, b: np.arange(a, b, dtype=np.int32), (n,), mesh, -1, np.int32)


def _normalize_f32(x: np.ndarray) -> np.ndarray:
    return retrieval.l2_normalize(x).astype(np.float32, copy=False)


def _checked_normalize(rows: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(rows)):
        raise ValueError("gallery contains NaN or inf: fix the embedding step before searching it")
    return _normalize_f32(rows)


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
    through the host). Every process passes the same gallery; `shard_gallery_from_reader` and
    `gallery_from_local` build one without any process holding it whole.
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
    return shard_gallery_from_reader(lambda a, b: np.asarray(embeddings[a:b]), embeddings.shape, mesh)


def shard_gallery_from_reader(read_rows: Callable[[int, int], np.ndarray], shape: tuple[int, ...], mesh: Mesh
                              ) -> ShardedGallery:
    """`shard_gallery` of an (N, E) array that `read_rows(start, stop)` reads a row range of (a tensorstore
    array, a memmap): each process reads, checks and normalises only the rows of its own devices."""
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"gallery must be a non-empty (N, E) array, got shape {tuple(shape)}")
    emb = _put_rows(lambda a, b: _checked_normalize(np.asarray(read_rows(a, b))), tuple(shape), mesh, 0.0,
                    np.float32)
    return ShardedGallery(emb, _ids(shape[0], mesh), int(shape[0]), mesh)


def _process_devices(mesh: Mesh) -> collections.Counter:
    return collections.Counter(d.process_index for d in mesh.devices.flat)


def _shard_slots(sharding: NamedSharding, shape: tuple[int, ...]) -> dict[int, int]:
    """First row of each of this process's shards -> its place among them (in row order)."""
    starts = {index[0].indices(shape[0])[0] for index in sharding.addressable_devices_indices_map(shape).values()}
    return {start: n for n, start in enumerate(sorted(starts))}


def gallery_from_local(rows: np.ndarray, ids: np.ndarray, mesh: Mesh) -> ShardedGallery:
    """A gallery from each process's own rows: `rows` (n_p, E) (any scale; L2-normalised here) with `ids` (n_p,)
    their indices in the whole gallery (any order; the ids of all processes together are 0..N-1). This
    process's rows go to its own devices only, R rows each, R the same everywhere (the most any process needs,
    from the row counts all processes exchange); every process calls this."""
    rows, ids = np.asarray(rows), np.asarray(ids)
    if rows.ndim != 2 or ids.shape != (rows.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"rows must be (n, E) with ids (n,) ints, got {rows.shape} and {ids.dtype} {ids.shape}")
    if len(rows) and not np.issubdtype(rows.dtype, np.floating):
        raise ValueError(f"gallery must be a float array, got dtype {rows.dtype}")
    order = np.argsort(ids, kind="stable")  # ids ascend within each shard: top-k's local tie rule needs it
    rows, ids = rows[order], ids[order]
    if jax.process_count() == 1:
        counts = {jax.process_index(): len(rows)}
    else:
        from jax.experimental import multihost_utils

        counts = dict(enumerate(np.asarray(multihost_utils.process_allgather(np.int64(len(rows)))).tolist()))
    devices = _process_devices(mesh)
    per_device = max(max(-(-counts.get(p, 0) // d) for p, d in devices.items()), 1)
    shape = (mesh.size * per_device, rows.shape[1])
    slots = _shard_slots(_row_sharding(mesh, 2), shape)

    def local(values: np.ndarray, pad: Any, dtype: Any, width: tuple[int, ...]) -> Callable:
        def shard(index: tuple[slice, ...]) -> np.ndarray:
            first = slots[index[0].indices(shape[0])[0]] * per_device
            part = values[first:first + per_device]
            out = np.full((per_device,) + width, pad, dtype)
            out[:len(part)] = part
            return out
        return shard

    emb = jax.make_array_from_callback(shape, _row_sharding(mesh, 2),
                                       local(_checked_normalize(rows), 0.0, np.float32, shape[1:]), np.float32)
    row_ids = jax.make_array_from_callback(shape[:1], _row_sharding(mesh, 1),
                                           local(ids.astype(np.int32), -1, np.int32, ()), np.int32)
    return ShardedGallery(emb, row_ids, int(sum(counts.values())), mesh)


def row_values(gallery: ShardedGallery, table: np.ndarray, pad: int = -1) -> jax.Array:
    """int32 `table[id]` of each gallery row, laid out as its rows (`pad` on padding rows); built from this
    process's shards of `gallery.ids` only."""
    n = gallery.ids.shape[0]
    local_ids = {s.index[0].indices(n)[0]: np.asarray(s.data) for s in gallery.ids.addressable_shards}
    table = np.asarray(table, np.int32)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        ids = local_ids[index[0].indices(n)[0]]
        return np.where(ids >= 0, table[np.maximum(ids, 0)], pad).astype(np.int32)

    return jax.make_array_from_callback(gallery.ids.shape, gallery.ids.sharding, shard, np.int32)
