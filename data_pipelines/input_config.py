"""The settings of the input pipeline (`InputConfig`), shared by the caption and the QA pipelines."""
from __future__ import annotations

import dataclasses

from data_pipelines.text_masking import TextMaskingConfig
from data_pipelines.video_masking import BlockMaskConfig, token_grid_size

# Used when an eval clip has no caption (e.g. a distractor in a retrieval gallery); never masked.
NO_CAPTION_TEXT = "no caption"


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
