"""Checkpoints: orbax CheckpointManager (async, keep-K) for the train state and run metadata, and `init_from`.

A checkpoint step folder holds two items: `state` (the TrainState: step, params, optimizer state) and
`meta` (JSON: the step, the data step and the seed). orbax writes each save into a temporary folder and
renames it when complete, so a process killed mid-save (or a full disk) leaves the previous step intact; the
next start deletes such unfinished folders. The newest `keep_checkpoints` steps live in
`<workdir>/checkpoints/`; the step with the best value of `config.best_metric` so far lives in
`<workdir>/best/` (`BestCheckpoint`).

The restore order of a training run is `clover_jax.run_setup.initial_state`'s: the workdir's newest checkpoint,
then `config.resume` (another run's checkpoint, full state), then `config.init_from` (params only: a
`python -m clover_jax.convert` output or a training checkpoint, optionally limited to some top-level
modules, e.g. only the text encoder), then a fresh initialisation.

Damaged checkpoints: every restore (workdir resume, `resume`, `init_from`, eval) tries the newest
finished step first; one that fails to read, or holds a non-finite value, is reported in one line
(step, path, first error) and the next older one is tried. Nothing is deleted; a training run that
falls back moves the damaged newer steps to `<workdir>/damaged_checkpoints/` so it can write those
steps again. When no step reads, NoReadableCheckpointError lists every step tried and why.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import time
from typing import Any, Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from clover_jax.param_paths import flatten, unflatten

T = TypeVar("T")
UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a save still being written


class NoReadableCheckpointError(ValueError):
    """No checkpoint of a run could be read; the message lists every step tried and its first error."""


def first_line(err: BaseException, limit: int = 240) -> str:
    """The first line of an error, clipped: what a one-line report shows."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of floating-point leaves (numpy or jax arrays) holding a NaN or an infinity."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            continue
        finite = np.all(np.isfinite(leaf)) if isinstance(leaf, np.ndarray) else jax.device_get(jnp.isfinite(leaf).all())
        if not bool(finite):
            bad.append(jax.tree_util.keystr(path))
    return bad


def restore_newest_readable(folder: pathlib.Path, steps: Sequence[int], restore_step: Callable[[int], T],
                            *, finite_of: Callable[[T], Any] = lambda x: x) -> tuple[T, int, list[int]]:
    """Restores the newest of `steps` (step folders under `folder`) that reads and holds only finite
    values (`finite_of` picks the part to check), printing one line per damaged step.
    Returns (value, step, the damaged steps newer than it)."""
    tried: list[tuple[int, str]] = []
    ordered = sorted(steps, reverse=True)
    for n, step in enumerate(ordered):
        try:
            value = restore_step(step)
            bad = non_finite_leaves(finite_of(value))
            if bad:
                raise ValueError(f"{len(bad)} arrays hold NaN or inf values, first {bad[0]}")
            return value, step, [s for s, _ in tried]
        except Exception as err:  # noqa: BLE001 - damage shows up as many error types (tensorstore, json, io)
            reason = first_line(err)
            tried.append((step, first_line(err, 110)))
            then = f"trying step {ordered[n + 1]}" if n + 1 < len(ordered) else "no older checkpoint left"
            print(f"clover_jax: checkpoint step {step} at {folder / str(step)} cannot be restored ({reason}); "
                  f"{then}", flush=True)
    listing = "; ".join(f"step {s}: {r}" for s, r in tried)
    raise NoReadableCheckpointError(f"no checkpoint under {folder} could be restored (tried {listing or 'none'}); "
                                    "nothing was deleted — restore a backup or start a new --workdir")


