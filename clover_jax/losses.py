"""Clover's losses as pure functions of global-batch arrays (fp32 or fp64 math, never lower).

Every contrastive function takes GLOBAL-batch embeddings. Inside `jax.jit` on batch-sharded arrays the
plain `a @ b.T` below makes XLA gather what it needs (jax-anchors §5/§11.3); there is no hand-written
all_gather. The reference (clover-reference.md §2) all-gathers too, so its means are over the global
batch; the only difference is the gradient scale, see `contrastive_grad_factor`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from clover_jax.defaults import TEMPERATURE, TERM_NAMES, default_loss_config
from clover_jax.models.clover import PRETRAIN_OUTPUTS

Array = jax.Array

# The reference excludes the anchor's other positives with a finite trick, s - (s + 1e4), not -inf.
_EXCLUSION_OFFSET = 1e4

CONTRASTIVE_TERMS = TERM_NAMES[1:]
GRAD_SCALES = ("global", "reference", "official")
EMBEDDING_KEYS = PRETRAIN_OUTPUTS[:-1]  # the (B, D) outputs the contrastive terms read


def _float(x: Array) -> Array:
    """Promotes to at least float32 (keeps float64 when x64 is on and the input is float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: Array, eps: float = 1e-8) -> Array:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize semantics)."""
    x = _float(x)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def cosine_logits(a: Array, b: Array, temperature: float = TEMPERATURE, eps: float = 1e-8) -> Array:
    """(Na, Nb) cosine similarities divided by `temperature`; row i is a_i against every b_j."""
    return l2_normalize(a, eps) @ l2_normalize(b, eps).T / temperature


def _diag_log_softmax(logits: Array, axis: int) -> Array:
    """log softmax(logits, axis) read on the diagonal (positives are the matching indices)."""
    return jnp.diagonal(jax.nn.log_softmax(logits, axis=axis))


def tri_modal_exclusive_nce(
    anchor: Array,
    full: Array,
    masked: Array,
    fused: Array,
    *,
    temperature: float = TEMPERATURE,
    margin: float = 5.0,
) -> tuple[Array, Array]:
    """Tri-modal exclusive NCE and pair-wise ranking loss of one reference call (§2.2).

    All inputs are (B, D) global-batch embeddings; row i of each candidate set is anchor i's positive.
    Returns (nce, rank):
      nce  = L_a2c + L_c2a, where L_a2c sums over the three positive types P the mean over anchors of
             -log softmax(3B-wide row [S^full_i, S^masked_i, S^fused_i])[P's diagonal], with the other two
             types' diagonal entries replaced by s - (s + 1e4) (about -1e4, zero gradient, as the reference
             does), and L_c2a averages over P the column InfoNCE (candidate j retrieves anchor j).
      rank = mean_i max(0, margin - (S^full_ii - S^masked_ii)), margin in logit units (cosine/τ).
    """
    batch = anchor.shape[0]
    for name, x in (("full", full), ("masked", masked), ("fused", fused)):
        if x.shape != anchor.shape:
            raise ValueError(f"tri_modal_exclusive_nce: {name} has shape {x.shape}, anchor has {anchor.shape}")
    sims = [cosine_logits(anchor, x, temperature) for x in (full, masked, fused)]  # 3 x (B, B)
    eye = jnp.eye(batch, dtype=bool)

    a2c = 0.0
    for positive_type in range(3):
        blocks = []
        for other_type, s in enumerate(sims):
            if other_type != positive_type:
                s = jnp.where(eye, s - (s + _EXCLUSION_OFFSET), s)
            blocks.append(s)
        row = jnp.concatenate(blocks, axis=1)  # (B, 3B)
        log_p = jax.nn.log_softmax(row, axis=1)
        positive_col = positive_type * batch + jnp.arange(batch)
        a2c = a2c - jnp.mean(log_p[jnp.arange(batch), positive_col])

    c2a = sum(-jnp.mean(_diag_log_softmax(s, axis=0)) for s in sims) / 3.0
    rank = jnp.mean(jnp.maximum(0.0, margin - (jnp.diagonal(sims[0]) - jnp.diagonal(sims[1]))))
    return a2c + c2a, rank


def symmetric_infonce(video: Array, text: Array, temperature: float = TEMPERATURE) -> Array:
    """Sum of the video->text and text->video InfoNCE over cosine logits (retrieval fine-tuning loss)."""
    logits = cosine_logits(video, text, temperature)
    return -jnp.mean(_diag_log_softmax(logits, axis=1)) - jnp.mean(_diag_log_softmax(logits, axis=0))


def focal_mlm_sum(
    logits: Array, labels: Array, gamma: float = 2.0, ignore_index: int = -100
) -> tuple[Array, Array]:
    """(sum over labelled positions of (1 - p_k)^gamma * CE_k, number of labelled positions).

    `logits` is (..., V) and `labels` the matching (...) integer ids; a position is labelled when its
    label != ignore_index. p_k = exp(-CE_k) keeps its gradient, as in the reference.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"focal_mlm_loss: logits {logits.shape} do not match labels {labels.shape} (want (..., V) and (...))"
        )
    logits = _float(logits)
    valid = labels != ignore_index
    safe_labels = jnp.where(valid, labels, 0)
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe_labels[..., None], axis=-1)[..., 0]
    focal = (1.0 - jnp.exp(log_p)) ** gamma * (-log_p)
    return jnp.sum(jnp.where(valid, focal, 0.0)), jnp.sum(valid)


