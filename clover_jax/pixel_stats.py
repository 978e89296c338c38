"""Which pixel statistics a run uses: `config.pixel_stats` ("auto", or a name of `input_config.PIXEL_STATS`).

"auto" follows the weights: "official" when they come from an official Clover checkpoint (a
`python -m clover_jax.convert --source official_clover` output, whose `conversion.json` records its
source), or from a training run that used "official"; else "imagenet_rgb". The weights of a training run
are, in restore order, its workdir's checkpoints, `config.resume`, then `config.init_from`; those of an
evaluation are `--checkpoint`. Entry points resolve once (`resolve`) and store the concrete name in
`config.pixel_stats`, so a run's saved config.json says which statistics it trained with.
"""
from __future__ import annotations

import json
import pathlib

from ml_collections import ConfigDict

from data_pipelines.input.input_config import PIXEL_STATS

AUTO = "auto"
OFFICIAL_SOURCE = "official_clover"  # the converter's --source for an official Clover checkpoint
# The statistics of a run saved before `pixel_stats` existed (the pipeline then always used these).
LEGACY = "imagenet_rgb"
_MAX_CHAIN = 8  # workdirs followed through init_from / resume before giving up


def check(name: str) -> None:
    """Raises ValueError (one line) unless `name` is "auto" or a `PIXEL_STATS` name."""
    if name != AUTO and name not in PIXEL_STATS:
        raise ValueError(f"config.pixel_stats={name!r}; valid: 'auto', "
                         f"{', '.join(map(repr, PIXEL_STATS))}")


def _run_folder(path: pathlib.Path) -> pathlib.Path | None:
    """The training workdir holding checkpoint `path` (itself, or up to 3 levels up: checkpoints/N/state)."""
    for folder in (path, *list(path.parents)[:3]):
        if (folder / "config.json").is_file():
            return folder
    return None


def stats_of_weights(path: str | pathlib.Path, _depth: int = 0) -> tuple[str, str]:
    """(statistics name, why) for weights read from `path`: a converter output, a training workdir or one
    of its checkpoints."""
    path = pathlib.Path(path).expanduser().absolute()
    conversion = path / "conversion.json"
    if conversion.is_file():
        source = json.loads(conversion.read_text()).get("source", "")
        official = source == OFFICIAL_SOURCE
        what = "an official Clover checkpoint" if official else "not an official Clover checkpoint"
        return "official" if official else "imagenet_rgb", f"{path} is converted from --source {source} ({what})"
    folder = _run_folder(path)
    if folder is None:
        return "imagenet_rgb", f"{path} is neither a converter output nor a training run's checkpoint"
    saved = json.loads((folder / "config.json").read_text())
    name = saved.get("pixel_stats", LEGACY)
    if name != AUTO:
        return name, f"{path} is from the training run {folder}, which used pixel_stats={name}"
    if _depth >= _MAX_CHAIN:
        return "imagenet_rgb", f"gave up following init_from/resume after {_MAX_CHAIN} runs"
    return _from_sources(saved, None, _depth + 1)


def _from_sources(config: ConfigDict, workdir: pathlib.Path | None, depth: int) -> tuple[str, str]:
    """(name, why) for "auto": the first weights source in restore order that is set."""
    if workdir is not None and (workdir / "checkpoints").is_dir() and (workdir / "config.json").is_file():
        name = json.loads((workdir / "config.json").read_text()).get("pixel_stats", LEGACY)
        if name != AUTO:
            return name, f"this workdir's checkpoints were trained with pixel_stats={name}"
    for key in ("resume", "init_from"):
        source = config.get(key, "")
        if source:
            name, why = stats_of_weights(source, depth)
            return name, f"{key}: {why}"
    return "imagenet_rgb", "no official Clover checkpoint (fresh initialisation)"


def resolve(config: ConfigDict, *, checkpoint: str | pathlib.Path = "",
            workdir: pathlib.Path | None = None) -> tuple[str, str]:
    """(concrete statistics name, one-line reason) of `config.pixel_stats` for a run reading its weights
    from `checkpoint` (evaluation) or, when that is empty, from `workdir`'s checkpoints / resume / init_from
    (training). A config without the key (saved before it existed) used "imagenet_rgb"."""
    name = config.get("pixel_stats", LEGACY)
    check(name)
    if name != AUTO:
        return name, "set in the config"
    if checkpoint:
        chosen, why = stats_of_weights(checkpoint)
        return chosen, f"auto: --checkpoint {why}"
    chosen, why = _from_sources(config, workdir, 0)
    return chosen, f"auto: {why}"


def describe(name: str, reason: str) -> str:
    """The line an entry point prints about its choice."""
    stats = PIXEL_STATS[name]
    return (f"pixel statistics {name} ({stats.channel_order.upper()} frames, mean {stats.mean}, std {stats.std}): "
            f"{reason}")
