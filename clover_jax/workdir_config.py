"""A workdir belongs to one run: the `config.json` a run saved is compared with a new run's config at start.

Keys that shape the train state (the task, the model, the data sizes the model is built for, the
optimizer's structure) must match, or the run stops with one line naming the keys, both values and
what to do instead. Everything else (total_steps, logging, eval, microbatches, the compilation cache,
learning-rate values, data paths, the mesh) may change between a run and its continuation; those
differences are reported in one line and the run goes on.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

MISSING = "<absent>"
# Keys (dotted) or prefixes (ending in ".") that decide the shapes or the tree of the saved state.
STATE_KEYS = ("task", "model.", "data.num_frames", "data.image_size", "optim.grad_clip", "optim.lr_multipliers")
# Exceptions inside STATE_KEYS: implementation choices that leave every parameter's shape unchanged.
SHAPE_NEUTRAL = ("model.video_batching", "model.remat", "model.dtype",
                 "model.attention", "model.clip_groups")  # the last two: configs saved before `kernels`


class WorkdirConfigError(ValueError):
    """The workdir holds another run (its state would not fit); the message says how to proceed."""


def flatten_config(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} of a nested dict; lists and tuples are leaves (compared as lists)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten_config(value, f"{prefix}{key}."))
        if not tree and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _shapes_state(key: str) -> bool:
    def matches(pattern: str) -> bool:
        return key.startswith(pattern) if pattern.endswith(".") else key == pattern or key.startswith(pattern + ".")

    return any(matches(p) for p in STATE_KEYS) and not any(matches(p) for p in SHAPE_NEUTRAL)


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict, dict]:
    """(state-shaping differences, other differences), each {key: (saved value, new value)}."""
    a, b = flatten_config(saved), flatten_config(new)
    diffs = {k: (a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(set(a) | set(b))
             if a.get(k, MISSING) != b.get(k, MISSING)}
    shaping = {k: v for k, v in diffs.items() if _shapes_state(k)}
    return shaping, {k: v for k, v in diffs.items() if k not in shaping}


def _show(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if value != MISSING else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_workdir_config(workdir: pathlib.Path, new: Mapping[str, Any], has_checkpoint: bool) -> str | None:
    """Compares `workdir/config.json` with `new`. Raises WorkdirConfigError when a state-shaping key
    differs and the workdir holds a checkpoint; returns a one-line note of the allowed differences
    (None when there is nothing to say)."""
    path = workdir / "config.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise WorkdirConfigError(f"{path} cannot be read ({err}); move it away or use another --workdir") from None
    if not isinstance(saved, dict):
        raise WorkdirConfigError(f"{path} does not hold a config object; move it away or use another --workdir")
    shaping, other = config_differences(saved, new)
    if shaping and has_checkpoint:
        listed = ", ".join(f"{k}: {_show(a)} in the workdir, {_show(b)} now" for k, a, b in
                           ((k, *v) for k, v in list(shaping.items())[:4]))
        more = f" (+{len(shaping) - 4} more)" if len(shaping) > 4 else ""
        raise WorkdirConfigError(
            f"--workdir={workdir} holds a run whose state does not fit this config ({listed}{more}); to start a "
            f"new run use another --workdir, to start from its weights add --config.init_from={workdir}")
    if not other and not shaping:
        return None
    changed = {**other, **shaping}
    shown = ", ".join(f"{k} {_show(a, 30)} -> {_show(b, 30)}" for k, (a, b) in list(changed.items())[:6])
    more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
    return f"config differs from {path}: {shown}{more}"
