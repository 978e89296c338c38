"""The caption input pipeline: built clips -> sampled, decoded, augmented, masked batches (numpy per process).

Design (exact resume over a random-access source)
-------------------------------------------------
Datasets built by `builder.build_dataset` are ArrayRecord shards, so any example can be read by index.
Training walks one infinite *global stream* of example indices: epoch e is a permutation of the
captioned examples drawn from (seed, e) (no shuffle buffer: the permutation is a full shuffle), and
the epochs are concatenated. Global batch k is stream positions [k*B, (k+1)*B); process p of P reads
the contiguous slice [k*B + p*B/P, k*B + (p+1)*B/P). Hence:
  * the same seed gives the same stream, whatever the number of processes (the global batch is the
    concatenation of the local batches in process order, as `make_array_from_process_local_data`
    expects for a batch-sharded array);
  * every example is read exactly once per epoch across all processes;
  * a pipeline started at step k (`start_step=k`) yields exactly the batches an uninterrupted run
    yields from step k, at O(1) cost: position k*B maps straight to (epoch, offset), no skipping.
Per example, everything random is a pure function of (seed, epoch, example index): which caption is
used this epoch, the video block mask, the text-masking seed and the frame-sampling / crop / flip seed.
So a caption read again in a later epoch gets a fresh text mask, and replays are bit-identical.

The index stream (`index_stream`), caption choice and block masks (numpy) come from a small Python
generator that also reads the serialized records (`__getitems__` per local batch); parsing, frame
sampling, decoding, augmentation and text masking run in the tf.data graph in parallel (`tf_ops`).
Global jax.Arrays: `device_transfer`; VideoQA inputs: `qa_inputs`; mixtures of datasets: `mixtures`.

Evaluation visits each clip (or each (clip, caption) pair) exactly once: every process gets a
contiguous chunk, padded to the same number of batches with `valid=False` rows.

Batch contract (numpy per process; global jax.Arrays through `to_global` / `device_iterator`):
  video float32 (B,T,H,W,3) normalised; video_mask float32 (B,Hp,Wp) 1 = masked (Hp = image_size/4);
  text_ids, text_mask, text_ids_masked, mlm_labels int32 (B,L); valid bool (B,); clip_index int32 (B,);
  eval batches also carry caption_index int32 (B,) (-1 for a clip without captions).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from data_pipelines.build import built_splits
from data_pipelines.build.damaged_records import CheckedRecords
from data_pipelines.input import tf_ops
from data_pipelines.input.device_transfer import device_iterator, numpy_batches
from data_pipelines.input.index_stream import eval_chunk, example_randomness, padded_rows, process_layout, train_stream
from data_pipelines.input.input_config import InputConfig

TEXT_KEYS = ("text_ids", "text_mask", "text_ids_masked", "mlm_labels")


class SplitSource:
    """A built split: random access to its records, its per-example index and its TFDS features."""

    def __init__(self, folder: str | os.PathLike, split: str, skip_damaged: bool = False,
                 max_damaged_fraction: float = 0.0):
        if not folder:
            raise ValueError("InputConfig.dataset is empty: pass the folder returned by builder.build_dataset")
        self.folder = folder
        self.records = CheckedRecords(built_splits.open_source(folder, split), str(folder), split, skip_damaged,
                                      max_damaged_fraction)
        self.index = built_splits.split_index(folder, split)
        self.features = built_splits.load_builder(folder).info.features


@dataclasses.dataclass(frozen=True)
class Pass:
    """One process's share of a pass over a split: the split, the process layout and the local batch size."""

    source: SplitSource
    process_index: int
    process_count: int
    local_batch: int


def open_pass(cfg: InputConfig, process_index: int | None, process_count: int | None) -> Pass:
    """The set-up every dataset of this package starts from (defaults: jax's process layout)."""
    process_index, process_count, local_batch = process_layout(cfg.batch_size, process_index, process_count)
    source = SplitSource(cfg.dataset, cfg.split, cfg.skip_damaged_records, cfg.max_damaged_fraction)
    return Pass(source, process_index, process_count, local_batch)