def focal_mlm_loss(logits: Array, labels: Array, gamma: float = 2.0, ignore_index: int = -100) -> Array:
    """Softmax focal loss mean_k (1 - p_k)^gamma * CE_k over positions whose label != ignore_index.

    `logits` is (..., V) and `labels` the matching (...) integer ids. Returns 0 (not NaN, unlike the
    reference) when no position is labelled. p_k = exp(-CE_k) keeps its gradient, as in the reference.
    """
    total, count = focal_mlm_sum(logits, labels, gamma, ignore_index)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def _cfg_value(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def scale_gradient(x: Array, factor: float) -> Array:
    """Returns x unchanged in value whose gradient is multiplied by `factor` (x itself when factor is 1)."""
    if factor == 1.0:
        return x
    return x * factor + jax.lax.stop_gradient(x - x * factor)


def in_batch_metrics(video: Array, text: Array) -> dict[str, Array]:
    """In-batch top-1 accuracy both ways and mean positive / negative cosine (monitoring only)."""
    cos = l2_normalize(video) @ l2_normalize(text).T
    batch = cos.shape[0]
    eye = jnp.eye(batch, dtype=bool)
    idx = jnp.arange(batch)
    off_count = max(batch * batch - batch, 1)
    return {
        "acc_v2t": jnp.mean(jnp.argmax(cos, axis=1) == idx),
        "acc_t2v": jnp.mean(jnp.argmax(cos, axis=0) == idx),
        "cos_pos": jnp.mean(jnp.diagonal(cos)),
        "cos_neg": jnp.sum(jnp.where(eye, 0.0, cos)) / off_count,
    }


def contrastive_grad_factor(cfg: Any, num_data_replicas: int = 1) -> float:
    """The factor a contrastive loss's gradient is multiplied by (its value never changes), from the loss
    config's `contrastive_grad_scale`:
      "global"     1: the gradient of the global-batch loss (what plain jit over global arrays gives).
      "official"   1 / `official_replicas`: the official run's gradient. Its all-gather's backward returns
                   only the local slice and DDP averages, so the net gradient is ∇L_global / world size
                   (§2.5), for pre-training and retrieval fine-tuning alike; `official_replicas` is that
                   run's GPU count (the recipes set it), whatever our device count.
      "reference"  1 / `num_data_replicas`: the same mechanism at our data-replica count (the official code
                   run on as many GPUs as we have replicas); equals "official" only when the counts agree.
    The MLM and QA cross-entropies are never scaled: per-rank means averaged by DDP already have the
    global-mean gradient.
    """
    grad_scale = _cfg_value(cfg, "contrastive_grad_scale", "global")
    if grad_scale not in GRAD_SCALES:
        raise ValueError(f"contrastive_grad_scale={grad_scale!r}; choose one of {GRAD_SCALES}")
    if num_data_replicas < 1:
        raise ValueError(f"num_data_replicas must be >= 1, got {num_data_replicas}")
    if grad_scale == "reference":
        return 1.0 / num_data_replicas
    if grad_scale == "official":
        replicas = _cfg_value(cfg, "official_replicas", default_loss_config().official_replicas)
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"loss.official_replicas={replicas!r} must be a positive integer (the official "
                             "run's GPU count)")
        return 1.0 / replicas
    return 1.0


def _objective_settings(cfg: Any, num_data_replicas: int) -> dict[str, Any]:
    """The validated fields of a loss config (see `default_loss_config`; missing fields take defaults)."""
    weights = dict(_cfg_value(cfg, "loss_weights", None) or {})
    unknown = set(weights) - set(TERM_NAMES)
    if unknown:
        raise ValueError(f"loss_weights has unknown terms {sorted(unknown)}; valid terms: {list(TERM_NAMES)}")
    grad_factor = contrastive_grad_factor(cfg, num_data_replicas)
    defaults = default_loss_config()
    return {
        "temperature": _cfg_value(cfg, "temperature", defaults.temperature),
        "margin": _cfg_value(cfg, "rank_margin", defaults.rank_margin),
        "gamma": _cfg_value(cfg, "focal_gamma", defaults.focal_gamma),
        "weights": {name: float(weights.get(name, 1.0)) for name in TERM_NAMES},
        "grad_factor": grad_factor,
    }


