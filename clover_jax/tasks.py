"""Loss functions `(params, batch, rng) -> (loss, metrics)` binding the Clover model to each objective.

`pretrain` is the paper's objective (tri-modal NCE + ranking + focal MLM, reference §2), or one of its
ablations (`losses.objective_switches`; `pretrain_forward` then runs only the passes the active terms read);
`retrieval` is the symmetric InfoNCE of retrieval fine-tuning on the dual encoder (§5.1);
`qa_open_ended` / `qa_multiple_choice` are the VideoQA cross-entropies on the fused [CLS] heads (§5.2), and
`qa_fill_in_blank` is open-ended QA read at the question's [MASK] token instead (LSMDC-FiB).
The first two are also exposed as `grad_cache.EmbeddingLoss` objectives (`EMBEDDING_OBJECTIVES`), the
form that gradient caching (`config.microbatches`) needs. `TASKS` is the one table of task -> loss function
and evaluator type; the predict functions (`video_embedding_fn`, `text_embedding_fn`, `qa_predict_fn`) are
the deterministic forwards the evaluators score with.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from clover_jax import grad_cache, losses
from clover_jax.defaults import TEMPERATURE
from clover_jax.kernels import execution
from clover_jax.models.clover import PRETRAIN_OUTPUTS, Clover, CloverConfig

LossFn = grad_cache.LossFn


def pretrain_objective(model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int,
                       *, deterministic: bool = False) -> grad_cache.EmbeddingLoss:
    """The pre-training loss (`losses.pretrain_objective`) in embedding form: `embed` runs the Clover forward
    on rows of a batch with video, video_mask, text_ids(_masked), text_mask, mlm_labels and returns the
    (rows, E) embeddings the active terms read (`losses.required_embeddings`) and the focal-MLM sum over their
    masked positions; `normalizer` counts the masked positions of the batch; `loss` is the contrastive terms
    plus the MLM mean. The ablation switches (`losses.objective_switches`, checked here) leave out the passes
    no active term reads (`pretrain_forward`). `deterministic` turns dropout off (for exactness tests)."""
    model = Clover(model_config)
    gamma = loss_config.get("focal_gamma", 2.0) if hasattr(loss_config, "get") else 2.0
    losses.contrastive_grad_factor(loss_config, num_data_replicas)  # a bad scale fails here, not when traced
    switches = losses.objective_switches(loss_config)  # so does a bad ablation switch
    groups = losses.mlm_groups(loss_config)  # and a bad mlm_mean
    wanted = losses.required_embeddings(loss_config) + (("mlm_logits",) if switches["mlm"] else ())
    whole = set(wanted) == set(PRETRAIN_OUTPUTS) and switches["video_masking"]

    def embed(params, batch, rng):
        kw = dict(deterministic=deterministic, rngs={"dropout": rng})
        if whole:
            outputs = model.apply({"params": params}, batch, **kw)
        else:
            outputs = model.apply({"params": params}, batch, wanted, switches["video_masking"], method=pretrain_forward,
                                  **kw)
        mlm_sum = jnp.zeros((), jnp.float32)
        if switches["mlm"] and groups > 1:  # official per-GPU means: each row's sum weighted (see `prepare`)
            terms = losses.focal_mlm_terms(outputs["mlm_logits"], batch["mlm_labels"], gamma=gamma)
            mlm_sum = jnp.sum(terms.reshape(terms.shape[0], -1).sum(axis=1) * batch["mlm_row_weight"])
        elif switches["mlm"]:
            mlm_sum, _ = losses.focal_mlm_sum(outputs["mlm_logits"], batch["mlm_labels"], gamma=gamma)
        return {k: outputs[k] for k in wanted if k != "mlm_logits"}, mlm_sum

    def normalizer(batch):
        if not switches["mlm"] or groups > 1:
            return jnp.ones((), jnp.float32)
        return jnp.maximum(jnp.sum(batch["mlm_labels"] != -100), 1).astype(jnp.float32)

    def prepare(batch):
        if not switches["mlm"] or groups == 1:
            return batch
        return {**batch, "mlm_row_weight": losses.mlm_row_weights(batch["mlm_labels"], groups)}

    def loss(embeddings, mlm):
        return losses.pretrain_objective_from_mlm(embeddings, mlm, loss_config, num_data_replicas=num_data_replicas)

    return grad_cache.EmbeddingLoss(embed, normalizer, loss, prepare)


def _pairs(a: jax.Array, b: jax.Array) -> jax.Array:
    """(B, ...) x2 -> (2B, ...) rows a0, b0, a1, b1, ... (as `Clover.__call__`: shard-local on a mesh)."""
    return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def _unpair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    pairs = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def pretrain_forward(module: Clover, batch: dict, wanted: tuple[str, ...], video_masking: bool,
                     *, deterministic: bool = True) -> dict[str, jax.Array]:
    """`Clover.__call__` computing only the `wanted` PRETRAIN_OUTPUTS (v and t always), for the ablations
    (`model.apply(..., method=pretrain_forward)`): the masked-video Swin pass runs only for v_masked or z_V,
    the masked-text BERT pass only for t_masked, z_T or the MLM logits, each fusion pass only for what
    reads it. Without `video_masking` there is no masked video: V^m = V, so z_V = h_V(Fuse(V, T))."""
    with execution.use(module.config.execution):
        video, token_mask = batch["video"], batch["video_mask"]
        ids, ids_masked, mask = batch["text_ids"], batch["text_ids_masked"], batch["text_mask"]
        if video_masking and {"v_masked", "z_v"} & set(wanted):
            features, v_both = module.encode_video(
                video, jnp.stack([jnp.zeros_like(token_mask), token_mask], axis=1), deterministic=deterministic)
            (feat_full, feat_masked), (v, v_masked) = _unpair(features), _unpair(v_both)
        else:
            feat_full, v = module.encode_video(video, deterministic=deterministic)
            feat_masked, v_masked = feat_full, v
        out = {"v": v, "v_masked": v_masked}
        if {"t_masked", "z_t", "mlm_logits"} & set(wanted):
            states, t_both = module.encode_text(_pairs(ids, ids_masked), _pairs(mask, mask),
                                                deterministic=deterministic)
            (states_full, states_masked), (out["t"], out["t_masked"]) = _unpair(states), _unpair(t_both)
        else:
            states_full, out["t"] = module.encode_text(ids, mask, deterministic=deterministic)
        if "z_v" in wanted:  # tri-modal, so z_T too: Fuse(V^m, T) and Fuse(V, T^m) in one call
            fused_video, fused_text = module.fuse(_pairs(feat_masked, feat_full), _pairs(states_full, states_masked),
                                                  _pairs(mask, mask), deterministic=deterministic)
            (video_tokens_vm, _), (text_vm, text_tm) = _unpair(fused_video), _unpair(fused_text)
            h_v_in = text_vm[:, 0] if module.config.h_v_input == "text_cls" else video_tokens_vm
            out["z_v"] = module.h_v(h_v_in, deterministic=deterministic)
        elif "mlm_logits" in wanted:  # pair-wise alignment with MLM: Fuse(V, T^m) alone
            text_tm = module.fuse(feat_full, states_masked, mask, deterministic=deterministic)[1]
        if "z_t" in wanted:
            out["z_t"] = module.h_t(text_tm[:, 0], deterministic=deterministic)
        if "mlm_logits" in wanted:
            out["mlm_logits"] = module.mlm_head(text_tm)
        return {k: out[k].astype(jnp.float32) for k in wanted}


def pretrain_loss_fn(model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int,
                     *, deterministic: bool = False) -> LossFn:
    """The pre-training loss on a batch with video, video_mask, text_ids(_masked), text_mask, mlm_labels."""
    return grad_cache.plain_loss_fn(pretrain_objective(model_config, loss_config, num_data_replicas,
                                                       deterministic=deterministic))


def retrieval_objective(model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int,
                        *, deterministic: bool = False) -> grad_cache.EmbeddingLoss:
    """Symmetric InfoNCE between v = g_v(Swin(V)) and t = g_t(BERT(T)) in embedding form (the fusion
    encoder is unused; no per-example term). Its gradient is scaled by `losses.contrastive_grad_factor`: the
    official fine-tune gathers embeddings as pre-training does (§2.5)."""
    model = Clover(model_config)
    temperature = loss_config.get("temperature", TEMPERATURE) if hasattr(loss_config, "get") else TEMPERATURE
    grad_factor = losses.contrastive_grad_factor(loss_config, num_data_replicas)

    def embed(params, batch, rng):
        rngs = {"dropout": rng}
        _, v = model.apply({"params": params}, batch["video"], deterministic=deterministic, rngs=rngs,
                           method=Clover.encode_video)
        _, t = model.apply({"params": params}, batch["text_ids"], batch["text_mask"], deterministic=deterministic,
                           rngs=rngs, method=Clover.encode_text)
        return {"v": v, "t": t}, jnp.zeros((), jnp.float32)

    def loss(embeddings, unused_mean):
        v, t = embeddings["v"], embeddings["t"]
        value = losses.symmetric_infonce(v, t, temperature)
        metrics = {k: jax.lax.stop_gradient(x) for k, x in losses.in_batch_metrics(v, t).items()}
        return losses.scale_gradient(value, grad_factor), {"infonce": jax.lax.stop_gradient(value), **metrics}

    return grad_cache.EmbeddingLoss(embed, lambda batch: jnp.ones((), jnp.float32), loss)


def retrieval_loss_fn(model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int,
                      *, deterministic: bool = False) -> LossFn:
    """Symmetric InfoNCE between v = g_v(Swin(V)) and t = g_t(BERT(T)) (the fusion encoder is unused)."""
    return grad_cache.plain_loss_fn(retrieval_objective(model_config, loss_config, num_data_replicas,
                                                        deterministic=deterministic))


# Tasks whose loss is an `EmbeddingLoss`, so `config.microbatches > 1` (gradient caching) can run them.
EMBEDDING_OBJECTIVES = {"pretrain": pretrain_objective, "retrieval": retrieval_objective}


def qa_open_ended_loss_fn(model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int,
                          *, at_mask_token: bool = False) -> LossFn:
    """Cross-entropy over the answer vocabulary (`Clover.qa_open_ended`) on video, text_ids, text_mask,
    answer_index. Questions whose answer is outside the vocabulary (-1) are left out of the loss but
    counted wrong in `accuracy`. `at_mask_token` reads the head at each question's [MASK] (fill-in-the-blank)."""
    del loss_config, num_data_replicas
    forward = _qa_open_ended_forward(Clover(model_config), at_mask_token)

    def loss_fn(params, batch, rng):
        return _classification_loss(forward(params, batch, False, {"dropout": rng}), batch["answer_index"])

    return loss_fn


