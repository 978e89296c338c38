"""BERT text encoder (Hugging Face `BertModel`-equivalent, post-LN, exact GELU) in flax.linen.

Parameter names mirror HF so the converter in `clover_jax/convert/bert.py` is a plain name map:
`embeddings/{word,position,token_type}_embeddings/embedding`, `embeddings/LayerNorm`,
`encoder/layer_{i}/attention/{query,key,value}`, `.../attention/output/{dense,LayerNorm}`,
`.../intermediate/dense`, `.../output/{dense,LayerNorm}`, `pooler/dense`.

Precision: matmuls run in `dtype` (e.g. bfloat16); attention softmax and LayerNorm statistics run in
float32; parameters are stored in `param_dtype`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from clover_jax.models.dropout import Dropout
from clover_jax.models.layers import dense, gelu, layer_norm, maybe_remat

Dtype = Any

# Additive bias for masked keys. HF (and the official Clover) use -10000; any value far below the
# logits gives the same softmax. -1e9 is exactly representable in float32 and bfloat16 alike and,
# unlike finfo.min, cannot overflow to -inf when added to a logit.
MASK_BIAS = -1e9


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02  # std of the (truncated) normal init of embeddings and kernels, as HF

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick a head count that divides the hidden width"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BertConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_json(cls, path: str | os.PathLike) -> "BertConfig":
        """Reads a Hugging Face BERT `config.json` (file or the folder holding it)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            hf = json.load(f)
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"{path}: hidden_act={act!r}; only exact 'gelu' BERTs are supported")
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"{path}: position_embedding_type={pos_type!r}; only 'absolute' is supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
        )


BERT_SIZES: dict[str, BertConfig] = {
    # The 2-layer random BERT of shared/golden/bert/tiny_random_config.json (dropouts 0 as there).
    "tiny": BertConfig(
        vocab_size=30522, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased).
    "MiniLM-L6-H384": BertConfig(
        vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
    ),
    # bert-base-uncased: Clover's text encoder (and, cut to 3 layers, its fusion encoder).
    "base": BertConfig(
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
    ),
}


def bert_config(name: str, **overrides: Any) -> BertConfig:
    """A named size from BERT_SIZES with fields replaced by `overrides` (e.g. num_layers=3)."""
    if name not in BERT_SIZES:
        raise ValueError(f"unknown BERT size {name!r}; valid names: {sorted(BERT_SIZES)}")
    valid = {f.name for f in dataclasses.fields(BertConfig)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(f"unknown BertConfig fields {bad}; valid fields: {sorted(valid)}")
    return dataclasses.replace(BERT_SIZES[name], **overrides)


def kernel_init(config: BertConfig):
    """Truncated-normal kernel init with the config's initializer_range (HF BERT: 0.02 at every width)."""
    return nn.initializers.truncated_normal(stddev=config.initializer_range)


def attention_bias(attention_mask: jnp.ndarray) -> jnp.ndarray:
    """(B, L) mask of 1 (attend) / 0 (padding) -> (B, 1, 1, L) float32 additive bias."""
    keep = attention_mask.astype(jnp.float32)
    return ((1.0 - keep) * MASK_BIAS)[:, None, None, :]


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type embeddings, LayerNorm, dropout."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _embed(self, num: int, axes: tuple[str | None, str | None], name: str) -> nn.Embed:
        return nn.Embed(
            num, self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(self.config.initializer_range), axes),
            name=name,
        )

    @nn.compact
    def __call__(
        self, input_ids: jnp.ndarray, token_type_ids: jnp.ndarray, *, deterministic: bool = True
    ) -> jnp.ndarray:
        cfg = self.config
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings {cfg.max_position_embeddings}; "
                "truncate the text or use a config with more positions"
            )
        words = self._embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        positions = self._embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(
            jnp.arange(length)[None, :]
        )
        types = self._embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        x = words.astype(jnp.float32) + positions.astype(jnp.float32) + types.astype(jnp.float32)
        x = layer_norm(name="LayerNorm", eps=cfg.layer_norm_eps, param_dtype=self.param_dtype)(x)
        x = Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        return x.astype(self.dtype)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): HF's BertSelfOutput and BertOutput."""

    config: BertConfig
    axes: tuple[str | None, str | None]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, residual: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        cfg = self.config
        y = dense(cfg.hidden_size, self.axes, name="dense", dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=kernel_init(cfg))(x)
        y = Dropout(cfg.hidden_dropout)(y, deterministic=deterministic)
        y = layer_norm(name="LayerNorm", eps=cfg.layer_norm_eps, param_dtype=self.param_dtype)(
            y.astype(jnp.float32) + residual.astype(jnp.float32)
        )
        return y.astype(self.dtype)


