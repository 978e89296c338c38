"""Clover's losses as pure functions of global-batch arrays (fp32 or fp64 math, never lower).

Every contrastive function takes GLOBAL-batch embeddings. Inside `jax.jit` on batch-sharded arrays the
plain `a @ b.T` below makes XLA gather what it needs (jax-anchors §5/§11.3); there is no hand-written
all_gather. The reference (clover-reference.md §2) all-gathers too, so its means are over the global
batch; the only difference is the gradient scale, see `contrastive_grad_factor`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from clover_jax.defaults import ALIGNMENTS, SWITCHES, TEMPERATURE, TERM_NAMES, default_loss_config
from clover_jax.models.clover import PRETRAIN_OUTPUTS

Array = jax.Array

# The reference excludes the anchor's other positives with a finite trick, s - (s + 1e4), not -inf.
_EXCLUSION_OFFSET = 1e4

CONTRASTIVE_TERMS = TERM_NAMES[1:]
GRAD_SCALES = ("global", "reference", "official")
MLM_MEANS = ("global", "per_replica")  # `mlm_groups`: one mean over the batch, or the official per-GPU means
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


def exclusive_nce_from_logits(sims: Sequence[Array]) -> Array:
    """Exclusive NCE (§2.2) over K candidate sets, given their (B, B) anchor-candidate logits `sims`.

    L_a2c sums over the K positive types P the mean over anchors of -log softmax(KB-wide row
    [S^1_i, ..., S^K_i])[P's diagonal], with the other types' diagonal entries replaced by s - (s + 1e4)
    (about -1e4, zero gradient, as the reference does); L_c2a averages over P the column InfoNCE
    (candidate j retrieves anchor j). Returns L_a2c + L_c2a. With K = 1 this is the symmetric InfoNCE.
    """
    batch = sims[0].shape[0]
    eye = jnp.eye(batch, dtype=bool)
    a2c = 0.0
    for positive_type in range(len(sims)):
        blocks = []
        for other_type, s in enumerate(sims):
            if other_type != positive_type:
                s = jnp.where(eye, s - (s + _EXCLUSION_OFFSET), s)
            blocks.append(s)
        row = jnp.concatenate(blocks, axis=1)  # (B, KB)
        log_p = jax.nn.log_softmax(row, axis=1)
        positive_col = positive_type * batch + jnp.arange(batch)
        a2c = a2c - jnp.mean(log_p[jnp.arange(batch), positive_col])
    c2a = sum(-jnp.mean(_diag_log_softmax(s, axis=0)) for s in sims) / float(len(sims))
    return a2c + c2a


def ranking_loss(full_logits: Array, masked_logits: Array, margin: float = 5.0) -> Array:
    """mean_i max(0, margin - (full_i - masked_i)) over (B,) positive logits (margin in logit units)."""
    return jnp.mean(jnp.maximum(0.0, margin - (full_logits - masked_logits)))


def paired_logits(a: Array, b: Array, temperature: float = TEMPERATURE, eps: float = 1e-8) -> Array:
    """(B,) cosine of row i of a with row i of b, over `temperature` (the diagonal of `cosine_logits`)."""
    return jnp.sum(l2_normalize(a, eps) * l2_normalize(b, eps), axis=-1) / temperature


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
    Returns (nce, rank): nce = `exclusive_nce_from_logits` over (full, masked, fused);
    rank = mean_i max(0, margin - (S^full_ii - S^masked_ii)), margin in logit units (cosine/τ).
    """
    for name, x in (("full", full), ("masked", masked), ("fused", fused)):
        if x.shape != anchor.shape:
            raise ValueError(f"tri_modal_exclusive_nce: {name} has shape {x.shape}, anchor has {anchor.shape}")
    sims = [cosine_logits(anchor, x, temperature) for x in (full, masked, fused)]  # 3 x (B, B)
    return exclusive_nce_from_logits(sims), ranking_loss(jnp.diagonal(sims[0]), jnp.diagonal(sims[1]), margin)


def symmetric_infonce(video: Array, text: Array, temperature: float = TEMPERATURE) -> Array:
    """Sum of the video->text and text->video InfoNCE over cosine logits (retrieval fine-tuning loss)."""
    logits = cosine_logits(video, text, temperature)
    return -jnp.mean(_diag_log_softmax(logits, axis=1)) - jnp.mean(_diag_log_softmax(logits, axis=0))


def focal_mlm_terms(logits: Array, labels: Array, gamma: float = 2.0, ignore_index: int = -100) -> Array:
    """(1 - p_k)^gamma * CE_k at every labelled position, 0 elsewhere: the shape of `labels`.

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
    return jnp.where(valid, focal, 0.0)


def focal_mlm_sum(
    logits: Array, labels: Array, gamma: float = 2.0, ignore_index: int = -100
) -> tuple[Array, Array]:
    """(sum over labelled positions of (1 - p_k)^gamma * CE_k, number of labelled positions)."""
    return jnp.sum(focal_mlm_terms(logits, labels, gamma, ignore_index)), jnp.sum(labels != ignore_index)


def mlm_row_weights(labels: Array, groups: int, ignore_index: int = -100) -> Array:
    """(B,) weight of each row's focal sum for the official MLM mean (issue 31, D10): rows split into `groups`
    contiguous groups (the official GPUs' local batches), each group's mean over its own labelled tokens,
    then the mean over groups, so a row of group g weighs 1 / (groups * labelled tokens of g). A group with
    no labelled token adds 0 (the official code's mean of nothing would be NaN)."""
    rows = labels.shape[0]
    if rows % groups:
        raise ValueError(f"loss.mlm_mean='per_replica' splits the batch of {rows} rows over loss.official_replicas="
                         f"{groups} GPUs: make the batch size a multiple of {groups}, or use mlm_mean='global'")
    counts = jnp.sum((labels != ignore_index).reshape(groups, -1), axis=1)
    per_group = 1.0 / (groups * jnp.maximum(counts, 1).astype(jnp.float32))
    return jnp.repeat(per_group, rows // groups)


def mlm_groups(cfg: Any) -> int:
    """How many groups the MLM mean averages over: 1 ("global"), or the official run's GPU count
    ("per_replica", `loss.official_replicas`)."""
    mean = _cfg_value(cfg, "mlm_mean", "global")
    if mean not in MLM_MEANS:
        raise ValueError(f"loss.mlm_mean={mean!r}; valid: {', '.join(map(repr, MLM_MEANS))}")
    if mean == "global":
        return 1
    return int(_cfg_value(cfg, "official_replicas", default_loss_config().official_replicas))


def official_mlm_loss(logits: Array, labels: Array, groups: int, gamma: float = 2.0) -> Array:
    """The focal MLM loss as `groups` GPUs each average their own rows' labelled tokens, then DDP averages."""
    terms = focal_mlm_terms(logits, labels, gamma)
    return jnp.sum(terms.reshape(terms.shape[0], -1).sum(axis=1) * mlm_row_weights(labels, groups))


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
    The MLM and QA cross-entropies are never scaled: neither goes through the gather, so both already
    have gradient scale 1. The MLM mean differs, though (issue 31, D10): by default ("mlm_mean" "global")
    ours is one mean over every labelled token of the global batch; the official MLM is each GPU's mean
    over its own masked tokens, then DDP's average over GPUs, so a token weighs 1 / (GPUs x its GPU's
    masked-token count), not 1 / (global count). The two agree only when every GPU holds equally many
    masked tokens; `mlm_mean="per_replica"` computes the official one (`mlm_row_weights`).
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


def objective_switches(cfg: Any) -> dict[str, Any]:
    """The ablation switches of a loss config (`default_loss_config`; missing ones take the paper's values),
    validated: ValueError names the key and its valid values.
      alignment          "tri_modal": each anchor against (full, masked, fused) candidates (§2.2);
                         "pairwise": plain video-text NCE (`exclusive_nce_from_logits` over t alone, which is
                         the symmetric InfoNCE; the text-anchored call would repeat it, so it is off).
      masked_candidates  tri_modal only: with the masked uni-modal candidates t^m / v^m, or (False) with
                         (full, fused) alone, what the official `use_Cmask=False` meant.
      ranking            the two pair-wise ranking terms (they read t^m / v^m whatever the candidates).
      mlm                the focal MLM term (off: no MLM head is run).
      video_masking      off: V^m = V, so the masked-video pass, its candidate v^m and `rank_text_anchor`
                         are dropped and z_V = h_V(Fuse(V, T)).
    """
    defaults = default_loss_config()
    out = {"alignment": _cfg_value(cfg, "alignment", defaults.alignment)}
    if out["alignment"] not in ALIGNMENTS:
        raise ValueError(f"loss.alignment={out['alignment']!r}; valid: {', '.join(map(repr, ALIGNMENTS))}")
    for key in SWITCHES[1:]:
        out[key] = _cfg_value(cfg, key, defaults[key])
        if not isinstance(out[key], bool):
            raise ValueError(f"loss.{key}={out[key]!r}; valid: True, False")
    return out


def candidate_sets(cfg: Any) -> dict[str, tuple[str, ...]]:
    """{active NCE term: the embedding keys of its candidate sets}, anchors v ("nce_video_anchor") and t."""
    s = objective_switches(cfg)
    if s["alignment"] == "pairwise":
        return {"nce_video_anchor": ("t",)}
    text_masked = ("t_masked",) if s["masked_candidates"] else ()
    video_masked = ("v_masked",) if s["masked_candidates"] and s["video_masking"] else ()
    return {"nce_video_anchor": ("t", *text_masked, "z_v"), "nce_text_anchor": ("v", *video_masked, "z_t")}


def active_terms(cfg: Any) -> tuple[str, ...]:
    """The TERM_NAMES a loss config computes (the others are not computed, nor reported)."""
    s = objective_switches(cfg)
    on = {*candidate_sets(cfg), *(["mlm"] if s["mlm"] else [])}
    if s["ranking"]:
        on.update(["rank_video_anchor"] + (["rank_text_anchor"] if s["video_masking"] else []))
    return tuple(name for name in TERM_NAMES if name in on)


def required_embeddings(cfg: Any) -> tuple[str, ...]:
    """The EMBEDDING_KEYS the active contrastive terms read (the forward computes only these)."""
    terms = active_terms(cfg)
    keys = {"v", "t"}.union(*candidate_sets(cfg).values())
    keys.update(masked for rank, _, _, masked in _RANK_CALLS if rank in terms)
    return tuple(k for k in EMBEDDING_KEYS if k in keys)


# (rank term, anchor, full-modality positive, masked positive) of the two reference calls.
_RANK_CALLS = (("rank_video_anchor", "v", "t", "t_masked"), ("rank_text_anchor", "t", "v", "v_masked"))
_NCE_ANCHORS = {"nce_video_anchor": "v", "nce_text_anchor": "t"}


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
        "terms": active_terms(cfg),
        "candidates": candidate_sets(cfg),
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
      Only the keys the config's active terms read are needed (`required_embeddings`, + "mlm_logits").
    mlm_labels: (B, L) token ids at masked positions, -100 elsewhere.
    cfg: ConfigDict/dict/object with the fields of `default_loss_config()` (missing fields take defaults):
      temperature, rank_margin, focal_gamma, loss_weights {term: weight} over TERM_NAMES, the ablation
      switches (`objective_switches`), and
      contrastive_grad_scale / official_replicas: the contrastive terms (nce + rank) keep their value but
      their gradient is multiplied by `contrastive_grad_factor` ("global" 1, "official" 1/official_replicas,
      "reference" 1/num_data_replicas). This matters under clipping. The MLM term is never scaled.
    num_data_replicas: data-parallel replica count (product of the batch mesh axes, see
      `sharding.num_data_replicas`), only used by "reference".
    Call 1 anchors v with (t, t_masked, z_v); call 2 anchors t with (v, v_masked, z_t).
    Returns (total, terms) where terms holds every active term (unweighted values; `active_terms`), the
    total and monitoring metrics (in-batch top-1 accuracy v->t and t->v, mean positive and negative cosine).
    This is `pretrain_objective_from_mlm` with mlm = `focal_mlm_loss(outputs["mlm_logits"], mlm_labels)`.
    """
    settings = _objective_settings(cfg, num_data_replicas)
    wanted = required_embeddings(cfg) + (("mlm_logits",) if "mlm" in settings["terms"] else ())
    missing = [k for k in wanted if k not in outputs]
    if missing:
        raise KeyError(f"pretrain_objective: outputs lack {missing}; expected keys {list(wanted)}")
    mlm = None
    if "mlm_logits" in wanted:
        groups = mlm_groups(cfg)
        mlm = (official_mlm_loss(outputs["mlm_logits"], mlm_labels, groups, settings["gamma"]) if groups > 1
               else focal_mlm_loss(outputs["mlm_logits"], mlm_labels, gamma=settings["gamma"]))
    return pretrain_objective_from_mlm(outputs, mlm, cfg, num_data_replicas=num_data_replicas)


def pretrain_contrastive(
    embeddings: Mapping[str, Array], cfg: Any = None, *, num_data_replicas: int = 1
) -> tuple[Array, dict[str, Array]]:
    """The contrastive part of `pretrain_objective` on the global-batch embeddings (`required_embeddings`).

    Returns (weighted sum of the active nce and rank terms, its gradient scaled by
    `contrastive_grad_factor`; {term: unweighted value} for the active CONTRASTIVE_TERMS).
    """
    settings = _objective_settings(cfg, num_data_replicas)
    temperature, active = settings["temperature"], settings["terms"]
    logits: dict[tuple[str, str], Array] = {}  # (anchor, candidate) -> (B, B), shared with the ranking terms
    terms: dict[str, Array] = {}
    for name, keys in settings["candidates"].items():
        anchor = _NCE_ANCHORS[name]
        for k in keys:
            logits[anchor, k] = cosine_logits(embeddings[anchor], embeddings[k], temperature)
        terms[name] = exclusive_nce_from_logits([logits[anchor, k] for k in keys])
    for name, anchor, full, masked in _RANK_CALLS:
        if name in active:
            pos, neg = (jnp.diagonal(logits[anchor, k]) if (anchor, k) in logits
                        else paired_logits(embeddings[anchor], embeddings[k], temperature) for k in (full, masked))
            terms[name] = ranking_loss(pos, neg, settings["margin"])
    terms = {name: terms[name] for name in CONTRASTIVE_TERMS if name in terms}  # the reference's order
    contrastive = sum(settings["weights"][name] * value for name, value in terms.items())
    contrastive = scale_gradient(contrastive, settings["grad_factor"])
    return contrastive, terms


def pretrain_objective_from_mlm(
    embeddings: Mapping[str, Array], mlm: Array | None, cfg: Any = None, *, num_data_replicas: int = 1
) -> tuple[Array, dict[str, Array]]:
    """`pretrain_objective` given the embeddings and the already computed focal MLM loss `mlm` (ignored,
    and may be None, when the config turns MLM off).

    The total is `pretrain_contrastive` + loss_weights.mlm * mlm (MLM never gradient-scaled); the
    returned terms are those of `pretrain_objective`.
    """
    settings = _objective_settings(cfg, num_data_replicas)
    wanted = required_embeddings(cfg)
    missing = [k for k in wanted if k not in embeddings]
    if missing:
        raise KeyError(f"pretrain_objective: outputs lack {missing}; expected keys {list(wanted)}")
    contrastive, terms = pretrain_contrastive(embeddings, cfg, num_data_replicas=num_data_replicas)
    total = contrastive
    if "mlm" in settings["terms"]:
        total = total + settings["weights"]["mlm"] * mlm
        terms = {"mlm": mlm, **terms}
    terms = {k: jax.lax.stop_gradient(x) for k, x in terms.items()}
    terms["total"] = jax.lax.stop_gradient(total)
    terms.update(jax.lax.stop_gradient(in_batch_metrics(embeddings["v"], embeddings["t"])))
    return total, terms
