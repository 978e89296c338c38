"""Benchmark: step time, MFU and memory of the `:base` pre-training step per window-attention variant (GPU).

  .venv/bin/python -m benchmarks.gpu_step [--config configs/pretrain.py:base] [--batch-per-device 8]
      [--attention einsum,fused,chunked,dot_product,per_clip] [--dtype bf16] [--remat on] [--steps 5]
      [--max-batch 0] [--batch-resolution 1] [--mesh data=1] [--matmul-size 0] [--in-process] [--json]

The prepared check for one GPU (H200; CUDA wheel `pip install "jax[cuda12]==0.10.2"`); on CPU it runs with
a small config, which is how it is tested (`--config configs/pretrain.py:tiny`). Each variant of
`config.kernels.window_attention` (default: every `kernels.ops.WINDOW_ATTENTION` entry) or model.video_batching=per_clip
runs in a child process of its own (its own device memory and peak counter; a hard XLA abort becomes its
error row): the real step, compiled by `benchmarks.memory.compile_step`, executed on a freshly initialised
train state and a random batch. Per row: median step time after 2 warm-ups, clips/s, the analytic model
FLOP/s (`clover_jax.model_flops.clover_train_flops`), MFU = its share of one device's measured `jnp.dot` FLOP/s in the
compute dtype (n³; n = 8192 on GPU, 1024 elsewhere), compile time, XLA's planned peak (`memory_analysis()`:
arguments + outputs - aliased + temporaries) and the allocator's `peak_bytes_in_use` (GPU/TPU), shown only
when the row's own steps raised that process-wide high-water mark.

`--max-batch N` also finds each variant's largest per-device batch <= N that fits: doubling from
`--batch-per-device`, then bisection to within `--batch-resolution`; each probe compiles and runs one step,
and an XLA RESOURCE_EXHAUSTED / out-of-memory error means it does not fit. That batch is then timed with
the probe's executable. Every probe is a compile: narrow `--attention` for the search. JAX on GPU takes 75%
of the device's memory (the limit printed); XLA_PYTHON_CLIENT_MEM_FRACTION=.95 searches nearly all of it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

from benchmarks.memory import GIB, Setting, compile_step, compiled_measurement, git_state, load_config, parse_mesh

if __name__ == "__main__":  # before jax is imported; both only touch the CPU backend
    from clover_jax import launch

    launch.prepare_process()  # the XLA flags and the malloc `python -m clover_jax.train` runs with

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.train_step import matmul_flops_per_second, random_batch  # noqa: E402
from clover_jax import (
    optim,  # noqa: E402
    partitioning,  # noqa: E402
    run_setup,  # noqa: E402
)
from clover_jax import train_step as ts  # noqa: E402
from clover_jax.kernels.ops import WINDOW_ATTENTION  # noqa: E402
from clover_jax.model_flops import clover_train_flops  # noqa: E402
from clover_jax.models.clover import dummy_batch, init_params  # noqa: E402

VARIANTS = (*WINDOW_ATTENTION, "per_clip")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is XLA failing to allocate device memory (at compile or run time)."""
    message = str(err)
    return isinstance(err, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower())


def largest_fitting_batch(fits: Callable[[int], bool], start: int, cap: int, resolution: int = 1) -> int:
    """The largest b <= cap with fits(b) (0 if none), for a `fits` true up to some batch and false above:
    doubling from `start`, then bisection until the gap between fitting and failing is <= `resolution`."""
    fitting, failing = 0, cap + 1
    b = max(1, min(start, cap))
    while fitting < b < failing:
        if fits(b):
            fitting, b = b, min(2 * b, cap)
        else:
            failing = b
    while failing - fitting > max(1, resolution):
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return fitting


def device_memory(key: str) -> int | None:
    """The largest `memory_stats()[key]` over the local devices; None where the backend keeps none (CPU)."""
    values = [(d.memory_stats() or {}).get(key) for d in jax.local_devices()]
    return max((v for v in values if v is not None), default=None)