def set_aside(ckpt_dir: pathlib.Path, steps: Sequence[int]) -> list[pathlib.Path]:
    """Moves damaged step folders to `<workdir>/damaged_checkpoints/` (never deletes); returns the new paths."""
    moved = []
    if jax.process_index() == 0:
        for step in steps:
            target = ckpt_dir.parent / "damaged_checkpoints" / f"{step}_{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(ckpt_dir / str(step)), str(target))
            moved.append(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("clover_jax: damaged checkpoints set aside")
    return moved


def remove_unfinished_saves(ckpt_dir: pathlib.Path) -> list[str]:
    """Deletes the temporary folders of saves that never finished (`<step>.orbax-checkpoint-tmp*`, left by a
    full disk or a killed process) on process 0; returns their names."""
    if jax.process_index() != 0 or not ckpt_dir.is_dir():
        return []
    removed = []
    for path in sorted(ckpt_dir.glob(f"*{UNFINISHED_SUFFIX}*")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def make_manager(workdir: str | pathlib.Path, *, save_every: int, keep: int, async_save: bool = True,
                 folder: str = "checkpoints") -> ocp.CheckpointManager:
    """The run's CheckpointManager over `<workdir>/<folder>`, after removing the leftovers of unfinished saves."""
    ckpt_dir = pathlib.Path(workdir).absolute() / folder
    removed = remove_unfinished_saves(ckpt_dir)
    if removed:
        print(f"clover_jax: removed {len(removed)} unfinished checkpoint save(s) from {ckpt_dir}: "
              f"{', '.join(removed)}", flush=True)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, save_every), max_to_keep=keep, enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(ckpt_dir, options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` and `meta` at `step`; returns whether a save was started."""
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=force)


BEST_FOLDER = "best"


class BestCheckpoint:
    """Keeps the train state of the best value of one metric in `<workdir>/best/<step>` (one step) and its
    record in `<workdir>/best/best.json` ({metric, mode, value, step}). `mode` "max" or "min"."""

    def __init__(self, workdir: pathlib.Path, metric: str, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"best_mode={mode!r}; valid: 'max', 'min'")
        self.metric, self.mode = metric, mode
        self.manager = make_manager(workdir, save_every=1, keep=1, folder=BEST_FOLDER)
        self.record_path = pathlib.Path(self.manager.directory) / "best.json"
        record = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        self.value = record.get("value") if record.get("metric") == metric else None

    def is_better(self, value: float) -> bool:
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, step: int, value: float, state: Any, meta: dict) -> bool:
        """Saves `state` as the best checkpoint when `value` beats the best so far; returns whether it did."""
        if not self.is_better(value):
            return False
        if step in self.manager.all_steps():  # the same step evaluated again (a resumed run)
            self.manager.wait_until_finished()
        else:
            save(self.manager, step, state, meta, force=True)
        self.value = value
        write_json(self.record_path, dict(metric=self.metric, mode=self.mode, value=value, step=step))
        return True

    def wait_until_finished(self) -> None:
        self.manager.wait_until_finished()


def _abstract(state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state placed as `abstract_state`'s shardings, meta) of checkpoint `step`."""
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])


def finished_steps(path: str | pathlib.Path) -> tuple[pathlib.Path, list[int]]:
    """Accepts a workdir, its `checkpoints/` folder or one step folder; returns (checkpoints dir, its
    finished steps, newest first). A step folder yields only its own step."""
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "state").is_dir() and path.name.isdigit():
        return path.parent, [int(path.name)]
    steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir()),
                   reverse=True) if path.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint under {path} (expected step folders holding 'state/'; "
                                "is this the right --workdir?)")
    return path, steps


def checkpoint_dir_and_step(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
    """Accepts a workdir, its `checkpoints/` folder or one step folder; returns (checkpoints dir, newest step)."""
    ckpt_dir, steps = finished_steps(path)
    return ckpt_dir, steps[0]


def _restore_numpy(directory: pathlib.Path) -> Any:
    """A saved pytree as host numpy arrays. Restoring onto the saved shardings would fail whenever the
    devices differ from the writer's (another device count, or a multi-process run's device ids)."""
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory).item_metadata
    if metadata is None:  # unreadable (damaged) metadata: a plain restore raises the error that says why
        return jax.tree.map(np.asarray, checkpointer.restore(directory))
    tree = metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def load_params_and_step(path: str | pathlib.Path) -> tuple[dict, int]:
    """(params as unsharded numpy, step) from a converter output folder (`params/`, step 0) or a training
    checkpoint (the newest step that restores with finite values), whatever devices wrote it."""
    path = pathlib.Path(path).absolute()
    if (path / "params").is_dir() and (path / "conversion.json").exists():
        params, _, _ = restore_newest_readable(path, [0], lambda _: _restore_numpy(path / "params"))
        return params, 0
    ckpt_dir, steps = finished_steps(path)
    params, step, _ = restore_newest_readable(ckpt_dir, steps,
                                              lambda s: _restore_numpy(ckpt_dir / str(s) / "state")["params"])
    return params, step


def load_params(path: str | pathlib.Path) -> dict:
    """Params (numpy, unsharded) of `load_params_and_step`."""
    return load_params_and_step(path)[0]


def params_from_init(path: str | pathlib.Path, fresh_params: Any, shardings: Any,
                     include: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """`fresh_params` with the leaves found at `path` (limited to the top-level modules in `include`
    when given) replaced and placed on `shardings`; returns (params, loaded leaf paths)."""
    return merge_params(load_params(path), path, fresh_params, shardings, include)


def merge_params(loaded_tree: Any, path: str | pathlib.Path, fresh_params: Any, shardings: Any,
                 include: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """`fresh_params` with the leaves of `loaded_tree` (read from `path`) replaced and placed."""
    loaded = flatten(loaded_tree)
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