class BertAttention(nn.Module):
    """Multi-head self-attention with an additive key bias, then the residual output block."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, bias: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
        cfg = self.config
        batch, length, _ = x.shape

        def project(name: str) -> jnp.ndarray:
            y = dense(cfg.hidden_size, ("embed", "heads"), name=name, dtype=self.dtype, kernel_init=kernel_init(cfg),
                      param_dtype=self.param_dtype)(x)
            return y.reshape(batch, length, cfg.num_heads, cfg.head_dim)

        query, key, value = project("query"), project("key"), project("value")
        query = query / jnp.asarray(math.sqrt(cfg.head_dim), query.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) + bias
        probs = Dropout(cfg.attention_dropout)(
            nn.softmax(logits, axis=-1), deterministic=deterministic
        ).astype(self.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, value).reshape(batch, length, cfg.hidden_size)
        return BertResidualOutput(cfg, ("heads", "embed"), self.dtype, self.param_dtype, name="output")(
            context, x, deterministic
        )


class BertIntermediate(nn.Module):
    """dense hidden -> intermediate, exact GELU."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = dense(self.config.intermediate_size, ("embed", "mlp"), name="dense", dtype=self.dtype,
                  kernel_init=kernel_init(self.config),
                  param_dtype=self.param_dtype)(x)
        return gelu(y)


class BertLayer(nn.Module):
    """One post-LN transformer layer, numerically equivalent to HF's BertLayer."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, bias: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attended = BertAttention(self.config, name="attention", **kw)(x, bias, deterministic)
        inner = BertIntermediate(self.config, name="intermediate", **kw)(attended)
        return BertResidualOutput(self.config, ("mlp", "embed"), name="output", **kw)(
            inner, attended, deterministic
        )


class BertEncoder(nn.Module):
    """Stack of `layer_{i}` BertLayers over embedded tokens with a (B, L) 0/1 attention mask."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = "none"  # a `layers.REMAT_POLICIES` name for each layer's backward pass

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, attention_mask: jnp.ndarray, *, deterministic: bool = True
    ) -> jnp.ndarray:
        if attention_mask.shape != x.shape[:2]:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} does not match the tokens' (B, L) "
                f"{x.shape[:2]}"
            )
        bias = attention_bias(attention_mask)
        # static_argnums counts `self` as 0: (x=1, bias=2, deterministic=3).
        layer_cls = maybe_remat(BertLayer, self.remat, static_argnums=(3,))
        for i in range(self.config.num_layers):
            x = layer_cls(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(
                x, bias, deterministic
            )
        return x


class BertPooler(nn.Module):
    """tanh(dense(hidden state of the first token)), as HF's BertPooler."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states: jnp.ndarray) -> jnp.ndarray:
        first = hidden_states[:, 0]
        y = dense(self.config.hidden_size, ("embed", None), name="dense", dtype=self.dtype,
                  kernel_init=kernel_init(self.config),
                  param_dtype=self.param_dtype)(first)
        return jnp.tanh(y)

class BertModel(nn.Module):
    """BERT text encoder: returns last_hidden_state (B, L, H), plus the pooler output when add_pooler."""

    config: BertConfig
    add_pooler: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = "none"

    @nn.compact
    def __call__(
        self,
        input_ids: jnp.ndarray,
        attention_mask: jnp.ndarray,
        token_type_ids: jnp.ndarray | None = None,
        *,
        deterministic: bool = True,
    ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = BertEmbeddings(self.config, name="embeddings", **kw)(
            input_ids, token_type_ids, deterministic=deterministic
        )
        x = BertEncoder(self.config, remat=self.remat, name="encoder", **kw)(
            x, attention_mask, deterministic=deterministic
        )
        if not self.add_pooler:
            return x
        return x, BertPooler(self.config, name="pooler", **kw)(x)

