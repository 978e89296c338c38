"""VideoQA fine-tuning on the synthetic clips (reference §5.2), from the demo pre-training checkpoint.

  python -m clover_jax.train --workdir=/tmp/h9_demo --config.data.cache_dir=/tmp/clover_cache   # demo ckpt
  python -m clover_jax.train --config=configs/qa_synthetic.py:open --workdir=/tmp/h9_open \
      --config.init_from=/tmp/h9_demo --config.data.cache_dir=/tmp/clover_cache
  python -m clover_jax.train --config=configs/qa_synthetic.py:mc --workdir=/tmp/h9_mc \
      --config.init_from=/tmp/h9_demo --config.data.cache_dir=/tmp/clover_cache
  python -m clover_jax.eval --workdir=/tmp/h9_open        # prints the QA accuracy again

Variants (the part after ':'):
  open  (default) Open-ended attribute questions (`data_pipelines.synthetic_qa`): 4 per clip (colour,
        shape, count, motion) over the demo's 1024 training clips, answered from a 21-answer vocabulary
        by `Clover.qa_open_ended` (fused [CLS] -> Dropout, Linear, LN, GELU, Linear). Test: 1024
        questions on the 256 held-out clips. Baselines: the majority training answer ("one") scores
        9.2%; knowing the question kind alone (its most frequent answer) scores 23.2%.
  mc    5-way multiple choice: caption-style options (`qa.mc_format="full"` gives §5.2's
        question + " Options: " + all options + " Answer: " + option, with qa.text_length=96), each
        distractor one attribute away from its neighbour (the text alone gives 1/5); 2 items per
        training clip, 1 per test clip, scored by `Clover.qa_multiple_choice`. Chance: 20%.
  tiny  The test size (with open or mc): the tiny pre-training dataset (32/16 clips), a few steps.

The model (tiny Clover, 4 frames at 56²) and the synthetic dataset are the demo's, so `init_from`
loads every pre-trained tensor and only the QA head starts fresh; the head gets 10x the lr
(`optim.lr_multipliers`), AdamW lr 3e-4, 500 steps of batch 16, warm-up 25, cosine.
Measured on 2 shared CPU cores (demo checkpoint of the default pretrain config):
  open: accuracy ≈ see the report of task H9 (must beat 9.2% by >= 20 points); mc: see the same.
"""
from __future__ import annotations

import ml_collections

from configs import pretrain
from configs.common import parse_arg
from data_pipelines.synthetic_qa import ANSWERS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, open=False, mc=False, tiny=False)
    if a.open and a.mc:
        raise ValueError("choose one of the variants 'open' and 'mc'")
    c = pretrain.get_config("tiny" if a.tiny else None)
    c.task = "qa_multiple_choice" if a.mc else "qa_open_ended"
    head = "mc_head" if a.mc else "qa_head"
    if a.mc:
        c.model.overrides.multiple_choice = True
    else:
        c.model.overrides.num_answers = len(ANSWERS)
    # The synthetic clips of the demo (same seed and sizes: the cache is reused, nothing re-rendered).
    c.qa = dict(dataset="synthetic", seed=0, text_length=16, mc_format="caption", mc_per_clip=2)
    c.data.text_masking = "none"
    c.total_steps, c.log_every, c.checkpoint_every = 500, 50, 250
    c.optim.lr = 3e-4
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 25
    c.optim.lr_multipliers = {head: 10.0}
    if a.tiny:
        c.total_steps, c.log_every, c.checkpoint_every = 4, 2, 4
        c.optim.warmup_steps = 1
        c.qa.mc_per_clip = 1
    return c
