"""tf.data input pipeline: built clips -> sampled, decoded, augmented, masked batches -> global jax.Arrays.

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

The index stream, caption choice and block masks (numpy) come from a small Python generator that also
reads the serialized records (`__getitems__` per local batch); parsing, frame sampling (TSN segments
for training, segment centres for eval), JPEG decode of only the sampled frames
(`tf.image.decode_and_crop_jpeg`), RandomResizedCrop / centre crop, resize, flip and normalisation run
in the tf.data graph in parallel; text goes through `text_masking.tf_encode_and_mask`.

Evaluation visits each clip (or each (clip, caption) pair) exactly once: every process gets a
contiguous chunk, padded to the same number of batches with `valid=False` rows.

Batch contract (numpy per process; global jax.Arrays through `to_global` / `device_iterator`):
  video float32 (B,T,H,W,3) normalised; video_mask float32 (B,Hp,Wp) 1 = masked (Hp = image_size/4);
  text_ids, text_mask, text_ids_masked, mlm_labels int32 (B,L); valid bool (B,); clip_index int32 (B,);
  eval batches also carry caption_index int32 (B,) (-1 for a clip without captions).
VideoQA batches (`make_qa_train_dataset` / `make_qa_eval_dataset` over `QAItems`): the same frames,
with fixed question / option texts and an answer index instead of captions (see `QAItems`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from data_pipelines import builder
from data_pipelines.text_masking import TextMaskingConfig
from data_pipelines.video_masking import BlockMaskConfig, block_mask_grid, token_grid_size

# Used when an eval clip has no caption (e.g. a distractor in a retrieval gallery); never masked.
NO_CAPTION_TEXT = "no caption"
TEXT_KEYS = ("text_ids", "text_mask", "text_ids_masked", "mlm_labels")


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Every knob of the input pipeline.

    dataset: folder returned by `builder.build_dataset` (the TFDS version folder); split: its split.
    batch_size: global batch size (divisible by the process count).
    num_frames / image_size: output clip size (T, image_size, image_size, 3).
    crop_area / crop_aspect: RandomResizedCrop ranges (training only; eval: centre square crop).
    flip_prob: horizontal flip probability (training only; reference pre-training: 0).
    mean / std: per-channel normalisation on the 0..255 scale (reference: ImageNet values).
    mask: video block masks (training; eval batches carry an all-zero mask unless eval_video_mask).
    text: tokenisation + MLM masking of the caption (`text_masking.TextMaskingConfig`).
    num_views: eval only: V > 1 gives (V, T, S, S, 3) clips, V interleaved views of T frames taken from
      V*T uniform frames (view v holds frames v, v+V, ...); TGIF multi-view testing (reference §5.2).
    seed: fixes the whole stream. shuffle: False walks examples in storage order every epoch.
    prefetch: batches prepared ahead by tf.data and, separately, put on device ahead.
    num_parallel_calls: tf.data map parallelism (-1 = AUTOTUNE). threads: private tf.data threadpool
    size (0 = TF default).
    """

    dataset: str = ""
    split: str = "train"
    batch_size: int = 32
    num_frames: int = 8
    image_size: int = 224
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.0
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    mask: BlockMaskConfig = BlockMaskConfig()
    eval_video_mask: bool = False
    num_views: int = 1
    text: TextMaskingConfig = TextMaskingConfig()
    seed: int = 0
    shuffle: bool = True
    prefetch: int = 2
    num_parallel_calls: int = -1
    threads: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"InputConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_frames < 1:
            raise ValueError(f"InputConfig.num_frames must be >= 1, got {self.num_frames}")
        if self.num_views < 1:
            raise ValueError(f"InputConfig.num_views must be >= 1, got {self.num_views}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"InputConfig.flip_prob must be in [0, 1], got {self.flip_prob}")
        token_grid_size(self.image_size, self.mask)  # raises a clear error when the grid does not fit

    def replace(self, **kwargs) -> "InputConfig":
        return dataclasses.replace(self, **kwargs)


def _process_layout(cfg: InputConfig, process_index: int | None, process_count: int | None) -> tuple[int, int, int]:
    """(process_index, process_count, local batch size), defaulting to jax's process layout."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if cfg.batch_size % process_count:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {process_count} processes")
    return process_index, process_count, cfg.batch_size // process_count


def epoch_permutation(num: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Order of the examples in epoch `epoch` (a pure function of seed and epoch)."""
    if not shuffle:
        return np.arange(num)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num)


