"""Benchmark: compile time, step time and clips/s of the pre-training step, against the CPU's matmul peak.

  .venv/bin/python -m benchmarks.train_step [--presets tiny,small] [--batch 8] [--steps 5] [--text-length 30]
      [--frames 8 --size 224] [--threads 2] [--json]

`--frames` / `--size` set the input clip (frames, square side) and the model's fusion tables for it; without
them each preset keeps its own clip size (tiny 4x64², small 8x112², base 8x224²). `--threads N` pins the
process to N cores before jax starts (XLA's CPU thread pool is sized by the cores it may run on), for a
like-for-like comparison with the PyTorch peer's `--threads N`. `--json` prints one JSON line per preset
instead of the Markdown tables (see `benchmarks/compare_pytorch.sh`).

Runs the real step (`tasks.pretrain_loss_fn` + `optim.make_optimizer` + `train_step.make_train_step`) on
one device (XLA's CPU backend threads each op over every core). Reports, per preset: AOT compile time
(lower + compile), the median step time after two warm-up steps, clips/s, an analytic model-FLOP count
and the achieved model FLOP/s as a fraction of a large float32 matmul's FLOP/s measured in the same run.
XLA's own `compiled.cost_analysis()` flop count is printed next to the analytic one as a sanity check.

Analytic count: `clover_jax.model_flops.clover_train_flops` (matmul FLOPs only; XLA's count includes the
element-wise math and the optimizer update, so it reads higher).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable


def pin_threads(threads: int) -> None:
    """Restricts this process (and XLA's CPU thread pool, created later) to the first `threads` cores."""
    if threads > 0 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if threads > len(cores):
            raise SystemExit(f"--threads {threads}: only {len(cores)} cores are available to this process")
        os.sched_setaffinity(0, cores[:threads])


if __name__ == "__main__":  # before jax is imported: XLA sizes its thread pool by the allowed cores
    from clover_jax import launch

    launch.prepare_process()  # the XLA flags and the malloc `python -m clover_jax.train` runs with
    _early = argparse.ArgumentParser(add_help=False)
    _early.add_argument("--threads", type=int, default=0)
    pin_threads(_early.parse_known_args()[0].threads)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clover_jax import (  # noqa: E402
    losses,
    optim,
    partitioning,  # noqa: E402
    tasks,
)
from clover_jax import train_step as ts  # noqa: E402
from clover_jax.host_allocator import applied_allocator  # noqa: E402
from clover_jax.kernels.execution import REFERENCE, ExecutionPolicy, policy_for_mesh  # noqa: E402
from clover_jax.model_flops import clover_train_flops  # noqa: E402
from clover_jax.models import clover  # noqa: E402

# ---- measurements --------------------------------------------------------------------------------


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops_per_second(n: int = 2048, repeats: int = 7, dtype: Any = jnp.float32) -> float:
    """FLOP/s of an n x n x n jnp.dot in `dtype` under jit (the reference 'peak' for this machine)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    return 2 * n**3 / _median_seconds(lambda: dot(a, b), repeats)


def random_batch(config: clover.CloverConfig, batch: int, text_length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hp, wp = config.token_grid
    ids = rng.integers(1000, config.text.vocab_size, size=(batch, text_length)).astype(np.int32)
    masked = rng.uniform(size=ids.shape) < 0.15
    return dict(
        video=rng.normal(size=(batch, config.num_frames, config.image_size, config.image_size, 3)).astype(np.float32),
        video_mask=(rng.uniform(size=(batch, hp, wp)) < 0.4).astype(np.float32),
        text_ids=ids,
        text_ids_masked=np.where(masked, config.mask_token_id, ids).astype(np.int32),
        text_mask=np.ones_like(ids),
        mlm_labels=np.where(masked, ids, -100).astype(np.int32),
    )


def bench_config(preset: str, frames: int = 0, size: int = 0,
                 policy: ExecutionPolicy = REFERENCE) -> clover.CloverConfig:
    """The preset's CloverConfig under `policy`, with its input clip (and fusion position tables) resized
    when given."""
    overrides: dict[str, Any] = {"execution": policy}
    if frames:
        overrides["num_frames"] = frames
    if size:
        overrides["image_size"] = size
    return clover.clover_config(preset, **overrides)


@dataclasses.dataclass
class StepTiming:
    preset: str
    params: int
    batch: int
    frames: int
    size: int
    text_length: int
    compile_s: float
    step_s: float
    analytic_flops: int
    xla_flops: float


def _xla_flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per program
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


@dataclasses.dataclass
class CompiledStep:
    config: clover.CloverConfig
    num_params: int
    compiled: Any
    compile_s: float
    state: Any
    batch: Any
    rng: jax.Array


def compile_train_step(preset: str, batch: int, text_length: int, frames: int = 0, size: int = 0) -> CompiledStep:
    """Params, optimizer state, a random sharded batch and the AOT-compiled pre-training step on one device."""
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    config = bench_config(preset, frames, size, policy_for_mesh(mesh))
    params, param_sh = partitioning.create_sharded(
        lambda rng: clover.init_params(config, rng), mesh, partitioning.LOGICAL_RULES, jax.random.key(0)
    )
    num_params = clover.count_params(params)
    optim_cfg = optim.default_optim_config()
    optim_cfg.lr = 1e-4
    tx, schedule = optim.make_optimizer(optim_cfg, total_steps=1000)
    state_sh = ts.train_state_shardings(tx, params, param_sh, mesh)
    state = ts.create_train_state(params, tx, state_sh)
    loss_fn = tasks.pretrain_loss_fn(config, losses.default_loss_config(), partitioning.num_data_replicas(mesh))
    step = ts.make_train_step(loss_fn, tx, state_shardings=state_sh, batch_sharding=partitioning.batch_sharding(mesh),
                              mesh=mesh, schedule=schedule)
    host_batch = partitioning.shard_batch(random_batch(config, batch, text_length), mesh)
    rng = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(state, host_batch, rng).compile()
    return CompiledStep(config, num_params, compiled, time.perf_counter() - start, state, host_batch, rng)


def time_train_step(preset: str, batch: int, text_length: int, steps: int, frames: int = 0, size: int = 0
                    ) -> StepTiming:
    """Builds params, optimizer and the jitted step on one device; times compile and steady-state steps."""
    built = compile_train_step(preset, batch, text_length, frames, size)
    config, compiled, state, host_batch, rng = built.config, built.compiled, built.state, built.batch, built.rng
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, host_batch, rng)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, host_batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    if not bool(metrics["finite"]):
        raise RuntimeError(f"{preset}: the benchmark step produced a non-finite loss or gradient")
    return StepTiming(preset, built.num_params, batch, config.num_frames, config.image_size, text_length,
                      built.compile_s,
                      statistics.median(times), clover_train_flops(config, batch, text_length)["train"],
                      _xla_flops(compiled))


# ---- report --------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,small", help="comma-separated clover_config presets")
    p.add_argument("--batch", type=int, default=8, help="global batch (clips per step)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps (median reported)")
    p.add_argument("--text-length", type=int, default=30)
    p.add_argument("--frames", type=int, default=0, help="input frames per clip (0: the preset's own)")
    p.add_argument("--size", type=int, default=0, help="input height = width (0: the preset's own)")
    p.add_argument("--threads", type=int, default=0, help="cores XLA may use (0: all); applied before jax starts")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--json", action="store_true", help="one JSON line per preset instead of Markdown tables")
    args = p.parse_args()
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    # The matmul rate is measured before, between and after the presets; the best is the machine's peak
    # (other processes on a shared CPU only ever lower it).
    peaks = [matmul_flops_per_second(args.matmul_size)]
    timings = []
    for name in presets:
        timings.append(time_train_step(name, args.batch, args.text_length, args.steps, args.frames, args.size))
        peaks.append(matmul_flops_per_second(args.matmul_size))
    peak = max(peaks)

    if args.json:
        for t in timings:
            achieved = t.analytic_flops / t.step_s
            print(json.dumps({
                "impl": "clover_jax", "jax": jax.__version__, "preset": t.preset, "threads": cores,
                "params": t.params, "batch": t.batch, "frames": t.frames, "size": t.size,
                "text_length": t.text_length, "compile_s": round(t.compile_s, 2), "step_s_median": t.step_s,
                "clips_per_s": t.batch / t.step_s, "model_gflop_per_step": t.analytic_flops / 1e9,
                "xla_gflop_per_step": t.xla_flops / 1e9, "model_gflops": achieved / 1e9,
                "matmul_peak_gflops": peak / 1e9, "share_of_matmul_peak": achieved / peak,
                "load_average": os.getloadavg()[0], "host_malloc": applied_allocator() or "as started",
            }), flush=True)
        return

    device = jax.devices()[0]
    print(f"\ndevice: {device.device_kind} ({device.platform}), {cores} of {os.cpu_count()} cores, "
          f"jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"float32 {args.matmul_size}^3 matmul GFLOP/s: {', '.join(f'{x / 1e9:.0f}' for x in peaks)} "
          f"(peak = {peak / 1e9:.0f})")
    print(f"batch {args.batch} clips, text length {args.text_length}, median of {args.steps} steps\n")
    rows = []
    for t in timings:
        achieved = t.analytic_flops / t.step_s
        rows.append([
            t.preset, f"{t.frames}x{t.size}²", f"{t.params / 1e6:.1f}M", str(t.batch), f"{t.compile_s:.1f}",
            f"{t.step_s:.3f}", f"{t.batch / t.step_s:.2f}", f"{t.analytic_flops / 1e9:.1f}",
            f"{t.xla_flops / 1e9:.1f}", f"{t.xla_flops / t.analytic_flops:.2f}", f"{achieved / 1e9:.1f}",
            f"{100 * achieved / peak:.0f}%",
        ])
    print(_table(["preset", "clip", "params", "batch", "compile s", "step s", "clips/s", "model GFLOP/step",
                  "XLA GFLOP/step", "XLA/model", "model GFLOP/s", "of matmul peak"], rows))

    print("\nanalytic forward GFLOP per step by component:")
    breakdown_rows = []
    for t in timings:
        parts = clover_train_flops(bench_config(t.preset, args.frames, args.size), t.batch, args.text_length)
        keys = [k for k in parts if k not in ("forward", "train")]
        breakdown_rows.append([t.preset] + [f"{parts[k] / 1e9:.2f}" for k in keys] + [f"{parts['forward'] / 1e9:.2f}"])
    print(_table(["preset"] + keys + ["forward"], breakdown_rows))


if __name__ == "__main__":
    main()
