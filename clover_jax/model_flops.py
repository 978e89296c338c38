"""Analytic matmul FLOPs of a Clover pre-training step, by component (pure functions of the configs).

Matmul FLOPs only, 2*m*n*k, of the forward, times 3 for forward + backward (MaxText's convention; the
backward of the patch-embedding conv w.r.t. the video is counted although XLA skips it). Swin windows are
counted at their padded size, as executed. Excluded: LayerNorm, softmax, GELU, residual adds, dropout,
embedding/bias-table gathers, the loss's elementwise math and the optimizer update. Rematerialisation is not
counted (it is model FLOPs, not hardware FLOPs); XLA's `cost_analysis()` counts a loop body once, so for a
scanned encoder it reads lower than this.
"""
from __future__ import annotations

import math

from clover_jax.models.bert import BertConfig
from clover_jax.models.clover import CloverConfig
from clover_jax.models.swin3d import Swin3DConfig, window_and_shift


def dense_flops(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def swin3d_forward_flops(cfg: Swin3DConfig, frames: int, height: int, width: int) -> int:
    """Matmul FLOPs of one clip through Video Swin: patch conv, window attention, MLPs, patch merging."""
    pt, ph, pw = cfg.patch_size
    t, h, w = math.ceil(frames / pt), math.ceil(height / ph), math.ceil(width / pw)
    flops = dense_flops(t * h * w, pt * ph * pw * 3, cfg.embed_dim)  # Conv3d with kernel = stride
    for stage, depth in enumerate(cfg.depths):
        c, tokens = cfg.stage_dim(stage), t * h * w
        for block in range(depth):
            shift = (0, 0, 0) if block % 2 == 0 else tuple(s // 2 for s in cfg.window_size)
            window, _ = window_and_shift((t, h, w), cfg.window_size, shift)
            padded = math.prod(math.ceil(s / k) * k for s, k in zip((t, h, w), window))
            volume = math.prod(window)
            flops += dense_flops(padded, c, 3 * c) + dense_flops(padded, c, c)  # qkv, proj (padded windows)
            flops += 2 * 2 * padded * volume * c  # q k^T and probs v, summed over heads
            flops += 2 * dense_flops(tokens, c, int(c * cfg.mlp_ratio))  # fc1, fc2
        if stage < cfg.num_stages - 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            flops += dense_flops(t * h * w, 4 * c, 2 * c)  # PatchMerging reduction
    return flops


def bert_layers_forward_flops(cfg: BertConfig, length: int, layers: int) -> int:
    """Matmul FLOPs of one sequence through `layers` BERT layers (q, k, v, scores, context, out, FFN)."""
    hidden = cfg.hidden_size
    per_layer = (
        4 * dense_flops(length, hidden, hidden)
        + 2 * 2 * length * length * hidden
        + 2 * dense_flops(length, hidden, cfg.intermediate_size)
    )
    return layers * per_layer


def clover_train_flops(config: CloverConfig, batch: int, text_length: int) -> dict[str, int]:
    """Forward matmul FLOPs of one pre-training step by component, and `train` = 3 x the forward total.

    Per step the Swin and BERT encoders each run on 2B inputs (full and masked), the fusion on 2B
    [video ; text] sequences, h_V and h_T on B vectors each, the MLM head on B x L tokens.
    """
    video_cfg, text_cfg = config.video, config.text
    hidden, embed = text_cfg.hidden_size, config.embed_dim
    temporal, spatial = config.video_token_shape
    video_tokens = temporal * spatial
    v_out = video_cfg.out_dim
    parts = {
        "swin": 2 * batch * swin3d_forward_flops(video_cfg, config.num_frames, config.image_size, config.image_size),
        "g_v": 2 * batch * (dense_flops(1, v_out, 2 * embed) + dense_flops(1, 2 * embed, embed)),
        "bert": 2 * batch * bert_layers_forward_flops(text_cfg, text_length, text_cfg.num_layers),
        "g_t": 2 * batch * (dense_flops(1, hidden, hidden) + dense_flops(1, hidden, embed)),
        "fusion": 2 * batch * (
            (dense_flops(video_tokens, v_out, hidden) if v_out != hidden else 0)
            + bert_layers_forward_flops(text_cfg, video_tokens + text_length, config.fusion_layers)
        ),
        "h_v+h_t": batch * (dense_flops(1, hidden, 2 * embed) + dense_flops(1, 2 * embed, embed)
                            + dense_flops(1, hidden, hidden) + dense_flops(1, hidden, embed)),
        "mlm_head": batch * (dense_flops(text_length, hidden, hidden)
                             + dense_flops(text_length, hidden, text_cfg.vocab_size)),
        # 2 NCE calls x 3 similarity matrices, plus the monitoring cosine matrix.
        "losses": 7 * 2 * batch * batch * embed,
    }
    parts["forward"] = sum(parts.values())
    parts["train"] = 3 * parts["forward"]
    return parts