def pretrain_objective(
    outputs: Mapping[str, Array],
    mlm_labels: Array,
    cfg: Any = None,
    *,
    num_data_replicas: int = 1,
) -> tuple[Array, dict[str, Array]]:
    """Clover's pre-training loss (§2.1, §2.4): two exclusive-NCE calls with ranking, plus focal MLM.

    outputs: "v", "t", "v_masked", "t_masked" (B, D) projections of full/masked video and text;
      "z_v" = h_V(Fuse(V^m, T)), "z_t" = h_T(Fuse(V, T^m)) (B, D); "mlm_logits" (B, L, V) from Fuse(V, T^m).
    mlm_labels: (B, L) token ids at masked positions, -100 elsewhere.
    cfg: ConfigDict/dict/object with the fields of `default_loss_config()` (missing fields take defaults):
      temperature, rank_margin, focal_gamma, loss_weights {term: weight} over TERM_NAMES, and
      contrastive_grad_scale / official_replicas: the contrastive terms (nce + rank) keep their value but
      their gradient is multiplied by `contrastive_grad_factor` ("global" 1, "official" 1/official_replicas,
      "reference" 1/num_data_replicas). This matters under clipping. The MLM term is never scaled.
    num_data_replicas: data-parallel replica count (product of the batch mesh axes, see
      `sharding.num_data_replicas`), only used by "reference".
    Call 1 anchors v with (t, t_masked, z_v); call 2 anchors t with (v, v_masked, z_t).
    Returns (total, terms) where terms holds every weighted-input term (unweighted values), the total and
    monitoring metrics (in-batch top-1 accuracy v->t and t->v, mean positive and negative cosine).
    This is `pretrain_objective_from_mlm` with mlm = `focal_mlm_loss(outputs["mlm_logits"], mlm_labels)`.
    """
    missing = [k for k in PRETRAIN_OUTPUTS if k not in outputs]
    if missing:
        raise KeyError(f"pretrain_objective: outputs lack {missing}; expected keys {list(PRETRAIN_OUTPUTS)}")
    gamma = _objective_settings(cfg, num_data_replicas)["gamma"]
    mlm = focal_mlm_loss(outputs["mlm_logits"], mlm_labels, gamma=gamma)
    return pretrain_objective_from_mlm(outputs, mlm, cfg, num_data_replicas=num_data_replicas)


def pretrain_contrastive(
    embeddings: Mapping[str, Array], cfg: Any = None, *, num_data_replicas: int = 1
) -> tuple[Array, dict[str, Array]]:
    """The contrastive part of `pretrain_objective` on the six global-batch embeddings (EMBEDDING_KEYS).

    Returns (weighted sum of the nce and rank terms, its gradient scaled by `contrastive_grad_factor`;
    {term: unweighted value} for CONTRASTIVE_TERMS).
    """
    settings = _objective_settings(cfg, num_data_replicas)
    weights = settings["weights"]
    nce_kw = dict(temperature=settings["temperature"], margin=settings["margin"])
    v, t = embeddings["v"], embeddings["t"]
    terms: dict[str, Array] = {}
    terms["nce_video_anchor"], terms["rank_video_anchor"] = tri_modal_exclusive_nce(
        v, t, embeddings["t_masked"], embeddings["z_v"], **nce_kw
    )
    terms["nce_text_anchor"], terms["rank_text_anchor"] = tri_modal_exclusive_nce(
        t, v, embeddings["v_masked"], embeddings["z_t"], **nce_kw
    )
    contrastive = sum(weights[name] * terms[name] for name in CONTRASTIVE_TERMS)
    contrastive = scale_gradient(contrastive, settings["grad_factor"])
    return contrastive, terms


def pretrain_objective_from_mlm(
    embeddings: Mapping[str, Array], mlm: Array, cfg: Any = None, *, num_data_replicas: int = 1
) -> tuple[Array, dict[str, Array]]:
    """`pretrain_objective` given the six embeddings and the already computed focal MLM loss `mlm`.

    The total is `pretrain_contrastive` + loss_weights.mlm * mlm (MLM never gradient-scaled); the
    returned terms are those of `pretrain_objective`.
    """
    missing = [k for k in EMBEDDING_KEYS if k not in embeddings]
    if missing:
        raise KeyError(f"pretrain_objective: outputs lack {missing}; expected keys {list(PRETRAIN_OUTPUTS)}")
    mlm_weight = _objective_settings(cfg, num_data_replicas)["weights"]["mlm"]
    contrastive, terms = pretrain_contrastive(embeddings, cfg, num_data_replicas=num_data_replicas)
    total = contrastive + mlm_weight * mlm
    terms = {k: jax.lax.stop_gradient(x) for k, x in {**terms, "mlm": mlm}.items()}
    terms["total"] = jax.lax.stop_gradient(total)
    terms.update(jax.lax.stop_gradient(in_batch_metrics(embeddings["v"], embeddings["t"])))
    return total, terms
