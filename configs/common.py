"""Config helpers: typed parsing of the `:arg` string (`file.py:base,frames=16`) and the `official` variant."""
from __future__ import annotations

from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses "a=1,flag,name=x" into a ConfigDict typed like `defaults` (a bare word sets a bool True).

    Unknown keys and untypeable values fail with a message listing the valid keys.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={raw!r} must be true/false")
            out[key] = raw.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(raw)
        elif isinstance(default, float):
            out[key] = float(raw)
        else:
            out[key] = raw
    return out


OFFICIAL = "official"


def split_official(arg: str | None) -> tuple[str, bool]:
    """("base,tiny", True) for "base,official,tiny": the `official` word taken out of a `:arg` string."""
    items = [item.strip() for item in (arg or "").split(",") if item.strip()]
    return ",".join(item for item in items if item != OFFICIAL), OFFICIAL in items


def apply_official(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The official code's behaviour on every switch where ours differs on purpose (README, "Official
    recipe"): BGR frames and statistics, the contrastive gradient divided by the official run's GPU count
    (`loss.official_replicas`, set per recipe) and, where the batch splits over them, their per-GPU MLM mean,
    the official input pipeline (`_official_inputs`), and, with
    WebVid and CC3M, the official alternation, a fixed sample order and bicubic CC3M crops."""
    c.pixel_stats = "official"
    c.loss.contrastive_grad_scale = "official"
    if c.data.batch_size % c.loss.official_replicas == 0:  # each official GPU's own MLM mean (D10) where it splits
        c.loss.mlm_mean = "per_replica"
    # mmcv's lr formula (per iteration, as the pre-training config; recipes stepping per epoch add it) and the
    # pre-training / retrieval configs' weight-decay rules (the QA recipes replace them with theirs)
    c.optim.update(schedule="mmcv_cosine", decay_rules="official")
    _official_inputs(c)
    if sorted(c.data.sources) == ["cc3m", "webvid"]:
        c.data.mixture_mode = "alternate_official"
        c.data.source_order = ("webvid", "cc3m")
        c.data.epoch_order = "fixed"  # the official pre-training runner never calls the sampler's set_epoch
        c.data.sources.cc3m.resize_method = "bicubic"  # CLSRandomResizedCrop(interpolation='bicubic')
    return c


def _official_inputs(c: ml_collections.ConfigDict) -> None:
    """The official data pipeline's choices (issue 31): mmaction's train frame sampling, one sample per
    (clip, caption) pair, the official block-mask loop, random whole-word masking counted in tokens,
    replacement ids over the whole vocabulary, and MSVD-QA training frames squashed without a crop."""
    c.data.update(frame_sampling="mmaction", epoch_unit="caption", mask_fill="official", word_budget="tokens",
                  random_ids="any", crop_sampler="mmaction")
    if "qa" in c and c.qa.get("source", "") == "msvd_qa":
        c.data.train_crop = "squash"
