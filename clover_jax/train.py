"""Training loop: `python -m clover_jax.train --config=configs/pretrain.py[:variant] --workdir=DIR`.

One readable loop (big_vision style) over what `clover_jax.run_setup` sets up (mesh, model, restored state,
input stream): the jitted step runs over the batches, logging every `log_every` steps (metrics fetched
one step late, so the host never stalls the device), checkpointing asynchronously every
`checkpoint_every` steps, and running the evaluators of `config.evals` on their schedule and after the
last step (`evaluators.entries`). Evaluation scalars go to TensorBoard and metrics.jsonl as
`<evaluator>/<metric>`, each row with `epoch` (the epochs of training data done); with
`config.best_metric` ("<evaluator>/<metric>", `config.best_mode` "max" or "min") the best evaluated step
is kept in `<workdir>/best/` beside the newest checkpoints.

SIGTERM / SIGINT: the current step finishes, a checkpoint is written and waited for, and the process
exits 0; rerunning the same command resumes exactly (same batches, same rngs). In a multi-process run, a
process that stays silent for `--coordination_timeout` seconds ends the others with one line naming it and
the step a rerun resumes from, exit status 3 (`peers`). A non-finite loss or gradient stops the run naming
the step and the last good checkpoint. Restores take the newest checkpoint that reads
(`checkpoint.restore_newest_readable`); a workdir whose config.json describes a state of another shape is
refused (`workdir_config`); user mistakes end in one `error:` line, exit status 2.
"""
# ruff: noqa: E402  (the XLA flags and the allocator restart below run before the imports)
from __future__ import annotations

if __name__ == "__main__":  # before jax starts: its CPU compiler flags, then a restart under tcmalloc where found
    from clover_jax import launch

    launch.prepare_process(log_native_output=True)  # C++ libraries' lines go to the log file

import copy
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
from clover_jax import (
    grad_cache,
    host_allocator,
    losses,
    partitioning,
    peers,
    pixel_stats,
    run_setup,
    tasks,
    weight_decay,
)
from clover_jax.evaluators import entries
from clover_jax.kernels import execution
from clover_jax.launch import (
    USER_ERRORS,
    exit_process,
    filter_terminal_logs,
    quiet_third_party_logs,
    report_user_error,
)
from clover_jax.metric_writer import MetricWriter
from clover_jax.optim import make_optimizer
from clover_jax.run_setup import ConfigError, Run
from clover_jax.train_step import make_train_step, train_state_shardings
from clover_jax.workdir_config import check_workdir_config
from data_pipelines.build import damaged_records