def train_positions(step: int, batch_size: int, process_index: int, process_count: int) -> range:
    """Global stream positions that process `process_index` reads for global batch `step`."""
    local = batch_size // process_count
    start = step * batch_size + process_index * local
    return range(start, start + local)


def _example_randomness(seed: int, epoch: int, index: int, num_captions: int, cfg: InputConfig, with_mask: bool):
    """(caption index, mask grid, text seed (2,), augmentation seed (2,)) for one read of one example."""
    rng = np.random.default_rng([seed, epoch, index])
    caption = int(rng.integers(num_captions)) if num_captions > 0 else -1
    seeds = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=(2, 2), dtype=np.int64)
    if with_mask:
        grid = block_mask_grid(rng, cfg.mask).astype(np.uint8)
    else:
        grid = np.zeros((cfg.mask.grid, cfg.mask.grid), np.uint8)
    return caption, grid, seeds[0], seeds[1]


class _Source:
    """A built split: random access to its records, its per-example index and its TFDS features."""

    def __init__(self, folder: str | os.PathLike, split: str):
        if not folder:
            raise ValueError("InputConfig.dataset is empty: pass the folder returned by builder.build_dataset")
        self.folder = folder
        self.records = builder.open_source(folder, split)
        self.index = builder.split_index(folder, split)
        self.features = builder.load_builder(folder).info.features


def _element_signature(cfg: InputConfig):
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


def _train_elements(cfg: InputConfig, source: _Source, start_step: int, process_index: int, process_count: int):
    """Python generator of per-example elements for the training stream (see module docstring)."""
    usable = np.flatnonzero(source.index.num_captions > 0)
    if usable.size == 0:
        raise ValueError(f"{source.folder} split {cfg.split!r} has no clip with a caption to train on")
    num = usable.size
    perms: dict[int, np.ndarray] = {}
    step = start_step
    while True:
        positions = train_positions(step, cfg.batch_size, process_index, process_count)
        chosen = []
        for pos in positions:
            epoch, offset = divmod(pos, num)
            if epoch not in perms:
                perms.clear()  # a local batch spans at most two epochs; keep memory at O(N)
                perms[epoch] = epoch_permutation(num, cfg.seed, epoch, cfg.shuffle)
            chosen.append((epoch, int(usable[perms[epoch][offset]])))
        raw = source.records.__getitems__([i for _, i in chosen])
        for (epoch, index), serialized in zip(chosen, raw):
            caption, grid, text_seed, aug_seed = _example_randomness(
                cfg.seed, epoch, index, int(source.index.num_captions[index]), cfg, with_mask=True
            )
            yield {
                "serialized": serialized,
                "clip_index": index,
                "caption_index": caption,
                "valid": True,
                "mask_grid": grid,
                "text_seed": text_seed,
                "aug_seed": aug_seed,
            }
        step += 1


def eval_items(
    source_index: builder.SplitIndex, mode: Literal["clips", "pairs"]
) -> list[tuple[int, int]]:
    """(clip, caption) items of an eval pass: one per clip (caption 0, or -1 without captions) or one
    per (clip, caption) pair."""
    if mode == "clips":
        return [(i, 0 if n > 0 else -1) for i, n in enumerate(source_index.num_captions)]
    if mode == "pairs":
        return [(i, c) for i, n in enumerate(source_index.num_captions) for c in range(int(n))]
    raise ValueError(f"eval mode must be 'clips' or 'pairs', got {mode!r}")


def eval_chunk(num_items: int, local_batch: int, process_index: int, process_count: int) -> tuple[range, int]:
    """(this process's contiguous item range, batches every process yields)."""
    per_process = math.ceil(num_items / process_count)
    start = min(num_items, process_index * per_process)
    stop = min(num_items, start + per_process)
    return range(start, stop), max(1, math.ceil(per_process / local_batch))


