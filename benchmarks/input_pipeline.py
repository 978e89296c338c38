"""Benchmark: time to prepare the real clips and clips/s of the training pipeline at 8 frames x 224².

  .venv/bin/python -m benchmarks.input_pipeline [--media ../shared/data/real] [--workers 2] [--batch 8]

Builds the real MSVD + demo clips (fps 4, short side 256, JPEG q90) into a temporary folder, then
times `make_train_dataset` (TSN sampling, in-graph JPEG decode, RandomResizedCrop, resize to 224,
block masks, text masking) after a warm-up, and prints a small Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--media", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    p.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--short-side", type=int, default=256)
    args = p.parse_args()

    import tensorflow_datasets as tfds

    from data_pipelines import annotations as ann
    from data_pipelines import builder
    from data_pipelines import input_pipeline as ip
    from data_pipelines.video_io import DecodeConfig

    tfds.disable_progress_bar()
    media = pathlib.Path(args.media)
    rows = [json.loads(line) for line in (media / "manifest.jsonl").read_text().splitlines()]
    records = [ann.VideoText(r["path"], list(r["text"]) or ["a video"], "train") for r in rows]
    cfg = builder.BuildConfig(decode=DecodeConfig(fps=args.fps, short_side=args.short_side),
                              num_workers=args.workers, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        built = builder.build_dataset("bench", {"train": records}, media, tmp, cfg)
        prep_s = time.perf_counter() - start
        frames = int(builder.split_index(built.data_dir, "train").num_frames.sum())
        size_mb = sum(f.stat().st_size for f in built.data_dir.glob("*array_record*")) / 2**20

        icfg = ip.InputConfig(dataset=str(built.data_dir), batch_size=args.batch, num_frames=8, image_size=224)
        it = ip.numpy_batches(ip.make_train_dataset(icfg, process_index=0, process_count=1))
        start = time.perf_counter()
        next(it)
        first_s = time.perf_counter() - start
        for _ in range(2):  # warm-up
            next(it)
        start = time.perf_counter()
        for _ in range(args.steps):
            batch = next(it)
        run_s = time.perf_counter() - start
    clips_per_s = args.steps * args.batch / run_s
    n = len(records)
    print(f"\nmachine: {os.cpu_count()} CPU cores; tf.data AUTOTUNE; batch {args.batch} x 8 frames x 224²")
    print("| stage | figure |")
    print("|---|---|")
    print(f"| prepare {n} real clips (fps {args.fps:g}, short side {args.short_side}, {args.workers} workers) "
          f"| {prep_s:.1f} s ({n / prep_s:.2f} clips/s, {frames} frames, {size_mb:.1f} MiB) |")
    print(f"| training pipeline, first batch (graph build + fill) | {first_s:.2f} s |")
    print(f"| training pipeline, steady state | {clips_per_s:.1f} clips/s ({run_s / args.steps * 1000:.0f} ms/batch) |")
    print(f"batch video {batch['video'].shape}, video_mask {batch['video_mask'].shape}, text {batch['text_ids'].shape}")


if __name__ == "__main__":
    main()
