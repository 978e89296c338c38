"""What every entry point derives from a config: config loading, the mesh, the model, restores and loaders.

`clover_jax.train` (the loop) and `clover_jax.eval` (the evaluation CLI) both start here; neither imports
the other. The restore order of a training run is `initial_state`'s: the workdir's newest readable
checkpoint, then `config.resume` (another run's full state), then `config.init_from` (params only), then
a fresh initialisation.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from clover_jax import checkpoint as ckpt_lib
from clover_jax import grad_cache, partitioning, peers, run_inputs, tasks
from clover_jax.kernels import execution
from clover_jax.models.clover import CloverConfig, clover_config, dummy_batch, init_params
from clover_jax.train_step import TrainState, create_train_state
from data_pipelines.input.mixtures import make_mixture_iterator


class ConfigError(ValueError):
    """A config value that cannot work; the message says what to change."""


@dataclasses.dataclass
class Run:
    """Mesh, model config and shardings of one config."""

    config: ml_collections.ConfigDict
    mesh: Any
    batch_sharding: Any
    model_config: CloverConfig
    abstract_params: Any  # boxed (logical axes), from eval_shape
    param_shardings: Any

    @property
    def execution(self) -> execution.ExecutionPolicy:
        return self.model_config.execution


# Keys of configs saved before the execution policy: model.attention named a window-attention kernel or, as
# "per_clip", the video batching; model.clip_groups is now kernels.clip_groups.
def _legacy_model_keys(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any]]:
    """(video batching, `config.kernels` with the legacy model keys folded in)."""
    m = config.model
    kernels = dict(config.get("kernels", {}) or {})
    batching = m.get("video_batching", "batched")
    attention = m.get("attention", "auto")
    if attention == "per_clip":
        batching = "per_clip"
    elif attention != "auto" and kernels.get("window_attention", "auto") == "auto":
        kernels["window_attention"] = attention
    if m.get("clip_groups", 0) and not kernels.get("clip_groups", 0):
        kernels["clip_groups"] = m.clip_groups
    return batching, kernels


def execution_policy(config: ml_collections.ConfigDict, mesh: Any) -> execution.ExecutionPolicy:
    """The run's execution policy: `config.kernels` over the defaults of the mesh's platform."""
    try:
        return execution.policy_for_mesh(mesh, _legacy_model_keys(config)[1], partitioning.num_data_replicas(mesh))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def model_config_from(config: ml_collections.ConfigDict,
                      policy: execution.ExecutionPolicy = execution.REFERENCE) -> CloverConfig:
    """The model of a run: its preset, sized for the training clips unless `model.overrides` says otherwise
    (fine-tuning on longer clips keeps the pre-training fusion tables with overrides.num_frames), run under
    `policy` (a run's is `execution_policy`; the default is the plain math)."""
    m = config.model
    batching, _ = _legacy_model_keys(config)
    kw = dict(num_frames=config.data.num_frames, image_size=config.data.image_size, dtype=m.dtype,
              remat=m.remat, h_v_input=m.h_v_input, video_batching=batching, execution=policy)
    kw.update(dict(m.get("overrides", {})))
    return clover_config(m.preset, **kw)


def enable_compilation_cache(config: ml_collections.ConfigDict) -> None:
    """Persistent XLA cache (`config.compilation_cache_dir`): a rerun or resume skips recompiling.
    The JAX_COMPILATION_CACHE_DIR environment variable, when set, wins."""
    path = config.get("compilation_cache_dir", "")
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # On CPU the cache key differs per process and only process 0 writes, so only process 0 ever
        # hits: it would reach the first cross-process collective a whole compile ahead of the others,
        # past gloo's fixed 30 s rendezvous deadline ("Gloo context initialization failed").
        return
    if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """`config.sharding_rules` (logical axis -> mesh axes) or, when absent or empty, `sharding.LOGICAL_RULES`."""
    rules = config.get("sharding_rules", None)
    if not rules:
        return partitioning.LOGICAL_RULES
    return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


def setup_run(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> Run:
    """Mesh (over `devices`, default every device), model config and parameter shardings; config errors
    surface here as one-line messages. `devices` may be compile-only (`clover_jax.aot`)."""
    enable_compilation_cache(config)
    try:
        mesh = partitioning.make_mesh(dict(config.mesh), devices)
    except ValueError as err:
        raise ConfigError(f"config.mesh: {err}") from None
    rules = logical_rules(config)
    try:
        partitioning.check_global_batch(config.data.batch_size, mesh, rules)
        partitioning.check_global_batch(config.eval.batch_size, mesh, rules)
    except ValueError as err:
        raise ConfigError(f"data.batch_size / eval.batch_size: {err}") from None
    check_microbatches(config, mesh)
    model_config = model_config_from(config, execution_policy(config, mesh))
    batch = dummy_batch(model_config)
    abstract = jax.eval_shape(lambda r: init_params(model_config, r, batch), jax.random.key(0))
    return Run(config, mesh, partitioning.batch_sharding(mesh, rules), model_config, abstract,
               partitioning.param_shardings(abstract, mesh, rules))


def check_microbatches(config: ml_collections.ConfigDict, mesh: Any) -> None:
    """Raises ConfigError unless `config.microbatches` (default 1) can split this run's training batch."""
    k = config.get("microbatches", 1)
    if k != 1 and config.task not in tasks.EMBEDDING_OBJECTIVES:
        raise ConfigError(f"microbatches={k}: gradient caching supports the tasks "
                          f"{sorted(tasks.EMBEDDING_OBJECTIVES)}, not {config.task!r}; use microbatches=1")
    try:
        grad_cache.check_microbatches(config.data.batch_size, k, partitioning.num_data_replicas(mesh))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_run_config(workdir: pathlib.Path, config_arg: str = "") -> ml_collections.ConfigDict:
    """The config a run saved in its workdir, or one loaded from `file.py[:arg]`."""
    if config_arg:
        return load_config_file(config_arg)
    path = workdir / "config.json"
    if not path.exists():
        what = "is empty" if workdir.is_dir() and not any(workdir.iterdir()) else "holds no config.json"
        raise FileNotFoundError(f"--workdir={workdir} {what}: pass a training run's workdir, or add "
                                "--config=configs/<file>.py[:arg] (and --checkpoint=PATH)")
    try:
        config = ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as err:
        raise ConfigError(f"{path} is not a readable config ({err}); pass --config=configs/<file>.py[:arg]") from None
    if "evals" not in config:  # saved before evaluators were config entries: the task's own evaluator
        kind = tasks.TASKS[config.get("task", "pretrain")].evaluator
        config.evals = {kind: dict(type=kind, every_steps=0)}
    return config


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config of `file.py[:arg]` (its `get_config(arg)`)."""
    file, _, arg = spec.partition(":")
    if not pathlib.Path(file).is_file() or not file.endswith(".py"):
        raise FileNotFoundError(f"--config={spec}: {file} is not a config .py file")
    module_spec = importlib.util.spec_from_file_location("run_config", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={spec}: {file} defines no get_config(arg)")
    return module.get_config(arg or None)


def load_params_for_eval(run: Run, path: str | pathlib.Path) -> tuple[Any, int]:
    """(params placed on the run's shardings, step) from a training checkpoint (the newest that reads)
    or a converter output (step 0)."""
    fresh = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(run.abstract_params))
    path = pathlib.Path(path)
    loaded_tree, step = ckpt_lib.load_params_and_step(path)
    params, loaded = ckpt_lib.merge_params(loaded_tree, path, fresh, run.param_shardings)
    missing = sorted(set(ckpt_lib.flatten(fresh)) - set(loaded))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} parameters of this model, e.g. {missing[:3]}")
    return params, step


def checkpoint_path(workdir: pathlib.Path, which: str) -> pathlib.Path:
    """The checkpoint that `--checkpoint=best|latest|STEP|PATH` names ("" is latest)."""
    if which in ("", "latest"):
        return workdir
    if which == "best":
        if not (workdir / ckpt_lib.BEST_FOLDER).is_dir():
            raise FileNotFoundError(f"--checkpoint=best: {workdir} holds no best checkpoint (set config.best_metric "
                                    "and an evaluator that reports it)")
        return workdir / ckpt_lib.BEST_FOLDER
    if which.isdigit():
        step_dir = workdir / "checkpoints" / which
        if not step_dir.is_dir():
            raise FileNotFoundError(f"--checkpoint={which}: {workdir}/checkpoints holds no step {which}")
        return step_dir
    if pathlib.Path(which).exists():
        return pathlib.Path(which)
    raise ConfigError(f"--checkpoint={which}: expected best, latest, a step number or a checkpoint folder")


def initial_state(run: Run, config: ml_collections.ConfigDict, tx: Any, manager: Any,
                  state_shardings: Any) -> tuple[TrainState, str]:
    """Restore order: workdir -> config.resume -> config.init_from -> fresh. Returns (state, source).
    Each restore takes the newest checkpoint that reads (see `checkpoint.restore_newest_readable`)."""
    abstract_state = jax.eval_shape(
        lambda p: TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=p, opt_state=tx.init(p)),
        nn.unbox(run.abstract_params))
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract_state, state_shardings)
    if manager.all_steps():
        (state, meta), step, damaged = ckpt_lib.restore_newest_readable(
            pathlib.Path(manager.directory), manager.all_steps(),
            lambda s: ckpt_lib.restore(manager, s, abstract_state), finite_of=lambda r: r[0])
        if damaged:  # this run writes those steps again: move the damaged folders aside, never delete them
            moved = ckpt_lib.set_aside(pathlib.Path(manager.directory), damaged)
            manager.reload()
            if moved:
                print(f"clover_jax: moved damaged step(s) {damaged} to {moved[0].parent}", flush=True)
        return state, f"workdir checkpoint step {meta['step']}"
    if config.resume:
        ckpt_dir, steps = ckpt_lib.finished_steps(config.resume)
        other = ckpt_lib.make_manager(ckpt_dir.parent, save_every=1, keep=1000, async_save=False)
        (state, _), step, _ = ckpt_lib.restore_newest_readable(
            ckpt_dir, steps, lambda s: ckpt_lib.restore(other, s, abstract_state), finite_of=lambda r: r[0])
        return state, f"resume {config.resume} step {step}"
    rng = jax.random.key(config.seed)
    batch = dummy_batch(run.model_config)
    params, _ = partitioning.create_sharded(lambda r: init_params(run.model_config, r, batch), run.mesh,
                                         logical_rules(config), rng)
    source = "fresh initialisation"
    if config.init_from:
        params, loaded = ckpt_lib.params_from_init(config.init_from, params, run.param_shardings,
                                                   include=tuple(config.init_from_include))
        source = f"init_from {config.init_from} ({len(loaded)} tensors)"
    return create_train_state(params, tx, state_shardings), source


@dataclasses.dataclass(frozen=True)
class TrainData:
    """The training examples of a run: how many one epoch visits, and the batch stream from a step."""

    examples_per_epoch: int
    batches: Callable[[int], Iterator[tuple[str, dict]]]  # start step -> (source name, global batch) per step


def train_data(run: Run) -> TrainData:
    """The caption mixture (an epoch visits every captioned clip of every source once) or the QA items of
    the training split (an epoch visits every question with a clip once)."""
    config = run.config
    if config.task in run_inputs.QA_TASKS:
        qa_items, _ = run_inputs.qa_items(config, config.data.split, run.model_config.num_answers)
        return TrainData(len(qa_items), lambda start: run_inputs.qa_train_batches(config, qa_items, start,
                                                                                  run.batch_sharding))
    mixture = run_inputs.train_mixture(config.data, run_inputs.pixel_stats_name(config))
    clips = [run_inputs.captioned_clips(source.input) for source in mixture.sources]
    examples = sum(clips)
    if mixture.mode == "alternate_official":  # the reference's epoch: n * the longest source's batches
        batch = config.data.batch_size
        mixture = dataclasses.replace(mixture, batches_per_epoch=tuple(max(1, math.ceil(c / batch)) for c in clips))
        examples = len(clips) * max(mixture.batches_per_epoch) * batch
    return TrainData(examples, lambda start: make_mixture_iterator(mixture, start, run.batch_sharding))


@dataclasses.dataclass(frozen=True)
class Durations:
    """A run's lengths in optimizer steps, resolved from epochs where the config gives epochs."""

    steps_per_epoch: float
    total_steps: int
    warmup_steps: int

    def steps(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def describe(self, examples: int, batch_size: int) -> str:
        return (f"{examples} training examples, batch {batch_size}: 1 epoch = {self.steps_per_epoch:.1f} steps; "
                f"{self.total_steps} steps = {self.total_steps / self.steps_per_epoch:.2f} epochs, "
                f"warm-up {self.warmup_steps} steps")


def resolve_durations(config: ml_collections.ConfigDict, examples_per_epoch: int) -> Durations:
    """`total_epochs` (> 0) and `optim.warmup_epochs` (> 0) in steps of `data.batch_size`, else the config's
    `total_steps` and `optim.warmup_steps`."""
    if examples_per_epoch < 1:
        raise ConfigError("the training split holds no example: prepare it, or check config.data.split")
    per_epoch = examples_per_epoch / config.data.batch_size
    if config.optim.get("schedule", "warmup_then_cosine") == "mmcv_cosine":
        # mmcv's epoch is a whole pass of its loader, the last batch partial (drop_last=False): ceil(examples /
        # batch) iterations, of `lr_steps_per_iteration` optimizer steps each
        per_iter = lr_steps_per_iteration(config)
        per_epoch = per_iter * math.ceil(per_epoch / per_iter)
    durations = Durations(per_epoch, config.total_steps, config.optim.warmup_steps)
    if config.get("total_epochs", 0) > 0:
        durations = dataclasses.replace(durations, total_steps=durations.steps(config.total_epochs))
    if config.optim.get("warmup_epochs", 0) > 0:
        durations = dataclasses.replace(durations, warmup_steps=durations.steps(config.optim.warmup_epochs))
    if durations.total_steps < 1:
        raise ConfigError(f"total_steps={durations.total_steps} must be >= 1")
    return durations


def lr_steps_per_iteration(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps per iteration of the official runner: under the official alternation its multi-loader
    runner counts one batch of every source as one iteration (one lr); else 1."""
    sources = config.data.get("sources", {}) or {}
    return len(sources) if config.data.get("mixture_mode", "") == "alternate_official" and sources else 1


def optim_config(config: ml_collections.ConfigDict, durations: Durations) -> ml_collections.ConfigDict:
    """`config.optim` with the resolved warm-up steps and, for `mmcv_cosine`, its iteration and epoch lengths
    (what `optim.make_optimizer` reads)."""
    optim = ml_collections.ConfigDict(config.optim.to_dict())
    optim.warmup_steps = durations.warmup_steps
    if optim.get("schedule", "warmup_then_cosine") == "mmcv_cosine":
        optim.steps_per_lr_iteration = lr_steps_per_iteration(config)
        optim.lr_iterations_per_epoch = round(durations.steps_per_epoch / optim.steps_per_lr_iteration)
    return optim


def init_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                     auto: bool = False, timeout_s: int = peers.DEFAULT_TIMEOUT_S) -> None:
    """Joins a multi-process run. Flags win; else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; `auto` lets JAX detect the cluster (TPU pod slices, SLURM, Open MPI). Every process
    runs the same command; nothing happens for a single process. A process silent for `timeout_s` seconds
    counts as lost: the service reports it instead of aborting the others (`peers.PeerWatch` ends them)."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if timeout_s < 1:
        raise ConfigError(f"--coordination_timeout={timeout_s} must be at least 1 (seconds)")
    if coordinator and (num_processes < 1 or process_id < 0):
        raise ConfigError("a coordinator address needs --num_processes and --process_id "
                          "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    if not coordinator and not auto:
        return
    jax.config.update("jax_enable_recoverability", True)
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id) if coordinator else {}
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=timeout_s)
