"""Name maps from PyTorch checkpoints to our BERT, fusion encoder and heads: HF BERT (+ MLM head), official Clover.

Every `*_plan` builder returns a `Plan` ({our param path: (source key, transform)}) rooted at
`dst_prefix` (our module's path inside the whole model, e.g. "text_encoder" or "" for a bare
module), so a whole-model converter merges several plans and calls `assemble` once.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from clover_jax.convert.common import (
    ConversionReport,
    Plan,
    assemble,
    identity,
    linear_weight,
)
from clover_jax.convert.safetensors_io import load_safetensors
from clover_jax.models.bert import BertConfig, BertModel
from clover_jax.models.heads import MLMHead

# HF buffers that are not parameters.
HF_BERT_BUFFERS = ("embeddings.position_ids", "bert.embeddings.position_ids")
# The official fusion module carries a BERT embedding block that the pre-training path never calls.
CLOVER_FUSION_UNUSED = ("multimodal_backbone.bert_embedding.",)
CLOVER_TEXT_SRC = "text_backbone.bert."
CLOVER_FUSION_SRC = "multimodal_backbone."
HF_MLM_SRC = "cls.predictions."
HF_MLM_TIED_BIAS = "cls.predictions.decoder.bias"  # HF ties it to `cls.predictions.bias`
# Pre-2019 checkpoints (bert-base-uncased's own files among them) name LayerNorm parameters gamma/beta.
LEGACY_NORM_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _dense(plan: Plan, dst: str, src: str) -> None:
    """PyTorch Linear `src.{weight,bias}` -> our Dense `dst/{kernel,bias}`."""
    plan[f"{dst}/kernel"] = (f"{src}.weight", linear_weight)
    plan[f"{dst}/bias"] = (f"{src}.bias", identity)


def _norm(plan: Plan, dst: str, src: str) -> None:
    """PyTorch LayerNorm `src.{weight,bias}` -> our LayerNorm `dst/{scale,bias}`."""
    plan[f"{dst}/scale"] = (f"{src}.weight", identity)
    plan[f"{dst}/bias"] = (f"{src}.bias", identity)


def bert_layer_plan(dst_prefix: str, src_prefix: str) -> Plan:
    """One HF `BertLayer` at `src_prefix` (e.g. "encoder.layer.3.") onto our BertLayer at `dst_prefix`."""
    plan: Plan = {}
    for proj in ("query", "key", "value"):
        _dense(plan, _join(dst_prefix, f"attention/{proj}"), f"{src_prefix}attention.self.{proj}")
    _dense(plan, _join(dst_prefix, "attention/output/dense"), f"{src_prefix}attention.output.dense")
    _norm(plan, _join(dst_prefix, "attention/output/LayerNorm"), f"{src_prefix}attention.output.LayerNorm")
    _dense(plan, _join(dst_prefix, "intermediate/dense"), f"{src_prefix}intermediate.dense")
    _dense(plan, _join(dst_prefix, "output/dense"), f"{src_prefix}output.dense")
    _norm(plan, _join(dst_prefix, "output/LayerNorm"), f"{src_prefix}output.LayerNorm")
    return plan


def bert_encoder_plan(num_layers: int, dst_prefix: str, src_prefix: str) -> Plan:
    """HF `{src_prefix}layer.{i}.*` onto our BertEncoder `{dst_prefix}/layer_{i}` for i < num_layers."""
    plan: Plan = {}
    for i in range(num_layers):
        plan.update(bert_layer_plan(_join(dst_prefix, f"layer_{i}"), f"{src_prefix}layer.{i}."))
    return plan


def hf_bert_plan(
    config: BertConfig, dst_prefix: str, *, src_prefix: str = "", add_pooler: bool = True
) -> Plan:
    """HF `BertModel` names (`{src_prefix}embeddings.…`, `encoder.layer.N.…`, `pooler.dense`) -> BertModel.

    `src_prefix` is "" for a bare BertModel state dict (MiniLM's safetensors), "bert." for
    BertFor* checkpoints; `detect_hf_prefix` finds it.
    """
    plan: Plan = {}
    emb = _join(dst_prefix, "embeddings")
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        plan[f"{emb}/{table}/embedding"] = (f"{src_prefix}embeddings.{table}.weight", identity)
    _norm(plan, f"{emb}/LayerNorm", f"{src_prefix}embeddings.LayerNorm")
    plan.update(bert_encoder_plan(config.num_layers, _join(dst_prefix, "encoder"), f"{src_prefix}encoder."))
    if add_pooler:
        _dense(plan, _join(dst_prefix, "pooler/dense"), f"{src_prefix}pooler.dense")
    return plan


def canonical_hf_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict with legacy `LayerNorm.gamma` / `LayerNorm.beta` keys renamed `.weight` / `.bias`
    (what HF's loader does); other keys unchanged."""
    out = {}
    for key, value in state_dict.items():
        for old, new in LEGACY_NORM_NAMES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def detect_hf_prefix(state_dict: Mapping[str, np.ndarray]) -> str:
    """"bert." when the BERT lives under `bert.` (BertFor* checkpoints), "" for a bare BertModel."""
    if "bert.embeddings.word_embeddings.weight" in state_dict:
        return "bert."
    if "embeddings.word_embeddings.weight" in state_dict:
        return ""
    raise ValueError(
        "no BERT word embeddings found (looked for 'bert.embeddings.word_embeddings.weight' and "
        f"'embeddings.word_embeddings.weight'); first keys: {list(state_dict)[:5]}"
    )


def load_hf_bert_dir(path: str | os.PathLike) -> tuple[BertConfig, dict[str, np.ndarray]]:
    """Reads a HF BERT folder (`config.json` + `model.safetensors`) -> (BertConfig, state_dict)."""
    path = os.fspath(path)
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"{weights} not found: the folder must hold config.json and model.safetensors"
        )
    return BertConfig.from_hf_json(os.path.join(path, "config.json")), load_safetensors(weights)


