"""Compile a run's step for chips this host lacks: `python -m clover_jax.compile --config=... --topology=v5p-32`.

It builds the step `clover_jax.train` would run (`--step=train`, default) or the evaluators' video-embedding
pass (`--step=embed`) for the compile-only devices of `--topology` (x `--num_slices`), with libtpu's compiler
for TPU names and the CUDA plugin's for `h100` (`clover_jax.aot`), and prints per chip: the execution policy,
arguments, temporaries and peak against the chip's HBM, FLOPs (XLA's and the analytic model count) and bytes
accessed, the collectives of the program (count and bytes), and a roofline lower bound on the step time
(max of FLOPs / chip peak and bytes / HBM bandwidth, from `aot.CHIPS`). Exit status 1 when the step does not
fit the chip's HBM (the largest buffers are named), 2 for a usage mistake. `--json=PATH` also writes the
figures. Any `--config.x=...` override applies, as for `train`.
"""
# ruff: noqa: E402  (the environment below is set before jax is imported)
from __future__ import annotations

import os

if __name__ == "__main__":  # a CPU host compiling for accelerators: no accelerator client, libtpu kept quiet
    import sys

    from clover_jax.aot import set_compile_only_environment

    topology_flags = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")]
    set_compile_only_environment(topology=topology_flags[-1] if topology_flags else "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import json
import math
import pathlib
import re
import sys
from typing import Any

import ml_collections

from clover_jax import aot
from clover_jax.kernels import execution
from clover_jax.launch import USER_ERRORS, exit_process, report_user_error
from clover_jax.run_setup import ConfigError

STEPS = ("train", "embed")


def _gib(n: float) -> str:
    return f"{n / aot.GIB:.2f} GiB"


def compile_report(config: ml_collections.ConfigDict, topology_name: str, num_slices: int = 1,
                   step: str = "train") -> dict[str, Any]:
    """Compiles `step` of `config` for the topology and returns the per-chip figures (see the module docstring)."""
    from clover_jax.model_flops import clover_train_flops

    if step not in STEPS:
        raise ConfigError(f"--step={step!r}; valid: {', '.join(STEPS)}")
    topology = aot.parse_topology(topology_name)
    devices = aot.compile_devices(topology, num_slices)
    try:
        compiled, run, seconds = (aot.compile_train_step if step == "train" else aot.compile_embedding_step)(
            config, devices)
    except aot.CompilerOutOfMemory as refused:
        return _refused_report(config, topology, num_slices, step, len(devices), refused)
    memory = compiled.memory_analysis()
    arguments, outputs = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
    aliased, temporaries = int(memory.alias_size_in_bytes), int(memory.temp_size_in_bytes)
    peak = arguments + outputs - aliased + temporaries
    cost = aot.cost_of(compiled)
    hlo = compiled.as_text()
    chip, chips = topology.chip, len(devices)
    per_chip_batch = (config.data.batch_size if step == "train" else config.eval.batch_size) / chips
    analytic = (clover_train_flops(run.model_config, config.data.batch_size, config.data.text_length)["train"] / chips
                if step == "train" else float("nan"))
    flops = float(cost.get("flops", float("nan")))
    bytes_accessed = float(cost.get("bytes accessed", float("nan")))
    # The analytic count is the floor where XLA counts a loop body once (a scanned encoder reads low).
    roofline_flops = max((x for x in (flops, analytic) if not math.isnan(x)), default=0.0)
    compute_s = roofline_flops / (chip.bf16_tflops * 1e12)
    memory_s = bytes_accessed / (chip.hbm_gbps * 1e9) if bytes_accessed == bytes_accessed else 0.0
    return dict(
        topology=topology.name, chip=topology.chip_name, shape=topology.shape, num_slices=num_slices,
        chips=chips, step=step, config_batch=config.data.batch_size if step == "train" else config.eval.batch_size,
        clips_per_chip=per_chip_batch, mesh=dict(run.mesh.shape), policy=execution.describe(run.execution),
        model=dict(remat=run.model_config.remat, video_batching=run.model_config.video_batching,
                   dtype=run.model_config.dtype, microbatches=config.get("microbatches", 1)),
        compile_s=round(seconds, 1), arguments=arguments, outputs=outputs, aliased=aliased, temporaries=temporaries,
        peak=peak, hbm=int(chip.hbm_gib * aot.GIB), fits=peak <= chip.hbm_gib * aot.GIB,
        xla_flops=flops, analytic_flops=analytic, bytes_accessed=bytes_accessed,
        roofline_s=max(compute_s, memory_s), compute_s=compute_s, memory_s=memory_s,
        collectives=aot.hlo_collectives(hlo), largest_buffers=aot.largest_buffers(hlo),
    )


def _refused_report(config: ml_collections.ConfigDict, topology: Any, num_slices: int, step: str, chips: int,
                    refused: "aot.CompilerOutOfMemory") -> dict[str, Any]:
    """The report of a step the compiler refused for memory: what it needed (its message), nothing compiled."""
    needed = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(refused))
    temporaries, available = (float(needed.group(1)) * aot.GIB, float(needed.group(2)) * aot.GIB) if needed else (
        math.nan, topology.chip.hbm_gib * aot.GIB)
    run, nan = refused.run, math.nan
    batch = config.data.batch_size if step == "train" else config.eval.batch_size
    return dict(
        topology=topology.name, chip=topology.chip_name, shape=topology.shape, num_slices=num_slices, chips=chips,
        step=step, config_batch=batch, clips_per_chip=batch / chips, mesh=dict(run.mesh.shape),
        policy=execution.describe(run.execution),
        model=dict(remat=run.model_config.remat, video_batching=run.model_config.video_batching,
                   dtype=run.model_config.dtype, microbatches=config.get("microbatches", 1)),
        compile_s=round(refused.seconds, 1), arguments=nan, outputs=nan, aliased=nan, temporaries=temporaries,
        peak=temporaries, hbm=int(topology.chip.hbm_gib * aot.GIB), available=available, fits=False,
        refused=str(refused), xla_flops=nan, analytic_flops=nan, bytes_accessed=nan, roofline_s=nan, compute_s=nan,
        memory_s=nan, collectives={}, largest_buffers=refused.buffers,
    )


