"""Device mesh, the one logical-axis rules table, and param/batch/optimizer-state shardings.

Parameters carry logical axis names (`clover_jax/models/layers.py`); `LOGICAL_RULES` maps them to the
mesh axes ("data", "fsdp", "model"); a run's table is `config.sharding_rules` (default this one, see
`clover_jax.run_setup.logical_rules`). Meshes use Auto axis types, so GSPMD propagates shardings from the
parameters and the batch; the models place no activation constraints of their own (gradient caching
constrains its re-assembled chunks to the batch axes). Parameters are created already sharded by
`create_sharded` (eval_shape, then jit with out_shardings), so the full model never sits on one device.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clover_jax.param_paths import path_to_str

Rules = tuple[tuple[str, Any], ...]

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or axes, or None = unsharded). Order is priority: when two dimensions of
# one array want the same mesh axis, the first rule wins and the later dimension stays unsharded.
LOGICAL_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("classes", "model"),
    ("layers", None),  # stacked (scanned) layer axis
)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: every device of every process) with named axis sizes.

    `axes` is ordered, e.g. {"data": -1, "fsdp": 1, "model": 1}; one size may be -1 (takes the rest).
    Raises when the sizes cannot multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    names, sizes = tuple(axes), [int(s) for s in axes.values()]
    if not names:
        raise ValueError("make_mesh: give at least one axis, e.g. {'data': -1}")
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1 (fill), got {dict(axes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: axis sizes must be positive or -1, got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"make_mesh: {len(devices)} devices cannot be split over {dict(axes)}: "
                f"the fixed axes multiply to {known}, which does not divide {len(devices)}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"make_mesh: axis sizes {dict(zip(names, sizes))} multiply to {math.prod(sizes)}, "
            f"but there are {len(devices)} devices; make them match or use -1 for one axis"
        )
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(sizes), names, axis_types=auto, devices=devices)


def _mesh_axes_of(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def rules_for_mesh(rules: Rules, mesh: Mesh) -> Rules:
    """`rules` with mesh axes absent from `mesh` dropped (so {"data": -1} meshes work unchanged)."""
    out = []
    for name, entry in rules:
        kept = tuple(a for a in _mesh_axes_of(entry) if a in mesh.shape)
        out.append((name, None if not kept else kept[0] if len(kept) == 1 else kept))
    return tuple(out)


def batch_axes(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (rules' "batch" entry, restricted to `mesh`)."""
    entry = dict(rules_for_mesh(rules, mesh)).get("batch")
    return _mesh_axes_of(entry)


def num_data_replicas(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> int:
    """How many ways the batch is split (the reference's world size for the contrastive gradient)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes, other dimensions replicated."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_global_batch(global_batch_size: int, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> None:
    """Raises unless the global batch splits evenly over the batch axes."""
    replicas = num_data_replicas(mesh, rules)
    if global_batch_size % replicas:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by {replicas}, the product of the "
            f"batch mesh axes {dict((a, mesh.shape[a]) for a in batch_axes(mesh, rules))}; "
            f"change the batch size or the mesh"
        )


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """device_put of a host batch (every leaf (global_batch, ...)) on `batch_sharding`, after checking sizes.

    Single-process helper for tests and tools; multi-host input goes through
    `jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)`.
    """
    for leaf in jax.tree.leaves(batch):
        if not getattr(leaf, "ndim", 0):
            shape = getattr(leaf, "shape", ())
            raise ValueError(f"shard_batch: every batch leaf needs a leading batch dimension, got shape {shape}")
        check_global_batch(leaf.shape[0], mesh, rules)
    return jax.device_put(batch, batch_sharding(mesh, rules))


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _check_logical_names(logical_specs: Any, rules: Rules) -> None:
    known = {name for name, _ in rules}
    for path, spec in jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=_is_spec)[0]:
        for name in spec:
            if isinstance(name, str) and name not in known:
                raise ValueError(
                    f"parameter {path_to_str(path)} uses logical axis {name!r}, which the rules table does not "
                    f"map; known names: {sorted(known)} (add a rule to sharding.LOGICAL_RULES)"
                )


def _check_divisible(abstract: Any, shardings: Any, mesh: Mesh) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    sh_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != len(sh_leaves):
        raise ValueError(f"internal: {len(leaves)} parameters but {len(sh_leaves)} shardings")
    for (path, x), sharding in zip(leaves, sh_leaves):
        spec = sharding.spec
        if len(spec) > len(x.shape):
            raise ValueError(f"parameter {path_to_str(path)}: spec {spec} has more entries than its shape {x.shape}")
        for dim, entry in enumerate(spec):
            axes = _mesh_axes_of(entry)
            size = math.prod(mesh.shape[a] for a in axes)
            if axes and x.shape[dim] % size:
                raise ValueError(
                    f"parameter {path_to_str(path)}: dimension {dim} has size {x.shape[dim]}, not divisible by "
                    f"mesh axis {'x'.join(axes)} of size {size}; change the mesh or the rule for that dimension"
                )


def param_shardings(abstract_boxed_params: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """NamedShardings (unboxed tree structure) from the `nn.Partitioned` metadata of boxed params.

    Leaves without metadata are replicated. Raises on logical names missing from `rules` and on a
    dimension that does not divide by its mesh axes (the message names the path, dim, axis and size).
    """
    logical = nn.get_partition_spec(abstract_boxed_params)
    _check_logical_names(logical, rules)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules_for_mesh(rules, mesh))
    _check_divisible(nn.unbox(abstract_boxed_params), shardings, mesh)
    return shardings


def create_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, rules: Rules = LOGICAL_RULES, *args: Any
) -> tuple[Any, Any]:
    """(unboxed variables born sharded, their shardings): eval_shape(init_fn), then jit with out_shardings.

    `init_fn(*args)` returns boxed (logically partitioned) variables, e.g.
    `lambda rng: model.init(rng, x)["params"]`.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = param_shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for_mesh(rules, mesh)):
        variables = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return variables, shardings


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings of `tx.init(params)`: every params-shaped subtree follows `shardings`, the rest replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state,
        shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def partition_spec_table(abstract_params: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> dict[str, str]:
    """{param path: str(PartitionSpec)} for golden dumps (boxed abstract params in, mesh specs out)."""
    shardings = param_shardings(abstract_params, mesh, rules)
    flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    return {path_to_str(path): str(s.spec) for path, s in flat}