def bert_param_shapes(config: BertConfig, *, add_pooler: bool) -> dict:
    """Abstract (ShapeDtypeStruct) params of BertModel, from jax.eval_shape (no memory used)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(BertModel(config, add_pooler=add_pooler).init, jax.random.key(0), ids, ids)
    return nn.unbox(abstract)["params"]


def convert_hf_bert(
    state_dict: Mapping[str, np.ndarray], config: BertConfig, *, add_pooler: bool = True
) -> tuple[dict, ConversionReport]:
    """HF BERT state dict (bare or `bert.`-prefixed) -> BertModel params, checked by name and shape."""
    state_dict = canonical_hf_names(state_dict)
    prefix = detect_hf_prefix(state_dict)
    plan = hf_bert_plan(config, "", src_prefix=prefix, add_pooler=add_pooler)
    ignore = HF_BERT_BUFFERS + (() if add_pooler else (f"{prefix}pooler.",)) + ("cls.",)
    return assemble(state_dict, plan, bert_param_shapes(config, add_pooler=add_pooler),
                    ignore_unexpected=ignore)


def fusion_from_bert_plan(num_layers: int, dst_prefix: str, *, src_prefix: str = "bert.") -> Plan:
    """The first `num_layers` layers of a HF BERT onto FusionEncoder `{dst_prefix}/encoder/layer_{i}`.

    This is how the official code initialises its fusion encoder (bert-base layers 0..2); the fusion
    module's own fc_in, position and token-type parameters stay at their fresh initialisation.
    """
    return bert_encoder_plan(num_layers, _join(dst_prefix, "encoder"), f"{src_prefix}encoder.")


# ---- official Clover checkpoint names ------------------------------------------------------------


def clover_text_encoder_plan(config: BertConfig, dst_prefix: str, *, add_pooler: bool = False) -> Plan:
    """`text_backbone.bert.*` onto our BertModel (its pooler only when our model has one)."""
    return hf_bert_plan(config, dst_prefix, src_prefix=CLOVER_TEXT_SRC, add_pooler=add_pooler)


def _spatial_pos(w: np.ndarray) -> np.ndarray:
    """vis_space_pos (1, 1, S, H) -> (S, H)."""
    return w.reshape(w.shape[2], w.shape[3])


def _temporal_pos(w: np.ndarray) -> np.ndarray:
    """vis_tempor_pos (1, T, 1, H) -> (T, H)."""
    return w.reshape(w.shape[1], w.shape[3])


def clover_fusion_plan(config: BertConfig, video_dim: int, dst_prefix: str, *, cls_token: bool = False) -> Plan:
    """`multimodal_backbone.*` onto our FusionEncoder (`bert_embedding.*` is unused: ignore it).

    The position parameters drop their singleton axes: vis_space_pos (1,1,S,H) -> spatial_pos (S,H),
    vis_tempor_pos (1,T,1,H) -> temporal_pos (T,H); with `cls_token`, all_cls_token (1,1,H) -> (H,).
    """
    src = CLOVER_FUSION_SRC
    plan: Plan = {}
    if video_dim != config.hidden_size:
        _dense(plan, _join(dst_prefix, "fc_in"), f"{src}fc_in")
    plan[_join(dst_prefix, "spatial_pos")] = (f"{src}vis_space_pos", _spatial_pos)
    plan[_join(dst_prefix, "temporal_pos")] = (f"{src}vis_tempor_pos", _temporal_pos)
    plan[_join(dst_prefix, "token_type_embeddings")] = (f"{src}token_type_embeddings.weight", identity)
    if cls_token:
        plan[_join(dst_prefix, "all_cls_token")] = (f"{src}all_cls_token", lambda w: w.reshape(w.shape[-1]))
    _norm(plan, _join(dst_prefix, "norm"), f"{src}norm")
    plan.update(bert_encoder_plan(config.num_layers, _join(dst_prefix, "encoder"), f"{src}bert_encoder."))
    return plan


def _ln_mlp_plan(dst_prefix: str, fc1: str, ln1: str, fc2: str, ln2: str) -> Plan:
    """Source Linear/LN/Linear/LN onto the fc1/ln1/fc2/ln2 of `heads._ln_mlp` (g_v and h_V)."""
    plan: Plan = {}
    _dense(plan, _join(dst_prefix, "fc1"), fc1)
    _norm(plan, _join(dst_prefix, "ln1"), ln1)
    _dense(plan, _join(dst_prefix, "fc2"), fc2)
    _norm(plan, _join(dst_prefix, "ln2"), ln2)
    return plan


def clover_video_projector_plan(dst_prefix: str) -> Plan:
    """`ssl_head.img_projector.{0: Linear, 1: LN, 3: Linear, 4: LN}` onto VideoProjector."""
    return _ln_mlp_plan(dst_prefix, *(f"ssl_head.img_projector.{i}" for i in (0, 1, 3, 4)))


def clover_text_projector_plan(dst_prefix: str) -> Plan:
    """`ssl_head.text_projector.{0: Linear, 2: Linear}` onto TextProjector."""
    plan: Plan = {}
    _dense(plan, _join(dst_prefix, "fc1"), "ssl_head.text_projector.0")
    _dense(plan, _join(dst_prefix, "fc2"), "ssl_head.text_projector.2")
    return plan


def clover_fused_video_head_plan(dst_prefix: str) -> Plan:
    """`mlm_ssl_V_head.{img_fc1, img_bn1, img_fc2, img_bn2}` (LayerNorms despite the name) -> FusedVideoHead."""
    return _ln_mlp_plan(dst_prefix, *(f"mlm_ssl_V_head.img_{n}" for n in ("fc1", "bn1", "fc2", "bn2")))


def clover_fused_text_head_plan(dst_prefix: str) -> Plan:
    """`mlm_ssl_T_head.{fc1, fc2}` onto FusedTextHead."""
    plan: Plan = {}
    _dense(plan, _join(dst_prefix, "fc1"), "mlm_ssl_T_head.fc1")
    _dense(plan, _join(dst_prefix, "fc2"), "mlm_ssl_T_head.fc2")
    return plan


def mlm_head_plan(dst_prefix: str, src_prefix: str, *, bias_key: str = "decoder.bias") -> Plan:
    """HF `BertLMPredictionHead` at `src_prefix` (e.g. "cls.predictions.") onto MLMHead.

    Official Clover stores the vocabulary bias as `decoder.bias`; HF BertForMaskedLM checkpoints hold
    it as `bias` and may omit the tied `decoder.weight`: `hf_mlm_head_plan` handles both.
    """
    plan: Plan = {}
    _dense(plan, _join(dst_prefix, "dense"), f"{src_prefix}transform.dense")
    _norm(plan, _join(dst_prefix, "LayerNorm"), f"{src_prefix}transform.LayerNorm")
    plan[_join(dst_prefix, "decoder/kernel")] = (f"{src_prefix}decoder.weight", linear_weight)
    plan[_join(dst_prefix, "decoder/bias")] = (f"{src_prefix}{bias_key}", identity)
    return plan


def clover_mlm_head_plan(dst_prefix: str) -> Plan:
    """`mlm_head.predictions.*` onto MLMHead (its decoder is untied, with its own bias)."""
    return mlm_head_plan(dst_prefix, "mlm_head.predictions.")


def has_hf_mlm_head(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Whether a HF checkpoint holds BERT's MLM head (`cls.predictions.transform.*`)."""
    return f"{HF_MLM_SRC}transform.dense.weight" in state_dict


