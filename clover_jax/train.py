"""Training entry point: `python -m clover_jax.train --config=configs/pretrain.py[:variant] --workdir=DIR`.

One readable loop (big_vision style): set up the mesh and the model, create or restore the state
(workdir -> config.resume -> config.init_from -> fresh), then run the jitted step over the input
stream, logging every `log_every` steps (metrics fetched one step late, so the host never stalls the
device), checkpointing asynchronously every `checkpoint_every` steps, and finally evaluating retrieval.

SIGTERM / SIGINT: the current step finishes, a checkpoint is written and waited for, and the process
exits 0; rerunning the same command resumes exactly (same batches, same rngs). A non-finite loss or
gradient stops the run naming the step and the last good checkpoint. Restores take the newest checkpoint
that reads (`checkpoint.restore_newest_readable`); a workdir whose config.json describes a state of
another shape is refused (`workdir_config`); user mistakes end in one `error:` line, exit status 2.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from clover_jax import checkpoint as ckpt_lib
from clover_jax import data as data_glue
from clover_jax import grad_cache
from clover_jax import sharding as shard_lib
from clover_jax import tasks
from clover_jax.models.clover import CloverConfig, clover_config, dummy_batch, init_params
from clover_jax.optim import make_optimizer
from clover_jax.run_logging import USER_ERRORS, exit_process, quiet_third_party_logs, report_user_error
from clover_jax.train_step import TrainState, create_train_state, make_train_step, train_state_shardings
from clover_jax.workdir_config import check_workdir_config
from data_pipelines.input_pipeline import make_mixture_iterator


class ConfigError(ValueError):
    """A config value that cannot work; the message says what to change."""


@dataclasses.dataclass
class Run:
    """What every entry point derives from a config: mesh, model config, shardings."""

    config: ml_collections.ConfigDict
    mesh: Any
    batch_sharding: Any
    model_config: CloverConfig
    abstract_params: Any  # boxed (logical axes), from eval_shape
    param_shardings: Any


def model_config_from(config: ml_collections.ConfigDict) -> CloverConfig:
    """The model of a run: its preset, sized for the training clips unless `model.overrides` says otherwise
    (fine-tuning on longer clips keeps the pre-training fusion tables with overrides.num_frames)."""
    m = config.model
    kw = dict(num_frames=config.data.num_frames, image_size=config.data.image_size, dtype=m.dtype,
              remat=m.remat, h_v_input=m.h_v_input)
    overrides = dict(m.get("overrides", {}))
    video_overrides = {"attention": m.get("attention", "auto"), **overrides.pop("video_overrides", {})}
    kw.update(overrides)
    return clover_config(m.preset, video_overrides=video_overrides, **kw)


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


def setup_run(config: ml_collections.ConfigDict) -> Run:
    """Mesh, model config and parameter shardings; config errors surface here as one-line messages."""
    enable_compilation_cache(config)
    mesh = shard_lib.make_mesh(dict(config.mesh))
    try:
        shard_lib.check_global_batch(config.data.batch_size, mesh)
        shard_lib.check_global_batch(config.eval.batch_size, mesh)
    except ValueError as err:
        raise ConfigError(f"data.batch_size / eval.batch_size: {err}") from None
    check_microbatches(config, mesh)
    model_config = model_config_from(config)
    batch = dummy_batch(model_config)
    abstract = jax.eval_shape(lambda r: init_params(model_config, r, batch), jax.random.key(0))
    return Run(config, mesh, shard_lib.batch_sharding(mesh), model_config, abstract,
               shard_lib.param_shardings(abstract, mesh))


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
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as err:
        raise ConfigError(f"{path} is not a readable config ({err}); pass --config=configs/<file>.py[:arg]") from None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config of `file.py[:arg]` (its `get_config(arg)`)."""
    import importlib.util

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


def _loss_fn(run: Run, config: ml_collections.ConfigDict):
    replicas = shard_lib.num_data_replicas(run.mesh)
    if config.task == "pretrain":
        return tasks.pretrain_loss_fn(run.model_config, config.loss, replicas)
    if config.task == "retrieval":
        return tasks.retrieval_loss_fn(run.model_config, config.loss, replicas)
    if config.task == "qa_open_ended":
        return tasks.qa_open_ended_loss_fn(run.model_config, config.loss, replicas)
    if config.task == "qa_multiple_choice":
        return tasks.qa_multiple_choice_loss_fn(run.model_config, config.loss, replicas)
    if config.task == "qa_fill_in_blank":
        return tasks.qa_fill_in_blank_loss_fn(run.model_config, config.loss, replicas)
    raise ConfigError(f"config.task={config.task!r}; valid: 'pretrain', 'retrieval', 'qa_open_ended', "
                      "'qa_multiple_choice', 'qa_fill_in_blank'")


