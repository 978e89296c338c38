"""Glue from the run config (`config.data`, `config.eval`) to `data_pipelines`: dataset folders, input configs.

A dataset entry is either "synthetic" (the built-in procedural dataset, generated and built on first
use under `config.data.cache_dir`) or the folder printed by `python -m data_pipelines.prepare`.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any

from data_pipelines.input_pipeline import InputConfig, MixtureConfig, MixtureSource
from data_pipelines.text_masking import TextMaskingConfig
from data_pipelines.video_masking import BlockMaskConfig

SYNTHETIC = "synthetic"


def cache_dir(data_cfg: Any) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(data_cfg.cache_dir or "~/.cache/clover_jax")).absolute()


def resolve_dataset(name_or_folder: str, data_cfg: Any) -> str:
    """Dataset folder for a config entry; builds the synthetic dataset on first use."""
    if not name_or_folder:
        raise ValueError("no dataset given: set --config.data.dataset (a prepared folder or 'synthetic')")
    if name_or_folder == SYNTHETIC:
        from data_pipelines.synthetic import SyntheticConfig, build_synthetic

        syn = data_cfg.synthetic
        cfg = SyntheticConfig(seed=syn.seed, num_train=syn.num_train, num_test=syn.num_test,
                              num_frames=syn.num_frames, size=syn.size, captions_per_clip=syn.captions_per_clip)
        import jax

        # One process builds; multi-host runs need a shared cache_dir (the others wait at the barrier).
        folder = build_synthetic(cache_dir(data_cfg), cfg) if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("synthetic dataset built")
            folder = build_synthetic(cache_dir(data_cfg), cfg)  # cached: only looks the folder up
        return str(folder)
    folder = pathlib.Path(os.path.expanduser(name_or_folder))
    if not folder.exists():
        raise FileNotFoundError(
            f"dataset folder {folder} does not exist: prepare it with `python -m data_pipelines.prepare` "
            "and pass the folder it prints")
    return str(folder)


def _block_mask(data_cfg: Any) -> BlockMaskConfig:
    return BlockMaskConfig(grid=data_cfg.mask_grid, num_masked=data_cfg.mask_cells,
                           min_block=data_cfg.mask_min_block)


def train_input(data_cfg: Any, dataset: str, *, num_frames: int | None = None, seed_offset: int = 0) -> InputConfig:
    """InputConfig of the training stream of `dataset` (a resolved folder)."""
    return InputConfig(
        dataset=dataset, split=data_cfg.split, batch_size=data_cfg.batch_size,
        num_frames=num_frames or data_cfg.num_frames, image_size=data_cfg.image_size,
        crop_area=tuple(data_cfg.crop_area), flip_prob=data_cfg.flip_prob, mask=_block_mask(data_cfg),
        text=TextMaskingConfig(max_length=data_cfg.text_length, mode=data_cfg.text_masking),
        seed=data_cfg.seed + seed_offset, prefetch=data_cfg.prefetch,
    )


def eval_input(eval_cfg: Any, data_cfg: Any, dataset: str) -> InputConfig:
    """InputConfig of an evaluation pass (uniform frames, centre crop, no masking)."""
    return InputConfig(
        dataset=dataset, split=eval_cfg.split, batch_size=eval_cfg.batch_size, num_frames=eval_cfg.num_frames,
        image_size=eval_cfg.image_size, mask=_block_mask(data_cfg),
        text=TextMaskingConfig(max_length=eval_cfg.text_length, mode="none"), seed=data_cfg.seed, shuffle=False,
    )


def train_mixture(data_cfg: Any) -> MixtureConfig:
    """The training sources as a mixture (one source is a mixture of one). Each source entry of
    `config.data.sources` is {dataset, weight, num_frames (0 = data.num_frames)}."""
    sources = []
    for i, (name, src) in enumerate(sorted(data_cfg.sources.items())):
        folder = resolve_dataset(src.dataset, data_cfg)
        sources.append(MixtureSource(name, train_input(data_cfg, folder, num_frames=src.num_frames or None,
                                                       seed_offset=i), src.weight))
    if not sources:
        raise ValueError("config.data.sources is empty: name at least one training dataset")
    return MixtureConfig(tuple(sources), mode=data_cfg.mixture_mode, seed=data_cfg.seed)
