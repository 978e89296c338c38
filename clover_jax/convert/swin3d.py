"""Swin3D checkpoint converters: torchvision `SwinTransformer3d` and official Video Swin / Clover names.

Each `*_plan` maps our param paths (see `clover_jax.models.swin3d`) to source keys and layout
transforms; `load_swin3d` runs the plan through `clover_jax.convert.common.assemble`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np

from clover_jax.convert.common import (
    ConversionReport,
    Plan,
    assemble,
    conv3d_weight,
    identity,
    linear_weight,
)
from clover_jax.models.swin3d import Swin3DConfig, abstract_params

SOURCES = ("torchvision", "official")


def mask_token_weight(w: np.ndarray) -> np.ndarray:
    """Official mask token (1, C, 1, 1, 1) -> (C,)."""
    return w.reshape(-1)


def _norm(plan: Plan, dst: str, src: str) -> None:
    plan[f"{dst}/scale"] = (f"{src}.weight", identity)
    plan[f"{dst}/bias"] = (f"{src}.bias", identity)


def _linear(plan: Plan, dst: str, src: str, bias: bool = True) -> None:
    plan[f"{dst}/kernel"] = (f"{src}.weight", linear_weight)
    if bias:
        plan[f"{dst}/bias"] = (f"{src}.bias", identity)


def _shared_plan(
    config: Swin3DConfig,
    prefix: str,
    block_src: Callable[[int, int], str],
    downsample_src: Callable[[int], str],
    mlp_src: tuple[str, str],
) -> Plan:
    """Name map common to both sources; the callables give the source module names of block (i, j) and
    of stage i's PatchMerging, `mlp_src` the names of the two MLP linears."""
    plan: Plan = {
        "patch_embed/proj/kernel": (f"{prefix}patch_embed.proj.weight", conv3d_weight),
        "patch_embed/proj/bias": (f"{prefix}patch_embed.proj.bias", identity),
    }
    _norm(plan, "patch_embed/norm", f"{prefix}patch_embed.norm")
    for i, depth in enumerate(config.depths):
        for j in range(depth):
            dst, src = f"layers_{i}/blocks_{j}", prefix + block_src(i, j)
            _norm(plan, f"{dst}/norm1", f"{src}.norm1")
            _linear(plan, f"{dst}/attn/qkv", f"{src}.attn.qkv")
            _linear(plan, f"{dst}/attn/proj", f"{src}.attn.proj")
            plan[f"{dst}/attn/relative_position_bias_table"] = (f"{src}.attn.relative_position_bias_table", identity)
            _norm(plan, f"{dst}/norm2", f"{src}.norm2")
            _linear(plan, f"{dst}/mlp/fc1", f"{src}.mlp.{mlp_src[0]}")
            _linear(plan, f"{dst}/mlp/fc2", f"{src}.mlp.{mlp_src[1]}")
        if i < config.num_stages - 1:
            src = prefix + downsample_src(i)
            _norm(plan, f"layers_{i}/downsample/norm", f"{src}.norm")
            _linear(plan, f"layers_{i}/downsample/reduction", f"{src}.reduction", bias=False)
    _norm(plan, "norm", f"{prefix}norm")
    return plan


def _relative_index_keys(config: Swin3DConfig, prefix: str, block_src: Callable[[int, int], str]) -> list[str]:
    """The `relative_position_index` buffers: derived from the window size, never loaded."""
    return [
        f"{prefix}{block_src(i, j)}.attn.relative_position_index"
        for i, depth in enumerate(config.depths)
        for j in range(depth)
    ]


def _torchvision_block(i: int, j: int) -> str:
    return f"features.{2 * i}.{j}"


def _torchvision_downsample(i: int) -> str:
    return f"features.{2 * i + 1}"


def _official_block(i: int, j: int) -> str:
    return f"layers.{i}.blocks.{j}"


def _official_downsample(i: int) -> str:
    return f"layers.{i}.downsample"


def _reroot(plan: Plan, root: str) -> Plan:
    """Prefixes our param paths with `root` ("video_encoder" -> "video_encoder/patch_embed/...")."""
    return {f"{root}/{dst}": entry for dst, entry in plan.items()} if root else plan


def torchvision_plan(config: Swin3DConfig, prefix: str = "", root: str = "") -> Plan:
    """torchvision names: blocks `features.{2i}.{j}`, PatchMerging `features.{2i+1}`, MLP `mlp.0` / `mlp.3`.

    torchvision has no mask token, so with `config.use_mask_token` our `mask_token` stays unplanned
    (reported missing; see `load_swin3d(strict=False)`). `root` places our params under a sub-tree.
    """
    return _reroot(_shared_plan(config, prefix, _torchvision_block, _torchvision_downsample, ("0", "3")), root)


def official_plan(config: Swin3DConfig, prefix: str = "backbone.", root: str = "") -> Plan:
    """Official Video Swin / Clover names: `{prefix}layers.N.blocks.M…`, `{prefix}layers.N.downsample…`,
    MLP `fc1` / `fc2`, and `{prefix}mask_token` (1, C, 1, 1, 1) when the config has a mask token.
    `root` places our params under a sub-tree of a larger model (e.g. the whole Clover network)."""
    plan = _shared_plan(config, prefix, _official_block, _official_downsample, ("fc1", "fc2"))
    if config.use_mask_token:
        plan["mask_token"] = (f"{prefix}mask_token", mask_token_weight)
    return _reroot(plan, root)


def ignored_keys(config: Swin3DConfig, source: str, prefix: str) -> list[str]:
    """Source keys known not to be parameters of ours (index buffers; torchvision's classifier head)."""
    if source == "torchvision":
        return _relative_index_keys(config, prefix, _torchvision_block) + [f"{prefix}head."]
    return _relative_index_keys(config, prefix, _official_block)


def load_swin3d(
    state_dict: Mapping[str, np.ndarray],
    config: Swin3DConfig,
    target: Mapping[str, Any] | None = None,
    source: str = "torchvision",
    prefix: str | None = None,
    *,
    strict: bool = True,
) -> tuple[dict[str, Any], ConversionReport]:
    """Converts a PyTorch Swin3D state dict (numpy arrays) into our param tree.

    `target`: our (unboxed or eval_shape'd) params used for shape checks; None derives it from `config`.
    `prefix` defaults to "" for torchvision and "backbone." for official checkpoints. With `strict=False`
    the params the checkpoint lacks (e.g. a fresh mask token) are listed in `report.missing` and left out
    of the returned tree, for the caller to merge over its initialised params.
    Raises CheckpointMismatchError on a wrongly shaped tensor or, when strict, on missing params.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source '{source}'; valid: {SOURCES}")
    if prefix is None:
        prefix = "" if source == "torchvision" else "backbone."
    target = abstract_params(config) if target is None else nn.meta.unbox(target)
    plan = torchvision_plan(config, prefix) if source == "torchvision" else official_plan(config, prefix)
    return assemble(state_dict, plan, target, ignore_unexpected=ignored_keys(config, source, prefix), strict=strict)
