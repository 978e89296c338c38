"""Check: retrieval metrics on the mesh equal the numpy reference, key by key, on a real index and on planted ties.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m benchmarks.retrieval_equality \
      --index workdirs/demo/test_clips.index --annotations ~/.cache/clover_jax/synthetic_*/annotations_test.jsonl

The index's clip embeddings (one clip per video) against its model's embeddings of the annotation file's captions
(`{"video": path, "text": [captions]}` per line, matched to the index's videos by file name), then the ~20k x 5k
random split with planted ties of `tests/unit/test_mesh_retrieval.py`: `retrieval.retrieval_metrics` (float64
dot products of the float32 unit rows) against `mesh_retrieval.retrieval_metrics_on_mesh` on 1 device and on a
data 4 x model 2 mesh of 8. Prints every metric and the keys that differ (none expected); exit 1 if any does.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

from clover_jax import partitioning, video_index
from clover_jax.evaluators import mesh_retrieval, retrieval

REPO = pathlib.Path(__file__).resolve().parents[1]


def index_split(index_path: str, annotations: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clip embeddings, caption embeddings, caption -> clip row) of an index and its videos' captions."""
    index = video_index.Index.open(index_path)
    videos = video_index.read_rows(index.embeddings, 0, len(index))
    row = {os.path.basename(v["path"]): v["first_row"] for v in index.manifest["videos"]}
    captions, text_to_video = [], []
    for line in pathlib.Path(os.path.expanduser(annotations)).read_text().splitlines():
        entry = json.loads(line)
        for caption in entry["text"]:
            captions.append(caption)
            text_to_video.append(row[os.path.basename(entry["video"])])
    return videos, index.model.embed_texts(captions), np.asarray(text_to_video)


def compare(name: str, videos: np.ndarray, texts: np.ndarray, text_to_video: np.ndarray) -> bool:
    print(f"{name}: {videos.shape[0]} clips x {texts.shape[0]} captions, {videos.shape[1]}-d")
    reference = retrieval.retrieval_metrics(videos, texts, text_to_video)
    print("  numpy reference: " + ", ".join(f"{k} {v:.4f}" for k, v in reference.items()))
    equal = True
    for devices in (1, 8):
        axes = {"data": 4, "model": 2} if devices == 8 else {"data": 1}
        mesh = partitioning.make_mesh(axes, jax.devices()[:devices])
        start = time.monotonic()
        on_mesh = mesh_retrieval.retrieval_metrics_on_mesh(videos, texts, text_to_video, mesh)
        differ = {k: (on_mesh[k], reference[k]) for k in reference if on_mesh[k] != reference[k]}
        equal &= not differ
        print(f"  mesh {axes}: {'equal on every key' if not differ else f'DIFFERS {differ}'} "
              f"({time.monotonic() - start:.1f} s)")
    return equal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="an index built by `python -m clover_jax.index`")
    parser.add_argument("--annotations", required=True, help="a jsonl of {video, text: [captions]} per line")
    args = parser.parse_args()
    if jax.device_count() < 8:
        print("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from test_mesh_retrieval import random_split

    equal = compare(f"index {args.index}", *index_split(args.index, args.annotations))
    equal &= compare("random split with planted ties", *random_split())
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