def batched_dataset(cfg: InputConfig, local_batch: int, elements: Callable[[], Iterator[dict]], signature: Any,
                    map_fn: Callable) -> Any:
    """tf.data.Dataset of `elements()` (a generator of numpy elements of `signature`) mapped and batched."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_generator(elements, output_signature=signature)
    return tf_ops.finish(ds, cfg, map_fn, local_batch)


def _element_signature(cfg: InputConfig) -> dict:
    import tensorflow as tf

    g = cfg.mask.grid
    return {
        "serialized": tf.TensorSpec([], tf.string),
        "clip_index": tf.TensorSpec([], tf.int32),
        "caption_index": tf.TensorSpec([], tf.int32),
        "valid": tf.TensorSpec([], tf.bool),
        "mask_grid": tf.TensorSpec([g, g], tf.uint8),
        "text_seed": tf.TensorSpec([2], tf.int64),
        "aug_seed": tf.TensorSpec([2], tf.int64),
    }


def train_items(num_captions: np.ndarray, epoch_unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(clip, caption) of each item a training epoch visits: every captioned clip (caption -1: drawn per
    read) for epoch_unit "clip", every (clip, caption) pair for "caption"."""
    num_captions = np.asarray(num_captions, np.int64)
    if epoch_unit == "clip":
        clips = np.flatnonzero(num_captions > 0)
        return clips, np.full(clips.size, -1, np.int64)
    if epoch_unit == "caption":
        clips = np.repeat(np.arange(num_captions.size), np.maximum(num_captions, 0))
        firsts = np.cumsum(np.maximum(num_captions, 0)) - np.maximum(num_captions, 0)
        return clips, np.arange(clips.size) - np.repeat(firsts, np.maximum(num_captions, 0))
    raise ValueError(f"epoch_unit={epoch_unit!r}; valid: 'clip', 'caption'")


def _train_elements(cfg: InputConfig, p: Pass, start_step: int) -> Iterator[dict]:
    """Per-example elements of the training stream: epochs over the captioned clips (or caption pairs)."""
    source = p.source
    clips, captions = train_items(source.index.num_captions, cfg.epoch_unit)
    if clips.size == 0:
        raise ValueError(f"{source.folder} split {cfg.split!r} has no clip with a caption to train on")
    per_caption = cfg.epoch_unit == "caption"
    for chosen in train_stream(clips.size, cfg.seed, cfg.shuffle, cfg.batch_size, start_step, p.process_index,
                               p.process_count, fixed_order=cfg.epoch_order == "fixed"):
        raw = source.records.read([int(clips[i]) for _, i in chosen])
        for (epoch, item), serialized in zip(chosen, raw):
            if serialized is None:  # damaged and skipped (data.skip_damaged_records): read the next item instead
                item, serialized = readable_item(source.records, clips, item)
            index = int(clips[item])
            # Per-caption items draw their randomness from the item number, so two captions of a clip differ.
            caption, grid, text_seed, aug_seed = example_randomness(
                cfg.seed, epoch, item if per_caption else index,
                1 if per_caption else int(source.index.num_captions[index]), cfg.mask, with_mask=True
            )
            yield {
                "serialized": serialized,
                "clip_index": index,
                "caption_index": int(captions[item]) if per_caption else caption,
                "valid": True,
                "mask_grid": grid,
                "text_seed": text_seed,
                "aug_seed": aug_seed,
            }


def readable_item(records: CheckedRecords, clips: np.ndarray, item: int) -> tuple[int, bytes]:
    """(item, record) of the first item after `item` (cyclically) whose record is not damaged: the stand-in
    for a skipped record, the same on every replay of the stream."""
    for offset in range(1, clips.size + 1):
        candidate = (item + offset) % clips.size
        record = records.read([int(clips[candidate])])[0]
        if record is not None:
            return candidate, record
    raise AssertionError("unreachable: CheckedRecords stops before every record is lost")


def eval_items(
    source_index: built_splits.SplitIndex, mode: Literal["clips", "pairs"]
) -> list[tuple[int, int]]:
    """(clip, caption) items of an eval pass: one per clip (caption 0, or -1 without captions) or one
    per (clip, caption) pair."""
    if mode == "clips":
        return [(i, 0 if n > 0 else -1) for i, n in enumerate(source_index.num_captions)]
    if mode == "pairs":
        return [(i, c) for i, n in enumerate(source_index.num_captions) for c in range(int(n))]
    raise ValueError(f"eval mode must be 'clips' or 'pairs', got {mode!r}")


