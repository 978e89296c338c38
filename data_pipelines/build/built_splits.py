"""Reading a finished build: its TFDS builder, random access to a split, and a split's per-example index."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from data_pipelines.build.damaged_records import is_damage, read_or_reason


def load_builder(dataset_folder: str | os.PathLike):
    """A read-only TFDS builder for a folder made by build_dataset (the version folder)."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(os.fspath(dataset_folder))


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    """Per-example facts of a built split in storage order (what the input pipeline indexes by)."""

    video_id: list[str]
    num_captions: np.ndarray  # int32 (N,)
    num_frames: np.ndarray  # int32 (N,)

    def __len__(self) -> int:
        return len(self.video_id)


def split_index(dataset_folder: str | os.PathLike, split: str) -> SplitIndex:
    """Reads (and caches as index_<split>.json) video ids, caption and frame counts of every example.

    Parses only three scalar fields of each record, in batches, so it is quick even for big splits.
    """
    import tensorflow as tf

    folder = pathlib.Path(dataset_folder)
    cache = folder / f"index_{split}.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return SplitIndex(d["video_id"], np.asarray(d["num_captions"], np.int32), np.asarray(d["num_frames"], np.int32))
    source = open_source(folder, split)
    spec = {
        "video_id": tf.io.FixedLenFeature([], tf.string),
        "num_captions": tf.io.FixedLenFeature([], tf.int64),
        "num_frames": tf.io.FixedLenFeature([], tf.int64),
    }
    ids, caps, frames = [], [], []
    damaged = 0
    for start in range(0, len(source), 512):
        keys = list(range(start, min(start + 512, len(source))))
        try:
            raw = source.__getitems__(keys)
        except Exception as err:  # noqa: BLE001 - damaged chunks: see below; anything else re-raises
            if not is_damage(err):
                raise
            raw = [read_or_reason(source, k)[0] for k in keys]
        good = [r for r in raw if r is not None]
        parsed = ({k: v.numpy() for k, v in tf.io.parse_example(tf.constant(good, tf.string), spec).items()}
                  if good else {})
        n = 0
        for record in raw:
            if record is None:  # damaged: a captioned stand-in, so the pass that reads it reports (or skips) it
                damaged += 1
                ids.append("")
                caps.append(1)
                frames.append(0)
                continue
            ids.append(parsed["video_id"][n].decode("utf-8"))
            caps.append(int(parsed["num_captions"][n]))
            frames.append(int(parsed["num_frames"][n]))
            n += 1
    index = SplitIndex(ids, np.asarray(caps, np.int32), np.asarray(frames, np.int32))
    if damaged:  # never cache an index that holds stand-ins
        return index
    try:
        cache.write_text(json.dumps({"video_id": ids, "num_captions": caps, "num_frames": frames}))
    except OSError:  # read-only dataset folder: keep it in memory only
        pass
    return index


def stored_tag_rule(dataset_folder: str | os.PathLike) -> str | None:
    """The word-tag rule (`text_tags.TAG_RULES`) of a finished build; None when it stores no tags or holds no
    build key. Builds whose key predates the "tag_rule" entry hold the previous rule, "cased_caption"."""
    from data_pipelines.build.build_store import finished_key

    key = finished_key(dataset_folder)
    if key is None or key.get("tagger") == "None":
        return None
    return key.get("tag_rule", "cased_caption")


def open_source(dataset_folder: str | os.PathLike, split: str):
    """Random access to the serialized examples of a split: `len(src)`, `src[i]`, `src.__getitems__(ids)`."""
    builder = load_builder(dataset_folder)
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {dataset_folder}; it has {list(builder.info.splits)}")
    return builder.as_data_source(split).data_source