@dataclasses.dataclass
class Row:
    attention: str
    batch_per_device: int
    role: str  # "timed", or "largest fitting" from the search
    global_batch: int = 0
    step_s: float = math.nan
    train_flops: int = 0
    compile_s: float = math.nan
    memory: dict[str, int] = dataclasses.field(default_factory=dict)  # memory_analysis() sizes, bytes
    device_peak: int | None = None
    finite: bool | None = None
    error: str = ""
    out_of_memory: bool = False


class StepRunner:
    """Compiles and runs one variant's step at any per-device batch. The state is initialised once and then
    carried from step to step (it is donated), again only after a failed step has consumed it."""

    def __init__(self, spec: str, mesh_axes: dict[str, int], setting: Setting):
        self.spec, self.mesh_axes, self.setting = spec, mesh_axes, setting
        self.replicas = mesh_axes["data"] * mesh_axes["fsdp"]  # the batch axes
        self.config = self.config_for(1)
        self.run = run_setup.setup_run(self.config)
        self.tx, _ = optim.make_optimizer(self.config.optim, self.config.total_steps)
        self.state_shardings = ts.train_state_shardings(self.tx, nn.unbox(self.run.abstract_params),
                                                        self.run.param_shardings, self.run.mesh)
        self.state: Any = None
        self.rng = jax.device_put(jax.random.key(1), partitioning.replicated(self.run.mesh))
        # Large batches repeat these clips: drawing gigabytes of normal samples on the host would take longer
        # than the step.
        self.clips = random_batch(self.run.model_config, 8, self.config.data.text_length)

    def config_for(self, per_device: int) -> Any:
        return load_config(self.spec, self.mesh_axes, self.setting, per_device * self.replicas)

    def train_state(self) -> Any:
        if self.state is None or any(x.is_deleted() for x in jax.tree.leaves(self.state)):
            self.state = None  # frees what is left before allocating anew
            model, rules = self.run.model_config, run_setup.logical_rules(self.config)
            params, _ = partitioning.create_sharded(lambda r: init_params(model, r, dummy_batch(model)), self.run.mesh,
                                                 rules, jax.random.key(self.config.seed))
            self.state = ts.create_train_state(params, self.tx, self.state_shardings)
        return self.state

    def measure(self, per_device: int, steps: int, warmup: int = 2, compiled: Any = None) -> tuple[Row, Any]:
        """(row, compiled step) after compiling (unless given) and running warmup + steps steps."""
        row = Row(self.setting.attention, per_device, "timed", global_batch=per_device * self.replicas)
        try:
            if compiled is None:
                compiled, row.compile_s, _ = compile_step(self.config_for(per_device))
            m = compiled_measurement(compiled, self.setting, per_device, row.compile_s)
            row.memory = dict(arguments=m.arguments, outputs=m.outputs, aliased=m.aliased,
                              temporaries=m.temporaries, peak=m.peak)
            row.train_flops = clover_train_flops(self.run.model_config, row.global_batch,
                                                 self.config.data.text_length)["train"]
            batch = partitioning.shard_batch({k: np.resize(v, (row.global_batch, *v.shape[1:]))
                                           for k, v in self.clips.items()},
                                          self.run.mesh, run_setup.logical_rules(self.config))
            peak_before = device_memory("peak_bytes_in_use")
            times = []
            for _ in range(warmup + steps):
                start = time.perf_counter()
                self.state, metrics = compiled(self.train_state(), batch, self.rng)
                jax.block_until_ready((self.state, metrics))
                times.append(time.perf_counter() - start)
            row.step_s, row.finite = statistics.median(times[warmup:]), bool(metrics["finite"])
            peak_after = device_memory("peak_bytes_in_use")
            if peak_after is not None and (peak_before is None or peak_after > peak_before):
                row.device_peak = peak_after
        except Exception as err:  # noqa: BLE001  (reported as the row's error)
            row.out_of_memory, row.error = is_out_of_memory(err), _first_line(err)
        return row, compiled


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def sweep_variant(args: argparse.Namespace, mesh_axes: dict[str, int], attention: str) -> Iterator[Row]:
    """The timed row at --batch-per-device and, with --max-batch, the largest fitting batch's row."""
    setting = Setting(args.remat == "on", args.dtype, 1, attention)
    try:
        runner = StepRunner(args.config, mesh_axes, setting)
    except Exception as err:  # noqa: BLE001  (reported as the row's error)
        yield Row(attention, args.batch_per_device, "timed", error=_first_line(err))
        return
    timed, compiled = runner.measure(args.batch_per_device, args.steps)
    print(f"  {attention} b/device={timed.batch_per_device}: {timed.error or f'{timed.step_s:.4f} s/step'}",
          file=sys.stderr, flush=True)
    yield timed
    if not args.max_batch or (timed.error and not timed.out_of_memory):
        return
    fitting: dict[int, tuple[Row, Any]] = {} if timed.error else {timed.batch_per_device: (timed, compiled)}

    def fits(b: int) -> bool:
        if b == timed.batch_per_device:
            return not timed.error
        row, executable = runner.measure(b, steps=1, warmup=0)
        print(f"  probe {attention} b/device={b}: {row.error or 'fits'}", file=sys.stderr, flush=True)
        if row.error and not row.out_of_memory:
            raise RuntimeError(row.error)
        if not row.error:
            fitting[b] = (row, executable)
        return not row.error

    search = f"largest fitting (<= {args.max_batch})"
    try:
        largest = largest_fitting_batch(fits, args.batch_per_device, args.max_batch, args.batch_resolution)
    except RuntimeError as err:
        yield Row(attention, 0, search, error=f"search stopped: {err}")
        return
    if not largest:
        yield Row(attention, 0, search, error="no batch fits", out_of_memory=True)
        return
    probe, executable = fitting[largest]
    row, _ = runner.measure(largest, args.steps, compiled=executable)
    row.role, row.compile_s = search, probe.compile_s
    row.device_peak = row.device_peak or probe.device_peak  # the probe raised the high-water mark, not the rerun
    yield row