def check_microbatches(config: ml_collections.ConfigDict, mesh: Any) -> None:
    """Raises ConfigError unless `config.microbatches` (default 1) can split this run's training batch."""
    k = config.get("microbatches", 1)
    if k != 1 and config.task not in tasks.EMBEDDING_OBJECTIVES:
        raise ConfigError(f"microbatches={k}: gradient caching supports the tasks "
                          f"{sorted(tasks.EMBEDDING_OBJECTIVES)}, not {config.task!r}; use microbatches=1")
    try:
        grad_cache.check_microbatches(config.data.batch_size, k, shard_lib.num_data_replicas(mesh))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _gradient_fn(run: Run, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`make_train_step`'s loss_fn, or for config.microbatches > 1 a gradient-cached value_and_grad_fn."""
    k = config.get("microbatches", 1)
    if k == 1:
        return {"loss_fn": _loss_fn(run, config)}
    objective = tasks.EMBEDDING_OBJECTIVES[config.task](run.model_config, config.loss,
                                                        shard_lib.num_data_replicas(run.mesh))
    return {"loss_fn": None, "value_and_grad_fn": grad_cache.value_and_grad(objective, k)}


def _initial_state(run: Run, config, workdir: pathlib.Path, tx, manager, state_shardings) -> tuple[TrainState, str]:
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
    params, _ = shard_lib.create_sharded(lambda r: init_params(run.model_config, r, batch), run.mesh,
                                         shard_lib.LOGICAL_RULES, rng)
    source = "fresh initialisation"
    if config.init_from:
        params, loaded = ckpt_lib.params_from_init(config.init_from, params, run.param_shardings,
                                                   include=tuple(config.init_from_include))
        source = f"init_from {config.init_from} ({len(loaded)} tensors)"
    return create_train_state(params, tx, state_shardings), source


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signum


class NonFiniteLossError(RuntimeError):
    pass


def _format_metrics(m: dict[str, float]) -> str:
    keys = ["loss", "mlm", "nce_video_anchor", "rank_video_anchor", "nce_text_anchor", "rank_text_anchor",
            "infonce", "acc_t2v", "accuracy", "grad_norm", "lr"]
    return " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


class MetricWriter:
    """Progress scalars to TensorBoard (workdir/tb) and a JSONL copy (workdir/metrics.jsonl), process 0."""

    def __init__(self, workdir: pathlib.Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            import tensorflow as tf

            self._tf = tf
            self._tb = tf.summary.create_file_writer(str(workdir / "tb"))
            self._jsonl = open(workdir / "metrics.jsonl", "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        with self._tb.as_default():
            for k, v in scalars.items():
                self._tf.summary.scalar(k, v, step=step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Runs (or resumes) training to `config.total_steps`, then evaluates; returns the final metrics."""
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = quiet_third_party_logs(workdir)
    run = setup_run(config)
    total = config.total_steps
    if total < 1:
        raise ConfigError(f"total_steps={total} must be >= 1")
    tx, schedule = make_optimizer(config.optim, total)
    state_shardings = train_state_shardings(tx, nn.unbox(run.abstract_params), run.param_shardings, run.mesh)
    manager = ckpt_lib.make_manager(workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints)
    note = check_workdir_config(workdir, config.to_dict(), has_checkpoint=bool(manager.all_steps()))
    if note:
        print(f"clover_jax: {note}", flush=True)
    state, source = _initial_state(run, config, workdir, tx, manager, state_shardings)
    start = int(jax.device_get(state.step))
    ckpt_lib.write_json(workdir / "config.json", config.to_dict())
    print(f"clover_jax: {source}; steps {start} -> {total}; mesh {dict(run.mesh.shape)}; "
          f"{jax.device_count()} devices, {jax.process_count()} processes; library logs: {log_file}", flush=True)

    step_fn = make_train_step(tx=tx, state_shardings=state_shardings, batch_sharding=run.batch_sharding,
                              mesh=run.mesh, schedule=schedule, **_gradient_fn(run, config))
    rng = jax.random.key(config.seed + 1)
    if config.task in data_glue.QA_TASKS:
        qa_items, _ = data_glue.qa_items(config, config.data.split, run.model_config.num_answers)
        batches = data_glue.qa_train_batches(config, qa_items, start, run.batch_sharding)
    else:
        batches = make_mixture_iterator(data_glue.train_mixture(config.data), start, run.batch_sharding)
    writer = MetricWriter(workdir)
    stop = _StopRequest()
    last_good = manager.latest_step()
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet checked on the host
    t0, t_steps, clips = time.time(), 0, 0
    batch_size = config.data.batch_size

    def drain(upto_all: bool) -> None:
        """Fetches pending metrics (all, or all but the newest), checks finiteness, logs log_every steps."""
        nonlocal t0, t_steps, clips
        keep = 0 if upto_all else 1
        while len(pending) > keep:
            s, m = pending.pop(0)
            host = jax.device_get(m)
            if not bool(host["finite"]):
                where = (f"last good checkpoint: {manager.directory / str(last_good)}" if last_good is not None
                         else "no checkpoint was written yet")
                raise NonFiniteLossError(f"non-finite loss or gradient at step {s + 1} "
                                         f"(loss={float(host['loss'])}); {where}")
            if (s + 1) % config.log_every == 0 or s + 1 == total:
                dt = time.time() - t0
                rate = t_steps / dt if dt > 0 else float("nan")
                scalars = {k: float(v) for k, v in host.items() if np.ndim(v) == 0 and k != "finite"}
                scalars.update(steps_per_s=rate, clips_per_s=clips / dt if dt > 0 else float("nan"))
                eta = (total - s - 1) / rate if rate > 0 else float("nan")
                print(f"step {s + 1}/{total} {_format_metrics(scalars)} steps/s={rate:.2f} "
                      f"clips/s={scalars['clips_per_s']:.1f} eta={eta:.0f}s", flush=True)
                writer.write(s + 1, scalars)
                t0, t_steps, clips = time.time(), 0, 0

    step = start
    try:
        while step < total:
            _, batch = next(batches)
            state, metrics = step_fn(state, batch, rng)
            pending.append((step, metrics))
            step += 1
            t_steps, clips = t_steps + 1, clips + batch_size
            drain(upto_all=False)
            if step % config.checkpoint_every == 0 or step == total or stop.signal is not None:
                drain(upto_all=True)  # never checkpoint a non-finite state
                ckpt_lib.save(manager, step, state, {"step": step, "data_step": step, "seed": config.seed},
                              force=True)
                last_good = step
            if stop.signal is not None:
                manager.wait_until_finished()
                print(f"clover_jax: received signal {stop.signal}; saved step {step}; exiting", flush=True)
                writer.close()
                return {"stopped_at": step}
        drain(upto_all=True)
    finally:
        manager.wait_until_finished()
    writer.close()

    if config.task in data_glue.QA_TASKS:
        from clover_jax.eval import evaluate_qa

        return evaluate_qa(config, run.model_config, state.params, run.batch_sharding, workdir / "eval", step)
    from clover_jax.eval import evaluate_retrieval

    eval_dataset = data_glue.resolve_dataset(config.eval.dataset, config.data)
    eval_cfg = data_glue.eval_input(config.eval, config.data, eval_dataset)
    return evaluate_retrieval(run.model_config, state.params, eval_cfg, run.batch_sharding, workdir / "eval",
                              step, report_queries=config.eval.report_queries)


def init_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                     auto: bool = False) -> None:
    """Joins a multi-process run. Flags win; else JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID; `auto` lets JAX detect the cluster (TPU pod slices, SLURM, Open MPI). Every process
    runs the same command; nothing happens for a single process."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if coordinator:
        if num_processes < 1 or process_id < 0:
            raise ConfigError("a coordinator address needs --num_processes and --process_id "
                              "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif auto:
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    try:
        init_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id,
                         flags.FLAGS.distributed_auto)
        train(config, workdir)
    except NonFiniteLossError as err:  # the run diverged: not a usage mistake, but nothing to add to it
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except USER_ERRORS + (ConfigError,) as err:
        exit_process(report_user_error(err))


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/pretrain.py", "run config file[:arg]", lock_config=True)
    flags.DEFINE_string("workdir", os.path.join("workdirs", "demo"), "checkpoints, logs and reports go here")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs")
    flags.DEFINE_integer("num_processes", 0, "number of processes of a multi-process run")
    flags.DEFINE_integer("process_id", -1, "this process's index in a multi-process run")
    flags.DEFINE_bool("distributed_auto", False, "let JAX detect the cluster (TPU pod, SLURM, Open MPI)")


def _one_line_flag_error(err: Exception, argv: list[str]) -> str:
    """A flag-parsing failure as one line naming the offending argument (absl/ml_collections wrap the
    real message in reprs and tracebacks)."""
    raw = str(err).replace("\\n", "\n").replace("\\'", "'")
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    text = (lines[-1] if "Traceback" in raw else " ".join(lines)).strip("'\"")
    text = re.sub(r"(\w)'(\s)", r"\1:\2", text)  # "lrr' Did you mean" -> "lrr: Did you mean"
    culprits = [a for a in argv[1:] if a.startswith("--config") and
                any(f"'{part}'" in raw or part in text for part in a.split("=")[0].split(".")[1:])]
    culprit = culprits[0] if culprits else "bad flags"
    if not culprit.isprintable():
        culprit = ascii(culprit)
    return " ".join(f"error: {culprit}: {text}".split())  # one line, whatever the argument held


if __name__ == "__main__":
    from absl import app, flags

    try:
        _define_flags()  # reads the --config.* overrides from sys.argv
        flags.FLAGS(sys.argv)  # parse here so a config typo is one line, not a traceback
    except Exception as err:  # noqa: BLE001 - absl/ml_collections raise several types for bad flags
        print(_one_line_flag_error(err, sys.argv), file=sys.stderr)
        sys.exit(2)
    app.run(main, flags_parser=lambda argv: list(argv))  # already parsed above
