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
    (`loss.official_replicas`, set per recipe), and, with WebVid and CC3M, the official alternation."""
    c.pixel_stats = "official"
    c.loss.contrastive_grad_scale = "official"
    if sorted(c.data.sources) == ["cc3m", "webvid"]:
        c.data.mixture_mode = "alternate_official"
        c.data.source_order = ("webvid", "cc3m")
    return c
