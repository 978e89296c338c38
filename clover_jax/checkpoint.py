"""Checkpoints: orbax CheckpointManager (async, keep-K) for train state + run metadata, and `init_from`.

A checkpoint step folder holds two items: `state` (the TrainState: step, params, optimizer state) and
`meta` (JSON: step, the data position, the seed, the config). orbax writes each save into a temporary
folder and renames it when complete, so a process killed mid-save leaves the previous step intact.

Restore order of a training run (`restore_or_init`): the workdir's latest checkpoint, then
`config.resume` (another run's checkpoint, full state), then `config.init_from` (params only: a
`python -m clover_jax.convert` output or a training checkpoint, optionally limited to some top-level
modules, e.g. only the text encoder), then a fresh initialisation.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from clover_jax.convert.common import flatten, unflatten


def make_manager(workdir: str | pathlib.Path, *, save_every: int, keep: int, async_save: bool = True
                 ) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, save_every), max_to_keep=keep, enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints", options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and `meta` at `step`; returns whether a save was started."""
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=force)


def _abstract(state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state placed as `abstract_state`'s shardings, meta) of checkpoint `step`."""
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])


def checkpoint_dir_and_step(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """Accepts a workdir, its `checkpoints/` folder or one step folder; returns (checkpoints dir, step)."""
    path = pathlib.Path(path).absolute()
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir()) \
        if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint under {path} (expected step folders holding 'state/')")
    return path, steps[-1]


def _restore_numpy(directory: pathlib.Path) -> Any:
    """A saved pytree as host numpy arrays. Restoring onto the saved shardings would fail whenever the
    devices differ from the writer's (another device count, or a multi-process run's device ids)."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(directory).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def load_params(path: str | pathlib.Path) -> dict:
    """Params (numpy, unsharded) from a converter output folder (`params/`) or a training checkpoint,
    whatever devices and processes wrote it."""
    path = pathlib.Path(path).absolute()
    if (path / "params").is_dir() and (path / "conversion.json").exists():
        return _restore_numpy(path / "params")
    ckpt_dir, step = checkpoint_dir_and_step(path)
    return _restore_numpy(ckpt_dir / str(step) / "state")["params"]


def params_from_init(path: str | pathlib.Path, fresh_params: Any, shardings: Any,
                     include: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """`fresh_params` with the leaves found at `path` (limited to the top-level modules in `include`
    when given) replaced and placed on `shardings`; returns (params, loaded leaf paths)."""
    loaded = flatten(load_params(path))
    if include:
        available = sorted({k.split("/")[0] for k in loaded})
        absent = sorted(set(include) - set(available))
        if absent:
            raise ValueError(f"init_from_include names {absent}, but {path} holds only {available}")
        loaded = {k: v for k, v in loaded.items() if k.split("/")[0] in include}
    params, placement = flatten(fresh_params), flatten(shardings)
    for key, value in loaded.items():
        if key not in params:
            raise ValueError(f"init_from {path}: parameter {key!r} does not exist in this model")
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"init_from {path}: {key!r} has shape {tuple(value.shape)}, "
                             f"the model needs {tuple(params[key].shape)}")
        params[key] = jax.device_put(value.astype(params[key].dtype), placement[key])
    return unflatten(params), sorted(loaded)


def write_json(path: pathlib.Path, obj: Any) -> None:
    if jax.process_index() == 0:
        path.write_text(json.dumps(obj, indent=1, sort_keys=True))