def format_report(r: dict[str, Any]) -> str:
    """The report as the lines `main` prints."""
    slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
    if r.get("refused"):
        return "\n".join([
            f"{r['step']} step for {r['topology']} ({r['chips']} {r['chip']} chips, {r['shape']}{slices}): the "
            f"compiler refused it after {r['compile_s']} s; mesh {r['mesh']}; {r['clips_per_chip']:g} clips per chip "
            f"(batch {r['config_batch']})",
            f"model: remat {r['model']['remat']}, video batching {r['model']['video_batching']}, "
            f"{r['model']['dtype']}, microbatches {r['model']['microbatches']}",
            r["policy"],
            f"per chip: DOES NOT FIT: temporaries alone {_gib(r['temporaries'])} of {_gib(r['available'])} available "
            f"HBM ({r['refused'][:300]})",
            "largest values before partitioning (global shapes): " + "; ".join(
                f"{b / aot.GIB:.2f} GiB {shape} ({name})" for b, shape, name in r["largest_buffers"]),
        ])
    lines = [
        f"compiled {r['step']} step for {r['topology']} ({r['chips']} {r['chip']} chips, {r['shape']}{slices}) "
        f"in {r['compile_s']} s; "
        f"mesh {r['mesh']}; {r['clips_per_chip']:g} clips per chip (batch {r['config_batch']})",
        f"model: remat {r['model']['remat']}, video batching {r['model']['video_batching']}, "
        f"{r['model']['dtype']}, microbatches {r['model']['microbatches']}",
        r["policy"],
        f"per chip: arguments {_gib(r['arguments'])}, outputs {_gib(r['outputs'])} ({_gib(r['aliased'])} aliased), "
        f"temporaries {_gib(r['temporaries'])}; peak {_gib(r['peak'])} of {_gib(r['hbm'])} HBM "
        f"({'fits' if r['fits'] else 'DOES NOT FIT'})",
        f"per chip: {r['xla_flops'] / 1e12:.3g} TFLOP (XLA), "
        + (f"{r['analytic_flops'] / 1e12:.3g} TFLOP (model matmuls), " if r["analytic_flops"] == r["analytic_flops"]
           else "")
        + f"{r['bytes_accessed'] / 1e9:.1f} GB accessed",
        f"roofline lower bound: {r['roofline_s'] * 1e3:.1f} ms per step (compute {r['compute_s'] * 1e3:.1f} ms, "
        f"HBM {r['memory_s'] * 1e3:.1f} ms)",
    ]
    if not r["collectives"]:
        lines.append("collectives: none")
    for kind, entry in sorted(r["collectives"].items()):
        largest = ", ".join(f"{b / 2**20:.1f} MiB {'/'.join(name.split('/')[-3:]) or '?'}"
                            for b, name in entry["largest"])
        lines.append(f"collective {kind}: {entry['count']} ops, {entry['bytes'] / 2**20:.1f} MiB; largest: {largest}")
    if not r["fits"]:
        lines.append("largest buffers: " + "; ".join(f"{b / aot.GIB:.2f} GiB {shape} ({name})"
                                                     for b, shape, name in r["largest_buffers"]))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    f = flags.FLAGS
    try:
        report = compile_report(f.config, f.topology, f.num_slices, f.step)
    except USER_ERRORS + (ConfigError,) as err:
        exit_process(report_user_error(err))
    print(format_report(report), flush=True)
    if f.json:
        strict = json.loads(json.dumps(report, default=str), parse_constant=lambda _: None)  # NaN -> null
        pathlib.Path(f.json).write_text(json.dumps(strict, indent=1, allow_nan=False) + "\n")
    exit_process(0 if report["fits"] else 1)


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/pretrain.py", "run config file[:arg]", lock_config=True)
    flags.DEFINE_string("topology", "v5p-8", "e.g. v5p-32, v5e-16, v4-8, v5p:2x2x4, h100-8")
    flags.DEFINE_integer("num_slices", 1, "slices of the topology (multi-slice, over DCN)")
    flags.DEFINE_string("step", "train", f"which program: {', '.join(STEPS)}")
    flags.DEFINE_string("json", "", "also write the figures to this file")


if __name__ == "__main__":
    from absl import app, flags

    from clover_jax.train import _one_line_flag_error

    try:
        _define_flags()
        flags.FLAGS(sys.argv)
    except Exception as err:  # noqa: BLE001 - absl/ml_collections raise several types for bad flags
        print(_one_line_flag_error(err, sys.argv), file=sys.stderr)
        sys.exit(2)
    app.run(main, flags_parser=lambda argv: list(argv))
