"""VideoQA inputs: fixed question / option texts over the clips of a split (`QAItems`) -> training and eval batches.

The same frames as the caption pipeline (`tf_ops`), with an answer index instead of captions and no
masks for MLM; the training stream walks epochs over the items (`index_stream.train_stream`) and the
eval pass pads like the caption eval pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np

from data_pipelines.input import tf_ops
from data_pipelines.input.index_stream import eval_chunk, example_randomness, padded_rows, train_stream
from data_pipelines.input.input_config import InputConfig
from data_pipelines.input.input_pipeline import EvalData, Pass, SplitSource, batched_dataset, open_pass, readable_item


@dataclasses.dataclass(frozen=True)
class QAItems:
    """Fixed-text items over the clips of one split (VideoQA): item i pairs clip `clip_index[i]` (storage
    order) with token ids/mask `text_ids[i]`, `text_mask[i]` — (L,) for an open-ended question, (K, L)
    for K multiple-choice options — and label `answer_index[i]` (answer-vocabulary index, -1 = outside
    the vocabulary; or the index of the true option).

    QA batches: video, valid, clip_index, item_index, answer_index int32 (B,) and text_ids/text_mask
    (B, L) (open-ended) or option_ids/option_mask (B, K, L) (multiple choice); no masks for MLM."""

    clip_index: np.ndarray
    text_ids: np.ndarray
    text_mask: np.ndarray
    answer_index: np.ndarray

    def __post_init__(self):
        n = len(self.clip_index)
        if n == 0:
            raise ValueError("QAItems is empty: no question to train or evaluate on")
        if self.text_ids.ndim not in (2, 3) or self.text_ids.shape != self.text_mask.shape:
            raise ValueError(f"QAItems text_ids/text_mask must both be (N, L) or (N, K, L), got "
                             f"{self.text_ids.shape} and {self.text_mask.shape}")
        if self.text_ids.shape[0] != n or np.shape(self.answer_index) != (n,):
            raise ValueError(f"QAItems: {n} clip indices, {self.text_ids.shape[0]} texts, "
                             f"{np.shape(self.answer_index)} answers; they must agree")

    def __len__(self) -> int:
        return len(self.clip_index)

    @property
    def multiple_choice(self) -> bool:
        return self.text_ids.ndim == 3


def _qa_signature(items: QAItems) -> dict:
    import tensorflow as tf

    text = tf.TensorSpec(items.text_ids.shape[1:], tf.int32)
    return {"serialized": tf.TensorSpec([], tf.string), "clip_index": tf.TensorSpec([], tf.int32),
            "item_index": tf.TensorSpec([], tf.int32), "valid": tf.TensorSpec([], tf.bool),
            "aug_seed": tf.TensorSpec([2], tf.int64), "text_ids": text, "text_mask": text,
            "answer_index": tf.TensorSpec([], tf.int32)}


def _qa_element(cfg: InputConfig, items: QAItems, item: int, epoch: int, serialized: bytes, valid: bool) -> dict:
    _, _, _, aug_seed = example_randomness(cfg.seed, epoch, item, 0, cfg.mask, with_mask=False)
    return {"serialized": serialized, "clip_index": int(items.clip_index[item]), "item_index": item, "valid": valid,
            "aug_seed": aug_seed, "text_ids": items.text_ids[item].astype(np.int32),
            "text_mask": items.text_mask[item].astype(np.int32), "answer_index": int(items.answer_index[item])}


def _qa_train_elements(cfg: InputConfig, p: Pass, items: QAItems, start_step: int) -> Iterator[dict]:
    """The training stream over items (the same epoch walk as the caption stream, over items not clips)."""
    for chosen in train_stream(len(items), cfg.seed, cfg.shuffle, cfg.batch_size, start_step, p.process_index,
                               p.process_count, fixed_order=cfg.epoch_order == "fixed"):
        raw = p.source.records.read([int(items.clip_index[i]) for _, i in chosen])
        for (epoch, item), serialized in zip(chosen, raw):
            if serialized is None:  # damaged and skipped (data.skip_damaged_records): the next readable item
                item, serialized = readable_item(p.source.records, items.clip_index, item)
            yield _qa_element(cfg, items, item, epoch, serialized, True)


def _qa_eval_elements(cfg: InputConfig, source: SplitSource, items: QAItems, rows: Sequence[int],
                      num_rows: int) -> Iterator[dict]:
    last_clip, last_raw = None, None
    for item, valid in padded_rows(rows, num_rows, rows[0] if rows else 0):
        clip = int(items.clip_index[item])
        if clip != last_clip:
            last_clip, last_raw = clip, source.records[clip]
        yield _qa_element(cfg, items, item, 0, last_raw, valid)


def make_qa_train_dataset(cfg: InputConfig, items: QAItems, start_step: int = 0, process_index: int | None = None,
                          process_count: int | None = None) -> Any:
    """Infinite tf.data.Dataset of this process's local QA training batches from global step `start_step`
    (exact resume; every item once per epoch; augmentation as for pre-training, no block masks)."""
    p = open_pass(cfg, process_index, process_count)
    _check_qa_clips(items, p.source)
    return batched_dataset(cfg, p.local_batch, lambda: _qa_train_elements(cfg, p, items, start_step),
                           _qa_signature(items), tf_ops.qa_map_fn(cfg, p.source.features, True, items.multiple_choice))


def make_qa_eval_dataset(cfg: InputConfig, items: QAItems, process_index: int | None = None,
                         process_count: int | None = None) -> EvalData:
    """Every item once (uniform frames, centre crop); the last batches are padded with valid=False rows."""
    p = open_pass(cfg, process_index, process_count)
    _check_qa_clips(items, p.source)
    chunk, num_batches = eval_chunk(len(items), p.local_batch, p.process_index, p.process_count)
    elements = lambda: _qa_eval_elements(cfg, p.source, items, list(chunk), num_batches * p.local_batch)  # noqa: E731
    map_fn = tf_ops.qa_map_fn(cfg, p.source.features, False, items.multiple_choice)
    return EvalData(batched_dataset(cfg, p.local_batch, elements, _qa_signature(items), map_fn), num_batches,
                    len(items))


def _check_qa_clips(items: QAItems, source: SplitSource) -> None:
    bad = np.flatnonzero((items.clip_index < 0) | (items.clip_index >= len(source.index)))
    if bad.size:
        raise ValueError(f"QA item {int(bad[0])} names clip {int(items.clip_index[bad[0]])}, but {source.folder} "
                         f"has {len(source.index)} clips in that split")