def _eval_elements(cfg: InputConfig, source: _Source, items: Sequence[tuple[int, int]], num_rows: int, with_video_mask: bool):
    """Elements for `items`, then padding rows (valid=False, a copy of the first item) up to num_rows."""
    pad_item = items[0] if items else (0, -1 if source.index.num_captions[0] == 0 else 0)
    rows = list(items) + [pad_item] * (num_rows - len(items))
    last_clip, last_raw = None, None
    for row, (clip, caption) in enumerate(rows):
        if clip != last_clip:  # consecutive pairs of one clip read its record once
            last_clip, last_raw = clip, source.records[clip]
        _, grid, text_seed, aug_seed = _example_randomness(cfg.seed, 0, clip, 0, cfg, with_mask=with_video_mask)
        # The text seed also depends on the caption so each pair gets its own (deterministic) mask.
        text_seed = np.random.default_rng([cfg.seed, clip, caption + 1, 7]).integers(
            np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=2, dtype=np.int64
        )
        yield {
            "serialized": last_raw,
            "clip_index": clip,
            "caption_index": caption,
            "valid": row < len(items),
            "mask_grid": grid,
            "text_seed": text_seed,
            "aug_seed": aug_seed,
        }


def sample_frame_indices(num_stored, num_frames: int, train: bool, seed):
    """TSN segment sampling (train: a random frame per segment; eval: segment centres), int32 (T,).

    Clips with fewer stored frames than segments repeat frames (indices are floor'ed and clipped).
    """
    import tensorflow as tf

    n = tf.cast(num_stored, tf.float32)
    segment = n / num_frames
    starts = tf.range(num_frames, dtype=tf.float32) * segment
    if train:
        offsets = tf.random.stateless_uniform([num_frames], seed=seed, dtype=tf.float32) * segment
    else:
        offsets = tf.fill([num_frames], 0.5) * segment
    indices = tf.cast(tf.floor(starts + offsets), tf.int32)
    return tf.clip_by_value(indices, 0, tf.maximum(tf.cast(num_stored, tf.int32) - 1, 0))


def _crop_window(height, width, cfg: InputConfig, train: bool, seed):
    """[y, x, h, w] int32: a RandomResizedCrop box (train) or the centre square (eval)."""
    import tensorflow as tf

    if train:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            image_size=tf.stack([height, width, 3]),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=cfg.crop_aspect,
            area_range=cfg.crop_area,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return tf.stack([begin[0], begin[1], size[0], size[1]])
    side = tf.minimum(height, width)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def _decoded_video(ex, cfg: InputConfig, train: bool, aug_seeds):
    """Sampled, decoded, cropped, resized, flipped, normalised float32 (T, S, S, 3) frames of a parsed example
    (`aug_seeds`: 3 stateless seeds for frame sampling, crop and flip); (V, T, S, S, 3) for V eval views."""
    import tensorflow as tf

    views = 1 if train else cfg.num_views
    indices = sample_frame_indices(ex["num_frames"], cfg.num_frames * views, train, aug_seeds[0])
    jpegs = tf.gather(ex["frames"], indices)
    window = _crop_window(ex["height"], ex["width"], cfg, train, aug_seeds[1])
    frames = tf.map_fn(
        lambda b: tf.image.decode_and_crop_jpeg(b, window, channels=3),
        jpegs,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )
    video = tf.image.resize(frames, [cfg.image_size, cfg.image_size], method="bilinear")
    if train and cfg.flip_prob > 0:
        flip = tf.random.stateless_uniform([], seed=aug_seeds[2]) < cfg.flip_prob
        video = tf.cond(flip, lambda: tf.reverse(video, axis=[2]), lambda: video)
    video = (video - tf.constant(cfg.mean, tf.float32)) / tf.constant(cfg.std, tf.float32)
    if views > 1:  # frame t*V + v is frame t of view v
        video = tf.transpose(tf.reshape(video, [cfg.num_frames, views, cfg.image_size, cfg.image_size, 3]),
                             [1, 0, 2, 3, 4])
        video.set_shape([views, cfg.num_frames, cfg.image_size, cfg.image_size, 3])
        return video
    video.set_shape([cfg.num_frames, cfg.image_size, cfg.image_size, 3])
    return video


