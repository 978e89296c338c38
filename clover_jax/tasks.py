"""Loss functions `(params, batch, rng) -> (loss, metrics)` binding the Clover model to each objective.

`pretrain` is the paper's objective (tri-modal NCE + ranking + focal MLM, reference §2);
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
from clover_jax.models.clover import Clover, CloverConfig

LossFn = grad_cache.LossFn


def pretrain_objective(model_config: CloverConfig, loss_config: ConfigDict, num_data_replicas: int,
                       *, deterministic: bool = False) -> grad_cache.EmbeddingLoss:
    """The pre-training loss (`losses.pretrain_objective`) in embedding form: `embed` runs the Clover forward
    on rows of a batch with video, video_mask, text_ids(_masked), text_mask, mlm_labels and returns the six
    (rows, E) embeddings and the focal-MLM sum over their masked positions; `normalizer` counts the masked
    positions of the batch; `loss` is the contrastive terms plus the MLM mean. `deterministic` turns dropout
    off (for exactness tests)."""
    model = Clover(model_config)
    gamma = loss_config.get("focal_gamma", 2.0) if hasattr(loss_config, "get") else 2.0
    losses.contrastive_grad_factor(loss_config, num_data_replicas)  # a bad scale fails here, not when traced

    def embed(params, batch, rng):
        outputs = model.apply({"params": params}, batch, deterministic=deterministic, rngs={"dropout": rng})
        mlm_sum, _ = losses.focal_mlm_sum(outputs["mlm_logits"], batch["mlm_labels"], gamma=gamma)
        return {k: outputs[k] for k in losses.EMBEDDING_KEYS}, mlm_sum

    def normalizer(batch):
        return jnp.maximum(jnp.sum(batch["mlm_labels"] != -100), 1).astype(jnp.float32)

    def loss(embeddings, mlm):
        return losses.pretrain_objective_from_mlm(embeddings, mlm, loss_config, num_data_replicas=num_data_replicas)

    return grad_cache.EmbeddingLoss(embed, normalizer, loss)


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