def _qa_open_ended_forward(model: Clover, at_mask_token: bool) -> Callable:
    def forward(params, batch, deterministic, rngs):
        return model.apply({"params": params}, batch["video"], batch["text_ids"], batch["text_mask"],
                           deterministic=deterministic, at_mask_token=at_mask_token, rngs=rngs,
                           method=Clover.qa_open_ended)

    return forward


def _qa_multiple_choice_forward(model: Clover) -> Callable:
    def forward(params, batch, deterministic, rngs):
        return model.apply({"params": params}, batch["video"], batch["option_ids"], batch["option_mask"],
                           deterministic=deterministic, rngs=rngs, method=Clover.qa_multiple_choice)

    return forward


def qa_fill_in_blank_loss_fn(model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int) -> LossFn:
    """LSMDC fill-in-the-blank: the open-ended cross-entropy with the head on the fused [MASK] state."""
    return qa_open_ended_loss_fn(model_config, loss_config, num_data_replicas, at_mask_token=True)


def qa_multiple_choice_loss_fn(model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int) -> LossFn:
    """Cross-entropy over the K option scores (`Clover.qa_multiple_choice`) on video, option_ids,
    option_mask (B, K, L) and answer_index (the true option)."""
    del loss_config, num_data_replicas
    forward = _qa_multiple_choice_forward(Clover(model_config))

    def loss_fn(params, batch, rng):
        return _classification_loss(forward(params, batch, False, {"dropout": rng}), batch["answer_index"])

    return loss_fn