def _eval_elements(cfg: InputConfig, source: SplitSource, items: Sequence[tuple[int, int]], num_rows: int,
                   with_video_mask: bool) -> Iterator[dict]:
    """Elements for `items`, then padding rows (valid=False, a copy of the first item) up to num_rows."""
    pad_item = items[0] if items else (0, -1 if source.index.num_captions[0] == 0 else 0)
    last_clip, last_raw = None, None
    for (clip, caption), valid in padded_rows(items, num_rows, pad_item):
        if clip != last_clip:  # consecutive pairs of one clip read its record once
            last_clip, last_raw = clip, source.records[clip]
        _, grid, text_seed, aug_seed = example_randomness(cfg.seed, 0, clip, 0, cfg.mask, with_mask=with_video_mask)
        # The text seed also depends on the caption so each pair gets its own (deterministic) mask.
        text_seed = np.random.default_rng([cfg.seed, clip, caption + 1, 7]).integers(
            np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=2, dtype=np.int64
        )
        yield {
            "serialized": last_raw,
            "clip_index": clip,
            "caption_index": caption,
            "valid": valid,
            "mask_grid": grid,
            "text_seed": text_seed,
            "aug_seed": aug_seed,
        }


def check_tag_rule(cfg: InputConfig) -> None:
    """Official semantic masking (text mode "semantic") refuses a build whose stored word tags follow the
    previous rule (spaCy over the cased caption); tags of a truncated caption need the text length they
    were tagged for."""
    from data_pipelines.build.text_tags import TAG_RULE_TEXT_LENGTH

    rule = built_splits.stored_tag_rule(cfg.dataset)
    length = TAG_RULE_TEXT_LENGTH.get(rule or "")
    if cfg.text.mode != "none" and length is not None and cfg.text.max_length != length:
        raise ValueError(f"{cfg.dataset} was tagged with --tag-rule {rule} for text length {length}; set "
                         f"data.text_length={length} or prepare it again with --tag-rule wordpiece_lower")
    if cfg.text.mode == "semantic" and rule not in (None, "wordpiece_lower", "wordpiece_lower_max30"):
        raise ValueError(
            f"{cfg.dataset} stores word tags of the previous rule (spaCy over the cased caption); official "
            "semantic masking needs tags over the lower-cased WordPiece words: prepare it again with "
            "`python -m clover_jax.prepare ... --overwrite`, or keep the previous rule with "
            "data.text_masking='semantic_dedup'")


def make_train_dataset(
    cfg: InputConfig, start_step: int = 0, process_index: int | None = None, process_count: int | None = None
) -> Any:
    """Infinite tf.data.Dataset of this process's local training batches, from global step `start_step`."""
    check_tag_rule(cfg)
    p = open_pass(cfg, process_index, process_count)
    return batched_dataset(cfg, p.local_batch, lambda: _train_elements(cfg, p, start_step), _element_signature(cfg),
                           tf_ops.caption_map_fn(cfg, p.source.features, True, True, False))


@dataclasses.dataclass
class EvalData:
    """A finite eval pass: `dataset` yields exactly `num_batches` local batches on every process."""

    dataset: Any
    num_batches: int
    num_items: int  # clips (mode "clips") or (clip, caption) pairs (mode "pairs") over all processes

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.dataset.as_numpy_iterator())


def make_eval_dataset(
    cfg: InputConfig,
    mode: Literal["clips", "pairs"] = "clips",
    include_video: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalData:
    """Eval batches over every clip ("clips": caption 0 as its text) or every (clip, caption) pair
    ("pairs"; `include_video=False` skips frame decoding, for text-side retrieval embeddings)."""
    check_tag_rule(cfg)
    p = open_pass(cfg, process_index, process_count)
    items = eval_items(p.source.index, mode)
    if not items:
        raise ValueError(f"{cfg.dataset} split {cfg.split!r} has nothing to evaluate in mode {mode!r}")
    chunk, num_batches = eval_chunk(len(items), p.local_batch, p.process_index, p.process_count)
    mine = [items[i] for i in chunk]
    elements = lambda: _eval_elements(cfg, p.source, mine, num_batches * p.local_batch, cfg.eval_video_mask)  # noqa: E731
    map_fn = tf_ops.caption_map_fn(cfg, p.source.features, False, include_video, True)
    return EvalData(batched_dataset(cfg, p.local_batch, elements, _element_signature(cfg), map_fn), num_batches,
                    len(items))


def make_train_iterator(
    cfg: InputConfig,
    sharding,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
    """Global training batches (jax.Arrays) from step `start_step`, prefetched `cfg.prefetch` deep."""
    ds = make_train_dataset(cfg, start_step, process_index, process_count)
    return device_iterator(numpy_batches(ds), sharding, cfg.prefetch)
