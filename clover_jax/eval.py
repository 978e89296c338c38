"""Evaluation CLI: runs the evaluators of a run's config (`config.evals`) on any of its checkpoints.

  python -m clover_jax.eval --workdir=W                         # every scheduled evaluator, latest checkpoint
  python -m clover_jax.eval --workdir=W --evaluator=retrieval --checkpoint=best
  python -m clover_jax.eval --workdir=W --evaluator=msrvtt_mc --config.evals.msrvtt_mc.file=msrvtt_mc_test.jsonl
  python -m clover_jax.eval --workdir=W --checkpoint=PATH --config=configs/pretrain.py:base

`--checkpoint` is best (the run's best step, `config.best_metric`), latest (default), a step number, or a
checkpoint / converter-output folder. `--config.KEY=VALUE` overrides a key of the run's config (typed
like the value it replaces). Each evaluator prints the table training prints and writes
`W/eval/<name>_step{N}.json` (retrieval also `<name>_step{N}.html`); see `evaluators.entries`.
"""
# ruff: noqa: E402  (the XLA flags and the allocator restart below run before the imports)
from __future__ import annotations

if __name__ == "__main__":  # before jax starts: its CPU compiler flags, then a restart under tcmalloc where found
    from clover_jax import launch

    launch.prepare_process(log_native_output=True)  # C++ libraries' lines go to the log file

import json
import pathlib
from typing import Any

import ml_collections

from clover_jax import pixel_stats, run_setup
from clover_jax.evaluators import entries
from clover_jax.kernels import execution
from clover_jax.launch import (
    USER_ERRORS,
    OneLineArgumentParser,
    exit_process,
    quiet_third_party_logs,
    report_user_error,
)
from data_pipelines.build import damaged_records


def _set(config: ml_collections.ConfigDict, override: str) -> None:
    """Applies `--config.a.b=value`: the value is typed like the one it replaces (JSON for lists/dicts)."""
    key, sep, raw = override.removeprefix("--config.").partition("=")
    if not sep or not key:
        raise run_setup.ConfigError(f"{override}: expected --config.KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise run_setup.ConfigError(f"{override}: the config has no key {part!r}")
        node = node[part]
    if leaf not in node:
        raise run_setup.ConfigError(f"{override}: the config has no key {key!r}")
    old = node[leaf]
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            value: Any = raw.lower() in ("true", "1")
        elif isinstance(old, (int, float)):
            value = type(old)(raw)
        elif isinstance(old, str):
            value = raw
        else:
            value = json.loads(raw)
    except ValueError as err:
        raise run_setup.ConfigError(f"{override}: {err}") from None
    node[leaf] = value


def main(argv: list[str] | None = None) -> int:
    """CLI: evaluate a run's checkpoint with the run's own evaluators."""
    parser = OneLineArgumentParser(prog="python -m clover_jax.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the training workdir (holds config.json, checkpoints/)")
    parser.add_argument("--checkpoint", default="latest", help="best, latest, a step number or a checkpoint folder")
    parser.add_argument("--evaluator", default="", help="one entry of config.evals (default: every scheduled one)")
    parser.add_argument("--config", default="", help="config file[:arg], when the workdir has no config.json")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _evaluate(args, overrides)
    except USER_ERRORS as err:  # ConfigError is a ValueError
        return report_user_error(err)
    except Exception as err:  # noqa: BLE001 - a damaged test record (raised through tf.data) is one line
        damaged = damaged_records.failure_behind(err)
        if damaged is None:
            raise
        return report_user_error(damaged)


def _evaluate(args: Any, overrides: list[str]) -> int:
    workdir = pathlib.Path(args.workdir).absolute()
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir={args.workdir} does not exist (pass a training run's workdir)")
    config = run_setup.load_run_config(workdir, args.config)
    for override in overrides:
        _set(config, override)
    available = entries.evaluator_names(config)
    if args.evaluator and args.evaluator not in available:
        raise run_setup.ConfigError(f"--evaluator={args.evaluator}: the run's config has no such evaluator; "
                                  f"valid: {', '.join(available) or 'none'}")
    names = [args.evaluator] if args.evaluator else entries.evaluator_names(config, scheduled_only=True)
    checkpoint = run_setup.checkpoint_path(workdir, args.checkpoint)
    log_file = quiet_third_party_logs(workdir, "eval")
    print(f"clover_jax: library logs: {log_file}", flush=True)  # where a crash in C++ code leaves its trace
    config.pixel_stats, why = pixel_stats.resolve(config, checkpoint=checkpoint)
    print(f"clover_jax: {pixel_stats.describe(config.pixel_stats, why)}", flush=True)
    run = run_setup.setup_run(config)
    print(f"clover_jax: {execution.describe(run.execution)}", flush=True)
    try:
        evaluators = entries.make_evaluators(config, run.model_config, run.batch_sharding, workdir / "eval", names)
    except ValueError as err:
        raise run_setup.ConfigError(str(err)) from None
    params, step = run_setup.load_params_for_eval(run, checkpoint)
    for evaluator in evaluators.values():
        evaluator.run(params, step)
    return 0


if __name__ == "__main__":
    exit_process(main())
