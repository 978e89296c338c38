"""Clover's heads: contrastive projectors (g_v, g_t), fused heads (h_V, h_T), MLM and VideoQA heads.

Reference §1.4 and §5.2. Every Linear kernel is Xavier-uniform with a zero bias, as the official
heads' `init_weights`. LayerNorms are PyTorch's `nn.LayerNorm` default (eps 1e-5) except the MLM
head's, which is a copy of BERT's (eps 1e-12); the golden `clover_official_tiny` forward confirms both.
"""
from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from clover_jax.models.dropout import Dropout
from clover_jax.models.layers import LayerNorm, dense, gelu, layer_norm

Dtype = Any

XAVIER = nn.initializers.xavier_uniform()
TORCH_LN_EPS = 1e-5
BERT_LN_EPS = 1e-12


def _xavier_dense(
    features: int, axes: tuple[str | None, str | None], name: str, module: nn.Module
) -> nn.Dense:
    return dense(features, axes, name=name, dtype=module.dtype, param_dtype=module.param_dtype,
                 kernel_init=XAVIER)


def _norm(name: str, eps: float, axis: str | None, module: nn.Module) -> LayerNorm:
    return layer_norm(name=name, eps=eps, axis=axis, param_dtype=module.param_dtype)


def _ln_mlp(module: nn.Module, x: jnp.ndarray, hidden: int, out: int, eps: float) -> jnp.ndarray:
    """fc1 -> ln1 -> GELU -> fc2 -> ln2 inside `module` (the shape of g_v and of h_V)."""
    x = _xavier_dense(hidden, ("embed", "mlp"), "fc1", module)(x)
    x = gelu(_norm("ln1", eps, "mlp", module)(x)).astype(module.dtype)
    x = _xavier_dense(out, ("mlp", "embed"), "fc2", module)(x)
    return _norm("ln2", eps, "embed", module)(x).astype(module.dtype)


class VideoProjector(nn.Module):
    """g_v: mean of the Swin output over (T, H, W) -> Linear 2E -> LN -> GELU -> Linear E -> LN.

    Input (B, T, H, W, C) channels-last; output (B, embed_dim). Official `ssl_head.img_projector`.
    """

    embed_dim: int
    hidden_dim: int | None = None  # default 2 * embed_dim
    dropout_rate: float = 0.0  # the official head's pre-projector dropout; 0 in pre-training
    layer_norm_eps: float = TORCH_LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, video: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        if video.ndim != 5:
            raise ValueError(f"VideoProjector wants the Swin output (B, T, H, W, C), got shape {video.shape}")
        x = jnp.mean(video.astype(jnp.float32), axis=(1, 2, 3))
        x = Dropout(self.dropout_rate)(x, deterministic=deterministic).astype(self.dtype)
        return _ln_mlp(self, x, self.hidden_dim or 2 * self.embed_dim, self.embed_dim, self.layer_norm_eps)


class TextProjector(nn.Module):
    """g_t: text [CLS] state -> Linear H -> GELU -> Linear E (no normalisation).

    Input: the text encoder's hidden states (B, L, H), of which it takes position 0 (`text_agg_type
    ='cls'`); output (B, embed_dim). Official `ssl_head.text_projector`.
    """

    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text_states: jnp.ndarray) -> jnp.ndarray:
        if text_states.ndim != 3:
            raise ValueError(
                f"TextProjector wants text hidden states (B, L, H), got shape {text_states.shape}"
            )
        cls = text_states[:, 0].astype(self.dtype)
        x = gelu(_xavier_dense(cls.shape[-1], ("embed", "mlp"), "fc1", self)(cls))
        return _xavier_dense(self.embed_dim, ("mlp", "embed"), "fc2", self)(x)