def _gradient_fn(run: Run, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`make_train_step`'s loss_fn, or for config.microbatches > 1 a gradient-cached value_and_grad_fn."""
    k = config.get("microbatches", 1)
    replicas = partitioning.num_data_replicas(run.mesh)
    if k == 1:
        try:
            return {"loss_fn": tasks.loss_fn_of(config.task, run.model_config, config.loss, replicas)}
        except ValueError as err:
            raise ConfigError(str(err)) from None
    objective = tasks.EMBEDDING_OBJECTIVES[config.task](run.model_config, config.loss, replicas)
    return {"loss_fn": None, "value_and_grad_fn": grad_cache.value_and_grad(objective, k)}


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


def _best_checkpoint(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     names: list[str]) -> ckpt_lib.BestCheckpoint | None:
    metric = config.get("best_metric", "")
    if not metric:
        return None
    evaluator = metric.partition("/")[0]
    if evaluator not in names:
        raise ConfigError(f"best_metric={metric!r} names no scheduled evaluator; write '<evaluator>/<metric>' "
                          f"with one of {names}")
    try:
        return ckpt_lib.BestCheckpoint(workdir, metric, config.get("best_mode", "max"))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, dict[str, Any]]:
    """Runs (or resumes) training to `config.total_steps`, evaluating on schedule; returns the metrics of
    the evaluations after the last step, {evaluator name: metrics}."""
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = quiet_third_party_logs(workdir)
    config = copy.deepcopy(config)  # "auto" pixel statistics become the concrete choice this run saves
    config.pixel_stats, why = pixel_stats.resolve(config, workdir=workdir)
    print(f"clover_jax: {pixel_stats.describe(config.pixel_stats, why)}", flush=True)
    run = run_setup.setup_run(config)
    print(f"clover_jax: {execution.describe(run.execution)}", flush=True)
    data = run_setup.train_data(run)
    durations = run_setup.resolve_durations(config, data.examples_per_epoch)
    total = durations.total_steps
    print(f"clover_jax: {durations.describe(data.examples_per_epoch, config.data.batch_size)}", flush=True)
    tx, schedule = make_optimizer(run_setup.optim_config(config, durations), total)
    decay_rules = config.optim.get("decay_rules", "ours")
    print(f"clover_jax: {weight_decay.describe(nn.unbox(run.abstract_params), decay_rules)}", flush=True)
    if config.task == "pretrain":
        print(f"clover_jax: loss terms: {', '.join(losses.active_terms(config.loss))}", flush=True)
    state_shardings = train_state_shardings(tx, nn.unbox(run.abstract_params), run.param_shardings, run.mesh)
    manager = ckpt_lib.make_manager(workdir, save_every=config.checkpoint_every, keep=config.keep_checkpoints)
    note = check_workdir_config(workdir, config.to_dict(), has_checkpoint=bool(manager.all_steps()))
    if note:
        print(f"clover_jax: {note}", flush=True)
    names = entries.evaluator_names(config, scheduled_only=True)
    try:
        evaluators = entries.make_evaluators(config, run.model_config, run.batch_sharding, workdir / "eval", names,
                                             durations.steps_per_epoch)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    best = _best_checkpoint(config, workdir, names)
    state, source = run_setup.initial_state(run, config, tx, manager, state_shardings)
    start = int(jax.device_get(state.step))
    ckpt_lib.write_json(workdir / "config.json", config.to_dict())
    print(f"clover_jax: {source}; steps {start} -> {total}; mesh {dict(run.mesh.shape)}; "
          f"{jax.device_count()} devices, {jax.process_count()} processes; library logs: {log_file}", flush=True)

    step_fn = make_train_step(tx=tx, state_shardings=state_shardings, batch_sharding=run.batch_sharding,
                              mesh=run.mesh, schedule=schedule, rules=run_setup.logical_rules(config),
                              **_gradient_fn(run, config))
    rng = jax.random.key(config.seed + 1)
    batches = data.batches(start)
    writer = MetricWriter(workdir)
    stop = _StopRequest()
    last_good = manager.latest_step()
    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet checked on the host
    held: dict[int, dict[str, float]] = {}  # training scalars of an evaluation step, written with its results

    def due_at(step: int) -> list[str]:
        return [name for name, e in evaluators.items() if entries.is_due(e, step, total)]
    t0, t_steps, clips = time.time(), 0, 0
    batch_size = config.data.batch_size
    skip_damaged = bool(config.data.get("skip_damaged_records", False))

    def drain(upto_all: bool) -> None:
        """Fetches pending metrics (all, or all but the newest), checks finiteness, logs log_every steps and
        evaluation steps (whose row waits for the evaluation's scalars)."""
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
            if (s + 1) % config.log_every == 0 or s + 1 == total or due_at(s + 1):
                dt = time.time() - t0
                rate = t_steps / dt if dt > 0 else float("nan")
                scalars = {k: float(v) for k, v in host.items() if np.ndim(v) == 0 and k != "finite"}
                scalars.update(steps_per_s=rate, clips_per_s=clips / dt if dt > 0 else float("nan"),
                               epoch=(s + 1) / durations.steps_per_epoch)  # epochs of training data done
                if skip_damaged:  # records read so far (the input pipeline runs a few batches ahead)
                    scalars["damaged_records"] = damaged_records.records_skipped()
                eta = (total - s - 1) / rate if rate > 0 else float("nan")
                skipped = f" damaged_records={scalars['damaged_records']}" if scalars.get("damaged_records") else ""
                print(f"step {s + 1}/{total} {_format_metrics(scalars)} steps/s={rate:.2f} "
                      f"clips/s={scalars['clips_per_s']:.1f} eta={eta:.0f}s{skipped}", flush=True)
                if due_at(s + 1):
                    held[s + 1] = scalars
                else:
                    writer.write(s + 1, scalars)
                t0, t_steps, clips = time.time(), 0, 0

    def evaluate(step: int, due: list[str]) -> dict[str, dict[str, Any]]:
        """Runs the `due` evaluators on the current state, writes their scalars in the step's row of training
        scalars (a finished run evaluated again adds no row), and keeps the best state."""
        results = {name: evaluators[name].run(state.params, step) for name in due}
        if step in held:
            writer.write(step, {**held.pop(step), **{k: v for name in due
                                                     for k, v in entries.scalars(name, results[name]).items()}})
        best_of = best.metric.partition("/")[0] if best is not None else None
        if best_of in results:
            value = entries.scalars(best_of, results[best_of]).get(best.metric)
            if value is None:
                raise ConfigError(f"best_metric={best.metric!r}: the evaluator reports no such scalar")
            if best.update(step, value, state, {"step": step, "data_step": step, "seed": config.seed}):
                print(f"clover_jax: best {best.metric}={value:.4g} at step {step}", flush=True)
        return results

    step, results = start, {}
    try:
        while step < total:
            try:
                _, batch = next(batches)
            except Exception as err:  # noqa: BLE001 - only a damaged record is handled here
                damaged = damaged_records.failure_behind(err)
                if damaged is None:
                    raise
                drain(upto_all=True)
                if step > (manager.latest_step() or 0):  # keep the steps done before the damaged batch
                    ckpt_lib.save(manager, step, state, {"step": step, "data_step": step, "seed": config.seed},
                                  force=True)
                    manager.wait_until_finished()
                damaged.saved_step = manager.latest_step()
                raise damaged from None
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
                for s in sorted(held):  # stopped before its evaluation: the training scalars still go out
                    writer.write(s, held.pop(s))
                manager.wait_until_finished()
                print(f"clover_jax: received signal {stop.signal}; saved step {step}; exiting", flush=True)
                writer.close()
                return {}
            due = due_at(step)
            if due:
                drain(upto_all=True)  # evaluate finite states only
                results = evaluate(step, due)
                t0, t_steps, clips = time.time(), 0, 0  # evaluation time is not training throughput
        drain(upto_all=True)
        if start == total:  # nothing left to train: evaluate the finished run again
            results = evaluate(step, due_at(step))
    finally:
        manager.wait_until_finished()
        if best is not None:
            best.wait_until_finished()
    writer.close()
    return results


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    malloc = host_allocator.applied_allocator()
    if malloc:
        print(f"clover_jax: host malloc: {malloc}", flush=True)
    filter_terminal_logs()  # jax.distributed logs at INFO before train() opens the log file
    watch, code = None, 0
    try:
        timeout = flags.FLAGS.coordination_timeout
        run_setup.init_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id,
                                   flags.FLAGS.distributed_auto, timeout)
        if jax.process_count() > 1:
            print(f"clover_jax: process {jax.process_index()} of {jax.process_count()}; a process silent for "
                  f"{timeout} s ends the run (--coordination_timeout)", flush=True)
            watch = peers.PeerWatch(workdir, timeout)
        train(config, workdir)
    except NonFiniteLossError as err:  # the run diverged: not a usage mistake, but nothing to add to it
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except USER_ERRORS + (ConfigError,) as err:
        exit_process(report_user_error(err))
    except Exception as err:  # noqa: BLE001 - two faults become one line; anything else keeps its traceback
        damaged = damaged_records.failure_behind(err)  # a damaged dataset record (from tf.data or eval)
        if damaged is not None:
            exit_process(report_user_error(damaged))
        if watch is not None:  # a step or a fetch that failed because another process is gone: one line, exit 3
            watch.verdict(err)
        raise
    if watch is not None:
        watch.finish()
    sys.exit(code)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/pretrain.py", "run config file[:arg]", lock_config=True)
    flags.DEFINE_string("workdir", os.path.join("workdirs", "demo"), "checkpoints, logs and reports go here")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs")
    flags.DEFINE_integer("num_processes", 0, "number of processes of a multi-process run")
    flags.DEFINE_integer("process_id", -1, "this process's index in a multi-process run")
    flags.DEFINE_bool("distributed_auto", False, "let JAX detect the cluster (TPU pod, SLURM, Open MPI)")
    flags.DEFINE_integer("coordination_timeout", peers.DEFAULT_TIMEOUT_S,
                         "seconds a process of a multi-process run may stay silent before the others stop")


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
