"""Whole-model import: official Clover checkpoints, and Clover initialised from public Swin3D/BERT weights.

`import_official_clover` maps every key of an official pre-training checkpoint (`backbone.*`,
`text_backbone.bert.*`, `multimodal_backbone.*`, `ssl_head.*`, `mlm_head.*`, `mlm_ssl_{V,T}_head.*`)
onto our `Clover` parameters. `import_pretrained_parts` builds the partial tree the paper starts from:
Video Swin (torchvision or official names) for the video encoder, a HF BERT for the text encoder, its
first k layers for the fusion encoder and its MLM head (`cls.predictions.*`, when present) for ours;
everything else stays at its fresh initialisation.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from clover_jax.convert import bert as bert_convert
from clover_jax.convert import swin3d as swin_convert
from clover_jax.convert.common import ConversionReport, Plan, assemble, flatten
from clover_jax.models.clover import CloverConfig

OFFICIAL_UNUSED = ("multimodal_backbone.bert_embedding.",)


def _under(prefix: str, plan: Plan) -> Plan:
    return {f"{prefix}/{dst}": src for dst, src in plan.items()}


def official_clover_plan(config: CloverConfig) -> Plan:
    """{our path: (official key, transform)} for every parameter of the pre-training model."""
    plan: Plan = {}
    plan.update(_under("video_encoder", swin_convert.official_plan(config.video, prefix="backbone.")))
    plan.update(bert_convert.clover_text_encoder_plan(config.text, "text_encoder"))
    plan.update(bert_convert.clover_fusion_plan(config.fusion_config, config.video.out_dim, "fusion",
                                                cls_token=config.fusion_cls_token))
    plan.update(bert_convert.clover_video_projector_plan("video_proj"))
    plan.update(bert_convert.clover_text_projector_plan("text_proj"))
    plan.update(bert_convert.clover_fused_video_head_plan("h_v"))
    plan.update(bert_convert.clover_fused_text_head_plan("h_t"))
    plan.update(bert_convert.clover_mlm_head_plan("mlm_head"))
    return plan


def import_official_clover(
    state_dict: Mapping[str, np.ndarray], config: CloverConfig, target: Mapping[str, Any], *, strict: bool = True
) -> tuple[dict[str, Any], ConversionReport]:
    """Official Clover state dict -> our params (QA heads, absent from pre-training checkpoints, are
    reported missing; pass strict=False to keep them at their initialisation)."""
    ignore = tuple(swin_convert.ignored_keys(config.video, "official", "backbone.")) + OFFICIAL_UNUSED + (
        "text_backbone.bert.pooler.", "text_backbone.bert.embeddings.position_ids",
    )
    return assemble(state_dict, official_clover_plan(config), target, ignore_unexpected=ignore, strict=strict)


def import_pretrained_parts(
    config: CloverConfig,
    target: Mapping[str, Any],
    *,
    video_state_dict: Mapping[str, np.ndarray] | None = None,
    video_source: str = "torchvision",
    bert_state_dict: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, Any], ConversionReport]:
    """Partial params from public weights: Swin3D -> video_encoder; BERT -> text_encoder, its first
    `fusion_layers` layers -> fusion encoder and, when the checkpoint holds `cls.predictions.*`
    (BertForMaskedLM / BertForPreTraining files such as bert-base-uncased's), its MLM head -> mlm_head.
    Missing entries are what stays freshly initialised."""
    state: dict[str, np.ndarray] = {}
    plan: Plan = {}
    ignore: list[str] = []
    if video_state_dict is not None:
        prefix = "backbone." if video_source == "official" else ""
        video_plan = (swin_convert.official_plan(config.video, prefix) if video_source == "official"
                      else swin_convert.torchvision_plan(config.video, prefix))
        tagged = {f"video::{k}": v for k, v in video_state_dict.items()}
        state.update(tagged)
        plan.update({f"video_encoder/{d}": (f"video::{s}", t) for d, (s, t) in video_plan.items()})
        ignore += [f"video::{k}" for k in swin_convert.ignored_keys(config.video, video_source, prefix)]
    if bert_state_dict is not None:
        bert_state_dict = bert_convert.canonical_hf_names(bert_state_dict)
        prefix = bert_convert.detect_hf_prefix(bert_state_dict)
        tagged = {f"text::{k}": v for k, v in bert_state_dict.items()}
        state.update(tagged)
        text_plan = bert_convert.hf_bert_plan(config.text, "text_encoder", src_prefix=prefix, add_pooler=False)
        fusion_plan = bert_convert.fusion_from_bert_plan(config.fusion_layers, "fusion", src_prefix=prefix)
        head_plan = (bert_convert.hf_mlm_head_plan(bert_state_dict, "mlm_head")
                     if bert_convert.has_hf_mlm_head(bert_state_dict) else {})
        for d, (s, t) in {**text_plan, **fusion_plan, **head_plan}.items():
            plan[d] = (f"text::{s}", t)
        ignore += ["text::"]  # the BERT's pooler, NSP head and buffers are not ours
    if not state:
        raise ValueError("import_pretrained_parts: give video_state_dict and/or bert_state_dict")
    params, report = assemble(state, plan, target, ignore_unexpected=tuple(ignore), strict=False)
    return params, report


def merge_params(fresh: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
    """`fresh` params with every leaf present in `loaded` replaced (shapes were checked by `assemble`)."""
    from clover_jax.convert.common import unflatten

    flat = flatten(fresh)
    for path, value in flatten(loaded).items():
        if path not in flat:
            raise KeyError(f"loaded parameter {path!r} does not exist in the model")
        flat[path] = value
    return unflatten(flat)
