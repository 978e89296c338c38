"""Clover pre-training. `python -m clover_jax.train --config=configs/pretrain.py[:variant] --workdir=DIR`.

Variants (the part after ':'; `--config.x=…` overrides any scalar):
  (default) / demo  The embedded demo: tiny Clover (Swin3D 32-d, BERT 2x64, 1 fusion layer) on the
          built-in synthetic dataset (coloured shapes that move; generated on first use, no download),
          4 frames at 64², batch 16, on CPU. Then zero-shot retrieval on 256 held-out synthetic clips.
          2 CPU cores: about 5 minutes; expect text->video R@10 far above its 3.9% chance value.
  tiny    The test size: the demo with 6 steps on a 24-clip dataset (seconds of training), on base's
          schedule in miniature: an epoch is 3 steps, zero-shot retrieval after each (steps 3 and 6),
          and the best `retrieval/recall_all` kept in <workdir>/best.
  base    The paper's recipe (reference §4): Swin3D-B + bert-base-uncased + 3 fusion layers, 8 frames at
          224², global batch 1024, AdamW lr 5e-5 wd 0.005 betas (0.9, 0.98), cosine with 4 warm-up
          epochs from 1e-3x to 1e-3x, grad clip 15, bf16 compute, WebVid-2M and CC3M alternating.
          The Swin runs clip by clip, each clip rematerialised (model.video_batching=per_clip), the text
          and fusion encoders without remat (model.remat=none): the TPU compile table's choice, 6.8 GiB per
          v5p chip at 32 clips (benchmarks/results/2026-12-05-base-compile-table.md);
          `python -m clover_jax.compile --config=configs/pretrain.py:base --topology=v5p-32` reports its memory.
          Supply the prepared folders: --config.data.sources.webvid.dataset=… and
          --config.data.sources.cc3m.dataset=…, and the MSR-VTT 1k-A test folder as --config.eval.dataset.
          Hardware: 32 A100/H100-class GPUs or a v4-64 TPU slice. 40 epochs (4 warm-up), an epoch being
          one pass over both prepared sources: steps are resolved from their sizes at start. Expected
          zero-shot MSR-VTT R@1/5/10 ≈ 26.4/49.5/60.0 (paper, 5M pairs).
          Start it as the paper does with --config.init_from=<converter output> from
          `python -m clover_jax.convert --source official_swin3d … --bert-dir bert-base-uncased/`: that
          loads the Swin, the text encoder, fusion layers 0-2 and BERT's MLM head (`cls.predictions.*`,
          as the official `BertForMaskedLM.from_pretrained` head; untied from the text encoder).
          As the reference: zero-shot retrieval after every epoch, <workdir>/best keeps the best
          `Recall@all` (= t2v R@1+R@5+R@10-MdR, `retrieval/recall_all`). WebVid and CC3M take turns
          (CC3M first: sorted names), each source's stream running on by itself.
  official  with any variant: the official code's behaviour where ours differs on purpose (README,
          "Official recipe"): BGR pixels (pixel_stats=official), the contrastive gradient / the official
          run's 32 GPUs (loss.contrastive_grad_scale=official) and the official alternation (WebVid
          first; once the shorter source runs out every step draws from its fresh pass:
          data.mixture_mode=alternate_official, data.source_order=('webvid','cc3m')); mmcv's lr formula
          (optim.schedule=mmcv_cosine) and weight-decay rules (optim.decay_rules=official).
  Ablations (the paper's ablation rows, clover-reference §6), words composable with any variant above and
  with each other (`:base,no_tma`, `:tiny,no_ranking,random_mask`); `ABLATIONS` lists the keys each sets:
  no_tma         pair-wise alignment only: video-text NCE + MLM, no fused or masked candidates, no ranking.
  pairwise       loss.alignment=pairwise alone: video-text NCE, the ranking terms kept.
  no_masked      tri-modal alignment without masked samples: candidates (full, fused), no ranking (what
                 the official use_Cmask=False meant; its code path crashes).
  no_ranking     without the pair-wise ranking loss.
  no_mlm         without MLM (no MLM head runs).
  no_video_mask  no video block masking: no masked-video pass, z_V = h_V(Fuse(V, T)), the masked-video
                 candidate and rank_text_anchor dropped; the pipeline draws no masks.
  random_mask    random whole-word text masking (non-stop words) instead of semantic (nouns, verb phrases).
  The loss's metrics hold only the terms a run computes (`losses.active_terms`).
"""
from __future__ import annotations

