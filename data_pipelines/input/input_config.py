"""The settings of the input pipeline (`InputConfig`), shared by the caption and the QA pipelines."""
from __future__ import annotations

import dataclasses

from data_pipelines.input.text_masking import TextMaskingConfig
from data_pipelines.input.video_masking import BlockMaskConfig, token_grid_size

# Used when an eval clip has no caption (e.g. a distractor in a retrieval gallery); never masked.
NO_CAPTION_TEXT = "no caption"


@dataclasses.dataclass(frozen=True)
class PixelStats:
    """Normalisation on the 0..255 scale, per channel in the order the model sees (`channel_order`)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str  # "rgb", or "bgr": decoded RGB frames are reversed before normalising


# `config.pixel_stats` names (besides "auto", which `clover_jax.pixel_stats` resolves to one of these).
# "official": the official code feeds BGR frames (its decord/PyAV decoders reverse the RGB frames, cv2
# reads CC3M images as BGR) and normalises them with the ImageNet statistics in BGR order.
PIXEL_STATS = {
    "imagenet_rgb": PixelStats((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "rgb"),
    "official": PixelStats((103.53, 116.28, 123.675), (57.375, 57.12, 58.395), "bgr"),
}
# Eval-time spatial resize: "centre" = centre square crop then resize; "squash" = the whole frame resized to
# image_size x image_size, aspect ratio not kept (the official QA test pipelines).
EVAL_CROPS = ("centre", "squash")
# Eval-time views (num_views > 1): see `tf_ops.sample_view_indices`.
VIEW_SAMPLINGS = ("interleaved", "tgif_clips")
# Training crop box (`tf_ops.crop_window`): "mmaction" = RandomResizedCrop as mmaction/torchvision draw it (area
# uniform, aspect log-uniform, 10 tries, centre-square fallback); "tf_box" = TF's distorted bounding box (aspect
# and height uniform, whole-frame fallback: more small crops), the sampler before issue 31.
CROP_SAMPLERS = ("mmaction", "tf_box")
# Training spatial transform: "random_resized" = crop box then resize; "squash" = the whole frame resized to a
# square, no crop (the official MSVD-QA training pipeline).
TRAIN_CROPS = ("random_resized", "squash")
RESIZE_METHODS = ("bilinear", "bicubic")
# Training frame sampling (`tf_ops.train_frame_indices`): "segments" = a uniform point in each of T equal float
# segments; "mmaction" = mmaction's SampleFrames train mode (integer segment length N // T: the tail never sampled).
FRAME_SAMPLINGS = ("segments", "mmaction")
# What one training epoch visits: every captioned clip once with a random caption ("clip"), or every
# (clip, caption) pair once ("caption": the official MsrvttVideoDataset, one sample per caption).
EPOCH_UNITS = ("clip", "caption")
# "reshuffle": a new permutation every epoch; "fixed": epoch 0's order every epoch (the official pre-training
# runner never calls the sampler's set_epoch).
EPOCH_ORDERS = ("reshuffle", "fixed")


def pixel_fields(name: str) -> dict:
    """The InputConfig fields (mean, std, channel_order) of the concrete `PIXEL_STATS` entry `name`."""
    if name not in PIXEL_STATS:
        raise ValueError(f"pixel_stats={name!r}; valid: {', '.join(map(repr, PIXEL_STATS))} (or 'auto' in a config)")
    stats = PIXEL_STATS[name]
    return dict(mean=stats.mean, std=stats.std, channel_order=stats.channel_order)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Every knob of the input pipeline.

    dataset: folder returned by `builder.build_dataset` (the TFDS version folder); split: its split.
    batch_size: global batch size (divisible by the process count).
    num_frames / image_size: output clip size (T, image_size, image_size, 3).
    crop_area / crop_aspect: RandomResizedCrop ranges (training only); crop_sampler: one of CROP_SAMPLERS;
      train_crop: one of TRAIN_CROPS; resize_method: one of RESIZE_METHODS (official CC3M: bicubic).
    frame_sampling: training frame sampling, one of FRAME_SAMPLINGS.
    epoch_unit / epoch_order: what a training epoch visits and in which order (EPOCH_UNITS, EPOCH_ORDERS).
    eval_crop: eval resize, one of EVAL_CROPS ("centre": centre square crop; "squash": whole frame).
    flip_prob: horizontal flip probability (training only; reference pre-training: 0).
    mean / std: per-channel normalisation on the 0..255 scale, in `channel_order` ("rgb", or "bgr": frames
      reversed to BGR first); `pixel_fields` gives the three for a `PIXEL_STATS` name.
    mask: video block masks (training; eval batches carry an all-zero mask unless eval_video_mask).
    text: tokenisation + MLM masking of the caption (`text_masking.TextMaskingConfig`).
    num_views: eval only: V > 1 gives (V, T, S, S, 3) clips, sampled as `view_sampling` says (one of
      VIEW_SAMPLINGS, `tf_ops.sample_view_indices`); TGIF multi-view testing (reference §5.2).
    seed: fixes the whole stream. shuffle: False walks examples in storage order every epoch.
    skip_damaged_records: training reads past records whose chunk fails its checksum (each replaced by the next
      readable item, counted), stopping when more than max_damaged_fraction of the split is lost; otherwise
      a damaged record stops the pass (`damaged_records.DamagedRecordsError`). Evaluation never skips.
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
    crop_sampler: str = "tf_box"
    train_crop: str = "random_resized"
    resize_method: str = "bilinear"
    frame_sampling: str = "segments"
    epoch_unit: str = "clip"
    epoch_order: str = "reshuffle"
    eval_crop: str = "centre"
    flip_prob: float = 0.0
    mean: tuple[float, float, float] = PIXEL_STATS["imagenet_rgb"].mean
    std: tuple[float, float, float] = PIXEL_STATS["imagenet_rgb"].std
    channel_order: str = "rgb"
    mask: BlockMaskConfig = BlockMaskConfig()
    eval_video_mask: bool = False
    num_views: int = 1
    view_sampling: str = "interleaved"
    text: TextMaskingConfig = TextMaskingConfig()
    seed: int = 0
    shuffle: bool = True
    skip_damaged_records: bool = False
    max_damaged_fraction: float = 0.01
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
        if not 0.0 <= self.max_damaged_fraction < 1.0:
            raise ValueError(f"data.max_damaged_fraction must be in [0, 1), got {self.max_damaged_fraction}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"InputConfig.flip_prob must be in [0, 1], got {self.flip_prob}")
        for name, value, valid in (("eval_crop", self.eval_crop, EVAL_CROPS),
                                   ("channel_order", self.channel_order, ("rgb", "bgr")),
                                   ("view_sampling", self.view_sampling, VIEW_SAMPLINGS),
                                   ("crop_sampler", self.crop_sampler, CROP_SAMPLERS),
                                   ("train_crop", self.train_crop, TRAIN_CROPS),
                                   ("resize_method", self.resize_method, RESIZE_METHODS),
                                   ("frame_sampling", self.frame_sampling, FRAME_SAMPLINGS),
                                   ("epoch_unit", self.epoch_unit, EPOCH_UNITS),
                                   ("epoch_order", self.epoch_order, EPOCH_ORDERS)):
            if value not in valid:
                raise ValueError(f"InputConfig.{name}={value!r}; valid: {', '.join(map(repr, valid))}")
        token_grid_size(self.image_size, self.mask)  # raises a clear error when the grid does not fit

    def replace(self, **kwargs) -> "InputConfig":
        return dataclasses.replace(self, **kwargs)
