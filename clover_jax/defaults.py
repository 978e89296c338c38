"""Paper defaults of the loss and the optimizer as ConfigDicts; imports no jax, so reading a config stays light."""
from __future__ import annotations

import ml_collections

TERM_NAMES = ("mlm", "nce_video_anchor", "rank_video_anchor", "nce_text_anchor", "rank_text_anchor")
TEMPERATURE = 0.05  # cosine-logit temperature of every contrastive loss (clover-reference.md §2)
ALIGNMENTS = ("tri_modal", "pairwise")
# The pre-training objective's ablation switches (`losses.objective_switches`); the paper's are the defaults.
SWITCHES = ("alignment", "masked_candidates", "ranking", "mlm", "video_masking")


def default_loss_config() -> ml_collections.ConfigDict:
    """Defaults for `losses.pretrain_objective` (paper values, clover-reference.md §2)."""
    return ml_collections.ConfigDict(
        {
            "temperature": TEMPERATURE,
            "rank_margin": 5.0,
            "focal_gamma": 2.0,
            "loss_weights": {name: 1.0 for name in TERM_NAMES},
            "contrastive_grad_scale": "global",  # or "official" / "reference": losses.contrastive_grad_factor
            "official_replicas": 32,  # the official pre-training run's GPUs (8 x 4 machines), for "official"
            # "global": one mean over every masked token of the global batch; "per_replica": each official GPU's
            # mean over its own masked tokens, averaged over official_replicas GPUs (losses.mlm_row_weights)
            "mlm_mean": "global",
            "alignment": "tri_modal",  # or "pairwise" (ablation switches: losses.objective_switches)
            "masked_candidates": True,
            "ranking": True,
            "mlm": True,
            "video_masking": True,
        }
    )


def default_optim_config() -> ml_collections.ConfigDict:
    """Paper values (§4); `warmup_steps` is in optimizer steps (the paper: 4 of 40 epochs)."""
    return ml_collections.ConfigDict(
        {
            "lr": 5e-5,
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-8,
            "weight_decay": 0.005,
            "grad_clip": 15.0,  # global-norm clip; 0 or None disables
            "warmup_steps": 0,
            "warmup_epochs": 0.0,  # > 0: the warm-up in epochs of the training data (wins over warmup_steps)
            "warmup_init_ratio": 1e-3,  # mmcv's warmup_ratio: the first step's lr / the regular lr
            "min_lr_ratio": 1e-3,
            "lr_multipliers": {},  # {param path prefix: factor}, e.g. {"qa_head": 10.0}
            # "warmup_then_cosine" (ours: optax's warm-up to lr, then a cosine over the remaining steps) or
            # "mmcv_cosine" (the official code's: cosine from step 0, the warm-up multiplying it; lr_schedules.py)
            "schedule": "warmup_then_cosine",
            "schedule_by_epoch": False,  # mmcv_cosine only: the cosine's value held within each epoch (mmcv by_epoch)
            "decay_rules": "ours",  # which tensors decay: a rule set of clover_jax/weight_decay.py DECAY_RULES
        }
    )