def _classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over rows with a label >= 0, and accuracy over all rows (label -1 is wrong)."""
    known = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    loss = jnp.sum(jnp.where(known, ce, 0.0)) / jnp.maximum(jnp.sum(known), 1)
    accuracy = 100.0 * jnp.mean(known & (jnp.argmax(logits, axis=-1) == labels))
    return loss, {"accuracy": jax.lax.stop_gradient(accuracy)}


def video_embedding_fn(model_config: CloverConfig) -> Callable[[Any, jax.Array], jax.Array]:
    """(params, video (B, T, H, W, 3)) -> v = g_v(pool Swin(V)) (B, E), deterministic."""
    model = Clover(model_config)
    return lambda params, video: model.apply({"params": params}, video, method=Clover.encode_video)[1]


def text_embedding_fn(model_config: CloverConfig) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """(params, text_ids, text_mask) -> t = g_t(BERT [CLS]) (B, E), deterministic."""
    model = Clover(model_config)
    return lambda params, ids, mask: model.apply({"params": params}, ids, mask, method=Clover.encode_text)[1]


def qa_predict_fn(model_config: CloverConfig, task: str) -> Callable[[Any, dict], jax.Array]:
    """(params, batch) -> answer logits (B, num_answers) or option scores (B, K): the forward of `task`'s loss,
    deterministic."""
    model = Clover(model_config)
    if task == "qa_multiple_choice":
        forward = _qa_multiple_choice_forward(model)
    else:
        forward = _qa_open_ended_forward(model, at_mask_token=task == "qa_fill_in_blank")
    return lambda params, batch: forward(params, batch, True, None)


@dataclasses.dataclass(frozen=True)
class Task:
    """A training objective: its loss function and the evaluator type that scores it by default."""

    loss_fn: Callable[[CloverConfig, Any, int], LossFn]
    evaluator: str


TASKS = {
    "pretrain": Task(pretrain_loss_fn, "retrieval"),
    "retrieval": Task(retrieval_loss_fn, "retrieval"),
    "qa_open_ended": Task(qa_open_ended_loss_fn, "qa"),
    "qa_multiple_choice": Task(qa_multiple_choice_loss_fn, "qa"),
    "qa_fill_in_blank": Task(qa_fill_in_blank_loss_fn, "qa"),
}
QA_TASKS = tuple(name for name, task in TASKS.items() if task.evaluator == "qa")


def loss_fn_of(task: str, model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int) -> LossFn:
    """The loss function of `config.task`; ValueError names the valid tasks."""
    if task not in TASKS:
        raise ValueError(f"config.task={task!r}; valid: {', '.join(map(repr, TASKS))}")
    return TASKS[task].loss_fn(model_config, loss_config, num_data_replicas)