def _make_map_fn(cfg: InputConfig, features, train: bool, include_video: bool, caption_index_out: bool) -> Callable:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from data_pipelines.text_masking import tf_encode_and_mask

    tokens = token_grid_size(cfg.image_size, cfg.mask)
    cell = tokens // cfg.mask.grid
    placeholder_tags = {
        "word_start": [0], "word_end": [len(NO_CAPTION_TEXT)], "candidate": [0], "stop": [1],
    }

    def fn(elem):
        ex = features.deserialize_example(elem["serialized"], decoders={"frames": tfds.decode.SkipDecoding()})
        out = {}
        aug_seeds = tf.random.experimental.stateless_split(tf.cast(elem["aug_seed"], tf.int64), 3)
        if include_video:
            out["video"] = _decoded_video(ex, cfg, train, aug_seeds)
            grid = tf.cast(elem["mask_grid"], tf.float32)
            out["video_mask"] = tf.repeat(tf.repeat(grid, cell, axis=0), cell, axis=1)
        # Caption -1 (clip without captions) selects the appended placeholder row.
        num_caps = tf.shape(ex["captions"])[0]
        cap = tf.where(elem["caption_index"] < 0, num_caps, elem["caption_index"])
        caption = tf.concat([ex["captions"], [NO_CAPTION_TEXT]], axis=0)[cap]
        tags = {
            k: tf.concat([ex[k], tf.ragged.constant([v], dtype=tf.int32)], axis=0)[cap]
            for k, v in placeholder_tags.items()
        }
        text = tf_encode_and_mask(
            caption, tags["word_start"], tags["word_end"], tags["candidate"], tags["stop"], elem["text_seed"], cfg.text
        )
        out.update(text)
        out["valid"] = elem["valid"]
        out["clip_index"] = elem["clip_index"]
        if caption_index_out:
            out["caption_index"] = elem["caption_index"]
        return out

    return fn