def hf_mlm_head_plan(state_dict: Mapping[str, np.ndarray], dst_prefix: str) -> Plan:
    """HF BertForMaskedLM / BertForPreTraining `cls.predictions.*` onto MLMHead at `dst_prefix`.

    The vocabulary bias is `cls.predictions.bias` (HF ties `decoder.bias` to it; a file holding only
    `decoder.bias` gives that). A file without `decoder.weight` (tied to the word embeddings, so often not
    saved) gives the word-embedding matrix instead; either way our decoder is a copy, untied from the
    text encoder, as in the official head.
    """
    bias_key = "bias" if f"{HF_MLM_SRC}bias" in state_dict else "decoder.bias"
    plan = mlm_head_plan(dst_prefix, HF_MLM_SRC, bias_key=bias_key)
    if f"{HF_MLM_SRC}decoder.weight" not in state_dict:
        words = f"{detect_hf_prefix(state_dict)}embeddings.word_embeddings.weight"
        plan[_join(dst_prefix, "decoder/kernel")] = (words, linear_weight)
    return plan


def mlm_head_param_shapes(config: BertConfig) -> dict:
    """Abstract params of our MLMHead for a BERT of `config`."""
    head = MLMHead(config.vocab_size, layer_norm_eps=config.layer_norm_eps)
    abstract = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 1, config.hidden_size)))
    return nn.unbox(abstract)["params"]


def convert_hf_mlm_head(state_dict: Mapping[str, np.ndarray], config: BertConfig) -> tuple[dict, ConversionReport]:
    """HF `cls.predictions.*` -> MLMHead params (every one required). Only `cls.predictions.*` keys
    count as unused; HF's tied copy `decoder.bias` of the bias is not one."""
    state_dict = canonical_hf_names(state_dict)
    plan = hf_mlm_head_plan(state_dict, "")
    ignore = tuple(k for k in state_dict if not k.startswith(HF_MLM_SRC)) + (HF_MLM_TIED_BIAS,)
    return assemble(state_dict, plan, mlm_head_param_shapes(config), ignore_unexpected=ignore)
