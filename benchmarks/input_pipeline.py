"""Benchmark: time to prepare the real clips, and clips/s (total and per core) of the training pipeline at 8 x 224².

  .venv/bin/python -m benchmarks.input_pipeline [--media ../shared/data/real] [--workers 2] [--batch 8]
      [--steps 10] [--cores N] [--single-core-check | --no-single-core-check] [--json]

Builds the real MSVD + demo clips (fps 4, short side 256, JPEG q90) into a temporary folder, then times
`make_train_dataset` (TSN sampling, in-graph JPEG decode, RandomResizedCrop, resize to 224, block masks,
text masking) after a warm-up, and prints a small Markdown table with:
  * steady-state clips/s on the cores this process may use, and that rate divided by those cores;
  * clips/s with the whole process pinned to ONE core (a child process started with `--cores 1` before
    TensorFlow creates its thread pools, tf.data private pool of 1 thread) -- the per-core figure that
    does not assume linear scaling;
  * the rate of the Python element generator alone (`input_pipeline._train_elements`: index stream, caption
    choice, block masks, ArrayRecord reads; no TF ops), which runs on one Python thread per host and so
    bounds the pipeline whatever the core count.
Per-host need at pod scale is (clips per step per host) / (step seconds); divide it by the per-core rate
for the cores a host must give the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from data_pipelines.build import built_splits

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pin_cores(cores: int) -> int:
    """Restricts this process to its first `cores` allowed cores (0: leave as is); returns the cores used."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores:
        if cores > len(allowed):
            raise SystemExit(f"--cores {cores}: only {len(allowed)} cores are available to this process")
        os.sched_setaffinity(0, allowed[:cores])
        return cores
    return len(allowed)


def build(media: pathlib.Path, out: str, fps: float, short_side: int, workers: int) -> dict[str, Any]:
    """Builds the real clips listed in media/manifest.jsonl; returns folder, counts and timing."""
    from data_pipelines.build import annotation_rows, builder
    from data_pipelines.build.video_io import DecodeConfig

    rows = [json.loads(line) for line in (media / "manifest.jsonl").read_text().splitlines()]
    records = [annotation_rows.VideoText(r["path"], list(r["text"]) or ["a video"], "train") for r in rows]
    cfg = builder.BuildConfig(decode=DecodeConfig(fps=fps, short_side=short_side), num_workers=workers,
                              progress=False)
    start = time.perf_counter()
    built = builder.build_dataset("bench", {"train": records}, media, out, cfg)
    seconds = time.perf_counter() - start
    return dict(data_dir=str(built.data_dir), clips=len(records), prep_s=seconds,
                frames=int(built_splits.split_index(built.data_dir, "train").num_frames.sum()),
                size_mb=sum(f.stat().st_size for f in built.data_dir.glob("*array_record*")) / 2**20)


def time_pipeline(data_dir: str, batch: int, steps: int, threads: int) -> dict[str, float]:
    """First-batch latency and steady-state clips/s of the training pipeline (8 frames x 224²)."""
    from data_pipelines.input import input_pipeline as ip
    from data_pipelines.input.device_transfer import numpy_batches

    icfg = ip.InputConfig(dataset=data_dir, batch_size=batch, num_frames=8, image_size=224, threads=threads)
    it = numpy_batches(ip.make_train_dataset(icfg, process_index=0, process_count=1))
    start = time.perf_counter()
    next(it)
    first_s = time.perf_counter() - start
    for _ in range(2):  # warm-up
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    run_s = time.perf_counter() - start
    return dict(first_batch_s=first_s, clips_per_s=steps * batch / run_s, ms_per_batch=1000 * run_s / steps)


def time_generator(data_dir: str, batch: int, elements: int) -> float:
    """Elements/s of the Python generator that feeds tf.data, iterated on its own (no TF ops)."""
    from data_pipelines.input import input_pipeline as ip

    icfg = ip.InputConfig(dataset=data_dir, batch_size=batch, num_frames=8, image_size=224)
    gen = ip._train_elements(icfg, ip.open_pass(icfg, 0, 1), 0)
    for _ in range(batch):  # warm-up: first permutation, file handles
        next(gen)
    start = time.perf_counter()
    for _ in range(elements):
        next(gen)
    return elements / (time.perf_counter() - start)


def single_core_rate(data_dir: str, batch: int, steps: int) -> float:
    """clips/s of the pipeline in a child process pinned to one core (pinned before TF starts)."""
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--prebuilt", data_dir, "--cores", "1",
           "--batch", str(batch), "--steps", str(steps), "--pipeline-only", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])["clips_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--media", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--cores", type=int, default=0, help="pin the process to this many cores (0: all allowed)")
    p.add_argument("--generator-elements", type=int, default=2000)
    p.add_argument("--single-core-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the pipeline in a child process pinned to one core")
    p.add_argument("--prebuilt", default="", help=argparse.SUPPRESS)  # child runs: reuse a built folder
    p.add_argument("--pipeline-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    args = p.parse_args()
    cores = pin_cores(args.cores)  # before TensorFlow is imported

    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        if args.prebuilt:
            built = dict(data_dir=args.prebuilt)
        else:
            built = build(pathlib.Path(args.media), tmp, args.fps, args.short_side, args.workers)
        result: dict[str, Any] = dict(cores=cores, batch=args.batch, **built)
        result.update(time_pipeline(built["data_dir"], args.batch, args.steps, threads=cores))
        result["clips_per_s_per_core"] = result["clips_per_s"] / cores
        if not args.pipeline_only:
            result["generator_elements_per_s"] = time_generator(built["data_dir"], args.batch,
                                                                args.generator_elements)
            if args.single_core_check and cores > 1:
                result["clips_per_s_one_core"] = single_core_rate(built["data_dir"], args.batch, args.steps)
            elif cores == 1:
                result["clips_per_s_one_core"] = result["clips_per_s"]
    if args.json:
        print(json.dumps(result))
        return

    r = result
    print(f"\nmachine: {os.cpu_count()} CPU cores ({cores} used); load average {os.getloadavg()[0]:.1f}; "
          f"tf.data AUTOTUNE; batch {args.batch} x 8 frames x 224²")
    print("| stage | figure |")
    print("|---|---|")
    if "prep_s" in r:
        print(f"| prepare {r['clips']} real clips (fps {args.fps:g}, short side {args.short_side}, {args.workers} "
              f"workers) | {r['prep_s']:.1f} s ({r['clips'] / r['prep_s']:.2f} clips/s, {r['frames']} frames, "
              f"{r['size_mb']:.1f} MiB) |")
    print(f"| training pipeline, first batch (graph build + fill) | {r['first_batch_s']:.2f} s |")
    print(f"| training pipeline, steady state, {cores} cores | {r['clips_per_s']:.1f} clips/s "
          f"({r['ms_per_batch']:.0f} ms/batch) |")
    print(f"| the same ÷ {cores} cores | {r['clips_per_s_per_core']:.1f} clips/s per core |")
    if "clips_per_s_one_core" in r:
        print(f"| training pipeline pinned to 1 core (1 tf.data thread) | {r['clips_per_s_one_core']:.1f} clips/s |")
    if "generator_elements_per_s" in r:
        print(f"| Python element generator alone (no TF ops, 1 thread) | {r['generator_elements_per_s']:.0f} "
              "clips/s |")
    print("per-host need = clips per step per host ÷ step seconds; cores needed = need ÷ the per-core rate "
          "(the generator rate is a per-host ceiling: it runs on one Python thread)")


if __name__ == "__main__":
    main()