def _finish(ds, cfg: InputConfig, map_fn, local_batch: int):
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if cfg.threads:
        options.threading.private_threadpool_size = cfg.threads
    ds = ds.with_options(options)
    ds = ds.map(map_fn, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(cfg.prefetch)


def make_train_dataset(
    cfg: InputConfig, start_step: int = 0, process_index: int | None = None, process_count: int | None = None
):
    """Infinite tf.data.Dataset of this process's local training batches, from global step `start_step`."""
    import tensorflow as tf

    process_index, process_count, local_batch = _process_layout(cfg, process_index, process_count)
    source = _Source(cfg.dataset, cfg.split)
    ds = tf.data.Dataset.from_generator(
        lambda: _train_elements(cfg, source, start_step, process_index, process_count),
        output_signature=_element_signature(cfg),
    )
    return _finish(ds, cfg, _make_map_fn(cfg, source.features, True, True, False), local_batch)


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
    import tensorflow as tf

    process_index, process_count, local_batch = _process_layout(cfg, process_index, process_count)
    source = _Source(cfg.dataset, cfg.split)
    items = eval_items(source.index, mode)
    if not items:
        raise ValueError(f"{cfg.dataset} split {cfg.split!r} has nothing to evaluate in mode {mode!r}")
    chunk, num_batches = eval_chunk(len(items), local_batch, process_index, process_count)
    mine = [items[i] for i in chunk]
    ds = tf.data.Dataset.from_generator(
        lambda: _eval_elements(cfg, source, mine, num_batches * local_batch, cfg.eval_video_mask),
        output_signature=_element_signature(cfg),
    )
    map_fn = _make_map_fn(cfg, source.features, False, include_video, True)
    return EvalData(_finish(ds, cfg, map_fn, local_batch), num_batches, len(items))


def numpy_batches(ds) -> Iterator[dict[str, np.ndarray]]:
    """Local batches as dicts of numpy arrays."""
    return iter(ds.as_numpy_iterator())


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """Local batch -> global jax.Arrays sharded along the batch axis by `sharding` (e.g.
    NamedSharding(mesh, P("data"))); every process passes its own local rows."""
    import jax

    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def device_iterator(local_batches: Iterable[dict[str, np.ndarray]], sharding, prefetch: int = 2) -> Iterator[dict]:
    """Yields global batches, keeping `prefetch` batches already transferred ahead of the consumer."""
    queue: collections.deque = collections.deque()
    iterator = iter(local_batches)
    for batch in iterator:
        queue.append(to_global(batch, sharding))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


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


# ----------------------------------------------------------------------------- VideoQA items


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


def _qa_signature(items: QAItems):
    import tensorflow as tf

    text = tf.TensorSpec(items.text_ids.shape[1:], tf.int32)
    return {"serialized": tf.TensorSpec([], tf.string), "clip_index": tf.TensorSpec([], tf.int32),
            "item_index": tf.TensorSpec([], tf.int32), "valid": tf.TensorSpec([], tf.bool),
            "aug_seed": tf.TensorSpec([2], tf.int64), "text_ids": text, "text_mask": text,
            "answer_index": tf.TensorSpec([], tf.int32)}


def _qa_element(cfg: InputConfig, items: QAItems, item: int, epoch: int, serialized: bytes, valid: bool) -> dict:
    _, _, _, aug_seed = _example_randomness(cfg.seed, epoch, item, 0, cfg, with_mask=False)
    return {"serialized": serialized, "clip_index": int(items.clip_index[item]), "item_index": item, "valid": valid,
            "aug_seed": aug_seed, "text_ids": items.text_ids[item].astype(np.int32),
            "text_mask": items.text_mask[item].astype(np.int32), "answer_index": int(items.answer_index[item])}


def _qa_train_elements(cfg: InputConfig, source: _Source, items: QAItems, start_step: int, process_index: int,
                       process_count: int):
    """The training stream over items (epoch permutations of the items, as `_train_elements` over clips)."""
    perms: dict[int, np.ndarray] = {}
    step = start_step
    while True:
        chosen = []
        for pos in train_positions(step, cfg.batch_size, process_index, process_count):
            epoch, offset = divmod(pos, len(items))
            if epoch not in perms:
                perms.clear()
                perms[epoch] = epoch_permutation(len(items), cfg.seed, epoch, cfg.shuffle)
            chosen.append((epoch, int(perms[epoch][offset])))
        raw = source.records.__getitems__([int(items.clip_index[i]) for _, i in chosen])
        for (epoch, item), serialized in zip(chosen, raw):
            yield _qa_element(cfg, items, item, epoch, serialized, True)
        step += 1


def _qa_eval_elements(cfg: InputConfig, source: _Source, items: QAItems, rows: Sequence[int], num_rows: int):
    padded = list(rows) + [rows[0] if rows else 0] * (num_rows - len(rows))
    last_clip, last_raw = None, None
    for row, item in enumerate(padded):
        clip = int(items.clip_index[item])
        if clip != last_clip:
            last_clip, last_raw = clip, source.records[clip]
        yield _qa_element(cfg, items, item, 0, last_raw, row < len(rows))


def _make_qa_map_fn(cfg: InputConfig, features, train: bool, multiple_choice: bool) -> Callable:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    prefix = "option" if multiple_choice else "text"

    def fn(elem):
        ex = features.deserialize_example(elem["serialized"], decoders={"frames": tfds.decode.SkipDecoding()})
        aug_seeds = tf.random.experimental.stateless_split(tf.cast(elem["aug_seed"], tf.int64), 3)
        out = {"video": _decoded_video(ex, cfg, train, aug_seeds),
               f"{prefix}_ids": elem["text_ids"], f"{prefix}_mask": elem["text_mask"]}
        out.update({k: elem[k] for k in ("answer_index", "valid", "clip_index", "item_index")})
        return out

    return fn


def make_qa_train_dataset(cfg: InputConfig, items: QAItems, start_step: int = 0, process_index: int | None = None,
                          process_count: int | None = None):
    """Infinite tf.data.Dataset of this process's local QA training batches from global step `start_step`
    (exact resume; every item once per epoch; augmentation as for pre-training, no block masks)."""
    import tensorflow as tf

    process_index, process_count, local_batch = _process_layout(cfg, process_index, process_count)
    source = _Source(cfg.dataset, cfg.split)
    _check_qa_clips(items, source)
    ds = tf.data.Dataset.from_generator(
        lambda: _qa_train_elements(cfg, source, items, start_step, process_index, process_count),
        output_signature=_qa_signature(items),
    )
    return _finish(ds, cfg, _make_qa_map_fn(cfg, source.features, True, items.multiple_choice), local_batch)


def make_qa_eval_dataset(cfg: InputConfig, items: QAItems, process_index: int | None = None,
                         process_count: int | None = None) -> EvalData:
    """Every item once (uniform frames, centre crop); the last batches are padded with valid=False rows."""
    import tensorflow as tf

    process_index, process_count, local_batch = _process_layout(cfg, process_index, process_count)
    source = _Source(cfg.dataset, cfg.split)
    _check_qa_clips(items, source)
    chunk, num_batches = eval_chunk(len(items), local_batch, process_index, process_count)
    ds = tf.data.Dataset.from_generator(
        lambda: _qa_eval_elements(cfg, source, items, list(chunk), num_batches * local_batch),
        output_signature=_qa_signature(items),
    )
    map_fn = _make_qa_map_fn(cfg, source.features, False, items.multiple_choice)
    return EvalData(_finish(ds, cfg, map_fn, local_batch), num_batches, len(items))


def _check_qa_clips(items: QAItems, source: _Source) -> None:
    bad = np.flatnonzero((items.clip_index < 0) | (items.clip_index >= len(source.index)))
    if bad.size:
        raise ValueError(f"QA item {int(bad[0])} names clip {int(items.clip_index[bad[0]])}, but {source.folder} "
                         f"has {len(source.index)} clips in that split")


# ----------------------------------------------------------------------------- mixtures


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One dataset of a mixture: a name for logs, its own input config, its weight (mode "weighted")."""

    name: str
    input: InputConfig
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
    """Datasets trained in turn, one whole batch (one optimizer step) from one source at a time.

    mode "alternate": step k uses source k % n (the reference's WebVid, CC3M, WebVid, ... order);
    mode "weighted": step k's source is drawn with probabilities ∝ weight from (seed, k).
    """

    sources: tuple[MixtureSource, ...]
    mode: Literal["alternate", "weighted"] = "alternate"
    seed: int = 0

    def __post_init__(self):
        if not self.sources:
            raise ValueError("MixtureConfig.sources is empty")
        if self.mode not in ("alternate", "weighted"):
            raise ValueError(f"MixtureConfig.mode must be 'alternate' or 'weighted', got {self.mode!r}")
        if self.mode == "weighted" and any(s.weight <= 0 for s in self.sources):
            raise ValueError("MixtureConfig weights must all be > 0 in mode 'weighted'")


_SCHEDULE_CHUNK = 4096


def mixture_schedule(mix: MixtureConfig, start: int, stop: int) -> np.ndarray:
    """Source id of every global step in [start, stop) (a pure function of the config)."""
    steps = np.arange(start, stop)
    n = len(mix.sources)
    if mix.mode == "alternate":
        return steps % n
    weights = np.array([s.weight for s in mix.sources], np.float64)
    out = np.empty(len(steps), np.int64)
    for c in range(start // _SCHEDULE_CHUNK, (max(stop, start + 1) - 1) // _SCHEDULE_CHUNK + 1):
        chunk = np.random.default_rng([mix.seed, c]).choice(n, _SCHEDULE_CHUNK, p=weights / weights.sum())
        lo, hi = max(start, c * _SCHEDULE_CHUNK), min(stop, (c + 1) * _SCHEDULE_CHUNK)
        out[lo - start : hi - start] = chunk[lo - c * _SCHEDULE_CHUNK : hi - c * _SCHEDULE_CHUNK]
    return out


def make_mixture_iterator(
    mix: MixtureConfig,
    start_step: int = 0,
    sharding=None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[tuple[str, dict]]:
    """Yields (source name, batch) per global step from `start_step`; each source resumes at the
    number of batches it gave before `start_step`, so resume stays exact. Batches are numpy unless
    `sharding` is given (then global jax.Arrays)."""
    counts = np.bincount(mixture_schedule(mix, 0, start_step), minlength=len(mix.sources))
    iterators = []
    for source, count in zip(mix.sources, counts):
        ds = make_train_dataset(source.input, int(count), process_index, process_count)
        batches = numpy_batches(ds)
        iterators.append(device_iterator(batches, sharding, source.input.prefetch) if sharding is not None else batches)
    step = start_step
    while True:
        for sid in mixture_schedule(mix, step, step + _SCHEDULE_CHUNK):
            yield mix.sources[sid].name, next(iterators[sid])
        step += _SCHEDULE_CHUNK