import ml_collections

from clover_jax.defaults import default_loss_config, default_optim_config
from clover_jax.kernels.execution import default_kernels_config
from configs.common import apply_official, parse_arg, split_official


def _source(dataset: str, num_frames: int = 0, weight: float = 1.0) -> ml_collections.ConfigDict:
    # resize_method: "bilinear" or "bicubic" (the official CC3M crop; `common.apply_official`).
    return ml_collections.ConfigDict(dict(dataset=dataset, num_frames=num_frames, weight=weight,
                                          resize_method="bilinear"))


# The paper's ablations (clover-reference §6) as words after ':': {word: {dotted config key: value}}.
ABLATIONS = {
    "no_tma": {"loss.alignment": "pairwise", "loss.ranking": False},
    "pairwise": {"loss.alignment": "pairwise"},
    "no_masked": {"loss.masked_candidates": False, "loss.ranking": False},
    "no_ranking": {"loss.ranking": False},
    "no_mlm": {"loss.mlm": False},
    "no_video_mask": {"loss.video_masking": False, "data.mask_cells": 0},
    "random_mask": {"data.text_masking": "random_whole_word"},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe `arg` names; add `official` for the official code's behaviour (`common.apply_official`)
    and any `ABLATIONS` words."""
    arg, official = split_official(arg)
    chosen = parse_arg(arg, demo=False, tiny=False, base=False, **dict.fromkeys(ABLATIONS, False))  # names all
    c = _recipe(",".join(w for w in arg.split(",") if w.strip() not in ABLATIONS))
    for word in (w for w in ABLATIONS if chosen[w]):
        for key, value in ABLATIONS[word].items():
            section, name = key.split(".")
            c[section][name] = value
    return apply_official(c) if official else c


def _recipe(arg: str) -> ml_collections.ConfigDict:
    a = parse_arg(arg, demo=False, tiny=False, base=False)
    c = ml_collections.ConfigDict()
    c.task = "pretrain"
    c.seed = 0
    c.total_steps = 400
    c.total_epochs = 0.0  # > 0: the run's length in epochs of the training data (wins over total_steps)
    c.log_every = 50
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.resume = ""
    c.init_from = ""
    c.init_from_include = ()  # e.g. ("text_encoder",) for a partial load
    c.mesh = dict(data=-1, fsdp=1, model=1)
    # ((logical axis, mesh axes), ...) in priority order; () is `clover_jax.partitioning.LOGICAL_RULES`.
    c.sharding_rules = ()
    c.compilation_cache_dir = "~/.cache/clover_jax/xla"  # "" disables the persistent XLA cache
    c.microbatches = 1  # > 1: the step runs the batch in this many chunks (gradient caching, same result)
    # Pixel statistics (clover_jax.pixel_stats): "imagenet_rgb" (RGB frames, ImageNet mean/std), "official"
    # (the official code: frames reversed to BGR, normalised with the BGR-ordered statistics) or "auto":
    # "official" when the weights come from an official Clover checkpoint, else "imagenet_rgb".
    c.pixel_stats = "auto"

    # From scratch at width 64, BERT's 0.02 init leaves the [CLS] state almost input-independent
    # (cos ~0.99998 between captions) and the contrastive loss collapses; 1/sqrt(64) keeps it informative.
    # remat: "none", "full" or a jax.checkpoint_policies name (clover_jax/models/layers.py REMAT_POLICIES).
    # video_batching: "batched" (one Swin call over the batch) or "per_clip" (a rematerialised scan over clips).
    c.model = dict(preset="tiny", dtype="float32", remat="none", video_batching="batched",
                   h_v_input="text_cls",
                   overrides={"text_overrides": {"initializer_range": 0.125}, "video_overrides": {"init_std": 0.1}})

    # How backend-dependent ops run (clover_jax/kernels/execution.py): "auto" takes the mesh platform's choice,
    # printed at start-up; clip_groups 0 = auto; `cpu` holds the CPU kernels' host-tuned sizes.
    c.kernels = default_kernels_config()

    c.data = dict(
        # mixture_mode: "alternate", "alternate_official" or "weighted" (data_pipelines.input.mixtures);
        # source_order: the turn order of `sources` by name (() = sorted names).
        sources={"synthetic": _source("synthetic")}, mixture_mode="alternate", source_order=(), split="train",
        cache_dir="", synthetic=dict(seed=0, num_train=1024, num_test=256, num_frames=8, size=64,
                                     captions_per_clip=3),
        batch_size=16, num_frames=4, image_size=56, crop_area=(0.6, 1.0), flip_prob=0.0,
        mask_grid=7, mask_cells=10, mask_min_block=4, text_length=16, text_masking="semantic",
        seed=0, prefetch=2,
        # Issue 31 switches (data_pipelines/input; `,official` sets the official value, README "Official recipe"):
        # crop_sampler "tf_box" | "mmaction"; train_crop "random_resized" | "squash"; frame_sampling "segments" |
        # "mmaction"; epoch_unit "clip" | "caption"; epoch_order "reshuffle" | "fixed"; mask_fill "exact" |
        # "official"; word_budget "words" | "tokens" (random_whole_word); random_ids "regular" | "any".
        crop_sampler="tf_box", train_crop="random_resized", frame_sampling="segments", epoch_unit="clip",
        epoch_order="reshuffle", mask_fill="exact", word_budget="words", random_ids="regular",
        # A record whose chunk fails its checksum stops training in one line (`prepare --verify` lists them all);
        # skip_damaged_records=True reads past it (counted as damaged_records), up to max_damaged_fraction.
        skip_damaged_records=False, max_damaged_fraction=0.01,
    )
    # text_masking (`text_masking.MASK_MODES`): "semantic" = the official rule; "semantic_dedup" = the previous
    # rule (k from distinct candidate words; with data prepared by `prepare --tag-rule cased_caption`).
    # Input settings every evaluator starts from; each `evals` entry may override any of them.
    c.eval = dict(dataset="synthetic", split="test", batch_size=32, num_frames=4, image_size=56,
                  text_length=16, report_queries=20, num_views=1,
                  crop="centre",  # "squash": the whole frame resized to a square (the official QA tests)
                  view_sampling="interleaved")  # num_views > 1: "interleaved" or "tgif_clips" (tf_ops)
    # Evaluators (`clover_jax.evaluators.entries`): every_steps N > 0 also runs one every N steps, 0 only
    # after the last step, -1 only on demand (`python -m clover_jax.eval --evaluator=NAME`); every_epochs
    # > 0 counts in epochs of the training data instead.
    c.evals = dict(retrieval=dict(type="retrieval", every_steps=0, every_epochs=0.0),
                   msrvtt_mc=dict(type="multiple_choice", every_steps=-1, file=""))
    c.best_metric = "retrieval/t2v_r1"  # "<evaluator>/<metric>" kept in <workdir>/best; "" keeps none
    c.best_mode = "max"

    c.optim = default_optim_config()
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.005
    c.optim.warmup_steps = 25
    c.loss = default_loss_config()

    if a.tiny:
        c.total_steps, c.log_every, c.checkpoint_every = 6, 2, 3
        c.data.synthetic.num_train, c.data.synthetic.num_test = 24, 16  # 3 steps an epoch: 6 steps = 2 epochs
        c.data.batch_size, c.eval.batch_size = 8, 8
        c.optim.warmup_steps = 2
        c.evals.retrieval.every_epochs = 1.0  # base's schedule and selection in miniature
        c.best_metric = "retrieval/recall_all"
    if a.base:
        c.model = dict(preset="base", dtype="bfloat16", remat="none", video_batching="per_clip",
                       h_v_input="text_cls",
                       overrides={})
        c.data.sources = {"webvid": _source("", 8), "cc3m": _source("", 1)}
        c.data.update(batch_size=1024, num_frames=8, image_size=224, crop_area=(0.08, 1.0), mask_grid=7,
                      mask_cells=10, mask_min_block=4, text_length=30)
        c.eval.update(dataset="", batch_size=256, num_frames=32, image_size=224, text_length=30)
        c.total_epochs = 40.0  # an epoch visits every captioned clip of both sources once
        c.log_every, c.checkpoint_every, c.keep_checkpoints = 100, 2000, 3
        c.optim = default_optim_config()  # lr 5e-5, wd 0.005, betas (0.9, 0.98), clip 15
        c.optim.warmup_epochs = 4.0
        c.evals.retrieval.every_epochs = 1.0  # the reference evaluates after every epoch ...
        c.best_metric = "retrieval/recall_all"  # ... and keeps the best Recall@all (R@1+R@5+R@10-MdR, t2v)
    return c