class FusedVideoHead(nn.Module):
    """h_V: Linear 2E -> LN -> GELU -> Linear E -> LN on the output of Fuse(V^m, T).

    `input_kind` settles the released code's ambiguity (reference §1.4):
      "text_cls"          input (B, H): the fused text-[CLS] vector. Our default, because this is
                          what the official recognizer actually passes to the head.
      "video_token_mean"  input (B, N, H): the fused video tokens, averaged over N here, which is what
                          the head's own `mean(dim=1)` and shape comment expect.
    Official `mlm_ssl_V_head` (img_fc1, img_bn1, img_fc2, img_bn2).
    """

    embed_dim: int
    hidden_dim: int | None = None  # default 2 * embed_dim
    input_kind: Literal["text_cls", "video_token_mean"] = "text_cls"
    dropout_rate: float = 0.0
    layer_norm_eps: float = TORCH_LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        if self.input_kind == "text_cls":
            if x.ndim != 2:
                raise ValueError(f"FusedVideoHead(input_kind='text_cls') wants (B, H), got shape {x.shape}")
        elif self.input_kind == "video_token_mean":
            if x.ndim != 3:
                raise ValueError(
                    f"FusedVideoHead(input_kind='video_token_mean') wants fused video tokens (B, N, H), "
                    f"got shape {x.shape}"
                )
            x = jnp.mean(x.astype(jnp.float32), axis=1)
        else:
            raise ValueError(
                f"FusedVideoHead.input_kind={self.input_kind!r}; use 'text_cls' or 'video_token_mean'"
            )
        x = Dropout(self.dropout_rate)(x, deterministic=deterministic).astype(self.dtype)
        return _ln_mlp(self, x, self.hidden_dim or 2 * self.embed_dim, self.embed_dim, self.layer_norm_eps)


class FusedTextHead(nn.Module):
    """h_T: Linear H -> GELU -> Dropout -> Linear E on the fused text-[CLS] of Fuse(V, T^m).

    Input (B, H); output (B, embed_dim). Official `mlm_ssl_T_head` (fc1, fc2).
    """

    embed_dim: int
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        if x.ndim != 2:
            raise ValueError(f"FusedTextHead wants the fused [CLS] vector (B, H), got shape {x.shape}")
        x = x.astype(self.dtype)
        x = gelu(_xavier_dense(x.shape[-1], ("embed", "mlp"), "fc1", self)(x))
        x = Dropout(self.dropout_rate)(x, deterministic=deterministic)
        return _xavier_dense(self.embed_dim, ("mlp", "embed"), "fc2", self)(x)


class MLMHead(nn.Module):
    """BERT prediction head: dense -> GELU -> LN (eps 1e-12) -> decoder to the vocabulary (+ bias).

    Not tied to any embedding table (the official head is a copy of a separate BertForMaskedLM);
    `clover_jax.convert` fills it from a HF checkpoint's `cls.predictions.*`, else it starts Xavier.
    Input (..., H); output logits (..., vocab_size) in `dtype` (cast to float32 for the loss).
    """

    vocab_size: int
    layer_norm_eps: float = BERT_LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.astype(self.dtype)
        x = gelu(_xavier_dense(x.shape[-1], ("embed", None), "dense", self)(x))
        x = _norm("LayerNorm", self.layer_norm_eps, "embed", self)(x).astype(self.dtype)
        return _xavier_dense(self.vocab_size, ("embed", "vocab"), "decoder", self)(x)


class OpenEndedQAHead(nn.Module):
    """Open-ended VideoQA classifier: Dropout -> Linear H/2 -> LN -> GELU -> Linear num_answers.

    Input (B, H) (fused [CLS], or the fused state at [MASK] for LSMDC-FiB); output (B, num_answers).
    """

    num_answers: int
    dropout_rate: float = 0.5
    layer_norm_eps: float = TORCH_LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        hidden = x.shape[-1]
        if hidden % 2:
            raise ValueError(f"OpenEndedQAHead needs an even input width, got {hidden}")
        x = Dropout(self.dropout_rate)(x.astype(self.dtype), deterministic=deterministic)
        x = _xavier_dense(hidden // 2, ("embed", "mlp"), "fc1", self)(x)
        x = gelu(_norm("ln", self.layer_norm_eps, "mlp", self)(x)).astype(self.dtype)
        return _xavier_dense(self.num_answers, ("mlp", "classes"), "fc2", self)(x)


class MultipleChoiceHead(nn.Module):
    """Multiple-choice VideoQA scorer: Dropout -> Linear 256 -> LN -> GELU -> Linear 1.

    Input (..., H), one row per (question, option) pair; output one score per row, shape (...,).
    Softmax the scores over each question's options.
    """

    hidden_dim: int = 256
    dropout_rate: float = 0.5
    layer_norm_eps: float = TORCH_LN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        x = Dropout(self.dropout_rate)(x.astype(self.dtype), deterministic=deterministic)
        x = _xavier_dense(self.hidden_dim, ("embed", "mlp"), "fc1", self)(x)
        x = gelu(_norm("ln", self.layer_norm_eps, "mlp", self)(x)).astype(self.dtype)
        return _xavier_dense(1, ("mlp", None), "fc2", self)(x)[..., 0]
