"""Loss functions `(params, batch, rng) -> (loss, metrics)` binding the Clover model to each objective.

`pretrain` is the paper's objective (tri-modal NCE + ranking + focal MLM, reference §2);
`retrieval` is the symmetric InfoNCE of retrieval fine-tuning on the dual encoder (§5.1).
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from clover_jax import losses
from clover_jax.models.clover import Clover, CloverConfig

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def pretrain_loss_fn(model_config: CloverConfig, loss_config: Any, num_data_replicas: int) -> LossFn:
    """The pre-training loss on a batch with video, video_mask, text_ids(_masked), text_mask, mlm_labels."""
    model = Clover(model_config)

    def loss_fn(params, batch, rng):
        outputs = model.apply({"params": params}, batch, deterministic=False, rngs={"dropout": rng})
        return losses.pretrain_objective(outputs, batch["mlm_labels"], loss_config,
                                         num_data_replicas=num_data_replicas)

    return loss_fn


def retrieval_loss_fn(model_config: CloverConfig, loss_config: Any, num_data_replicas: int) -> LossFn:
    """Symmetric InfoNCE between v = g_v(Swin(V)) and t = g_t(BERT(T)) (the fusion encoder is unused)."""
    model = Clover(model_config)
    temperature = loss_config.get("temperature", 0.05) if hasattr(loss_config, "get") else 0.05

    def loss_fn(params, batch, rng):
        rngs = {"dropout": rng}
        _, v = model.apply({"params": params}, batch["video"], deterministic=False, rngs=rngs,
                           method=Clover.encode_video)
        _, t = model.apply({"params": params}, batch["text_ids"], batch["text_mask"], deterministic=False,
                           rngs=rngs, method=Clover.encode_text)
        loss = losses.symmetric_infonce(v, t, temperature)
        metrics = {k: jax.lax.stop_gradient(x) for k, x in losses.in_batch_metrics(v, t).items()}
        return loss, {"infonce": jax.lax.stop_gradient(loss), **metrics}

    return loss_fn