def measure_context(args: argparse.Namespace) -> dict[str, Any]:
    """This process's device, jax, code and the compute dtype's matmul FLOP/s (the MFU reference)."""
    device = jax.devices()[0]
    n = args.matmul_size or (8192 if device.platform == "gpu" else 1024)
    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[args.dtype]
    return dict(device=device.device_kind, platform=device.platform, jax=jax.__version__, matmul_n=n,
                matmul_peak_flops=matmul_flops_per_second(n, dtype=dtype), bytes_limit=device_memory("bytes_limit"))


def sweep_in_child(argv: list[str], attention: str) -> tuple[list[dict[str, Any]], list[Row]]:
    """(contexts, rows) of one variant swept in a child process (this command line + `--attention attention
    --in-process --child`); a child that dies (an XLA abort, a kill) adds a row with its last stderr line."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_step", *argv, "--attention", attention, "--in-process", "--child"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=pathlib.Path(__file__).resolve().parents[1])
    last = ""
    for line in child.stderr:  # its progress, passed on as it comes
        sys.stderr.write(line)
        last = line.strip() or last
    lines = [json.loads(line) for line in child.stdout.read().splitlines() if line.startswith("{")]
    contexts, rows = [x["context"] for x in lines], [Row(**x["row"]) for x in lines]
    if child.wait():
        rows.append(Row(attention, 0, "child process", error=f"exited with {child.returncode}: {last[:300]}"))
    return contexts, rows


def record(row: Row, peak_flops: float, devices: int) -> dict[str, Any]:
    """The row with its rates, clips/s, model TFLOP/s (all devices) and MFU (per device, of the matmul peak);
    None for what a failed row lacks."""
    rate = row.train_flops / row.step_s
    fields = dict(dataclasses.asdict(row), clips_per_s=row.global_batch / row.step_s, model_tflop_per_s=rate / 1e12,
                  mfu=rate / (devices * peak_flops), xla_peak_gib=row.memory.get("peak", math.nan) / GIB,
                  device_peak_gib=(row.device_peak or math.nan) / GIB)
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in fields.items()}


def _cell(x: float | None, fmt: str, scale: float = 1, suffix: str = "") -> str:
    return "-" if x is None else format(scale * x, fmt) + suffix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/pretrain.py:base")
    p.add_argument("--mesh", default="data=1", help="mesh axes, e.g. data=8 (CPU: more than one device needs "
                                                    "XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    p.add_argument("--batch-per-device", type=int, default=8)
    p.add_argument("--attention", default=",".join(VARIANTS), help="window-attention kernels (or per_clip) to sweep")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f32"], help="compute dtype (parameters f32)")
    p.add_argument("--remat", default="on", choices=["on", "off"])
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps (median reported)")
    p.add_argument("--max-batch", type=int, default=0,
                   help="search the largest per-device batch that fits, up to this cap (0: no search)")
    p.add_argument("--batch-resolution", type=int, default=1, help="stop bisecting once within this many clips")
    p.add_argument("--matmul-size", type=int, default=0, help="n of the peak matmul (0: 8192 on GPU, else 1024)")
    p.add_argument("--json", action="store_true", help="one JSON line per row instead of a Markdown table")
    p.add_argument("--in-process", action="store_true",
                   help="sweep in this process, no child per variant (device peaks then show only where they rose)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # raw rows for the parent, as they come
    args = p.parse_args()
    if args.steps < 1 or args.batch_per_device < 1:
        raise SystemExit("--steps and --batch-per-device must be at least 1")
    mesh_axes = parse_mesh(args.mesh)
    variants = [a.strip() for a in args.attention.split(",") if a.strip()]
    contexts, rows = [], []
    if args.in_process:
        jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would hide the compile
        contexts.append(measure_context(args))
        for attention in variants:
            for row in sweep_variant(args, mesh_axes, attention):
                rows.append(row)
                if args.child:
                    print(json.dumps(dict(context=contexts[0], row=dataclasses.asdict(row))), flush=True)
        if args.child:
            return
    else:  # this process never starts a backend (on GPU it would hold 75% of the memory the children need)
        for attention in variants:
            more_contexts, more_rows = sweep_in_child(sys.argv[1:], attention)
            contexts, rows = contexts + more_contexts, rows + more_rows
    report(args, mesh_axes, contexts, rows)


def report(args: argparse.Namespace, mesh_axes: dict[str, int], contexts: list[dict[str, Any]], rows: list[Row]
           ) -> None:
    """JSON lines or the Markdown table; MFU against the best matmul rate any process measured."""
    peak = max((c["matmul_peak_flops"] for c in contexts), default=math.nan)
    devices = math.prod(mesh_axes.values())
    context = dict(contexts[0] if contexts else {}, matmul_peak_flops=peak, config=args.config, mesh=mesh_axes,
                   dtype=args.dtype, remat=args.remat, code=git_state())
    if args.json:
        for row in rows:
            print(json.dumps({**context, **record(row, peak, devices)}), flush=True)
        return
    limit = context.get("bytes_limit")
    print(f"\n{args.config} on {context.get('device', '?')} x{devices}, mesh {mesh_axes}, {args.dtype} compute, remat "
          f"{args.remat}, jax {jax.__version__}, code {context['code']}; {context.get('matmul_n', '?')}³ matmul peak "
          f"{peak / 1e12:.2f} TFLOP/s per device; memory limit {_cell(limit, '.1f', 1 / GIB, ' GiB')}; "
          f"median of {args.steps} steps\n")
    print("| attention | row | batch/device | step s | clips/s | model TFLOP/s | MFU | compile s | XLA peak GiB "
          "| device peak GiB | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        r = record(row, peak, devices)
        note = row.error or ("" if row.finite else "non-finite loss or gradient")
        print(f"| {row.attention} | {row.role} | {row.batch_per_device or '-'} | {_cell(r['step_s'], '.4f')} | "
              f"{_cell(r['clips_per_s'], '.2f')} | {_cell(r['model_tflop_per_s'], '.3f')} | "
              f"{_cell(r['mfu'], '.1f', 100, '%')} | {_cell(r['compile_s'], '.1f')} | "
              f"{_cell(r['xla_peak_gib'], '.2f')} | {_cell(r['device_peak_gib'], '.2f')} | {note} |")


if __name__ == "__main__":
    main()
