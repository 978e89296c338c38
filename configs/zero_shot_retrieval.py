"""Zero-shot text->video retrieval of a pre-trained model (reference §5.1): the dual encoder, no fine-tuning.

  mkdir -p W && python -m clover_jax.eval --workdir=W --config=configs/zero_shot_retrieval.py:didemo \
      --checkpoint=PRETRAIN_WORKDIR/best --config.eval.dataset=DIDEMO_TEST_FOLDER

writes W/eval/didemo_step{N}.json (and .html). Variants (one 32-frame view, centre crop 224):
  msrvtt  MSR-VTT 1k-A, text length 30: the pre-training recipe's own validation (pretrain.py:base's
          `retrieval` evaluator). Paper R@1/5/10/MdR 26.4/49.5/60.0/6.
  didemo  paragraph retrieval (captions = joined sentences, `prepare --format didemo`), text length 64.
          Paper 29.5/55.2/66.3/4.
  lsmdc   text length 40. Paper 14.7/29.2/38.2/24.
  tiny    with one of the above: its evaluator on the synthetic test clips and the tiny model (CPU).
  official  BGR pixels (`common.apply_official`); a converted official checkpoint selects them by itself.
The model is pretrain.py:base's (or :tiny's); --checkpoint takes a pre-training workdir's best/, a step
folder, or a converter output.
"""
from __future__ import annotations

import ml_collections

from configs import pretrain
from configs.common import apply_official, parse_arg, split_official

TEXT_LENGTH = {"msrvtt": 30, "didemo": 64, "lsmdc": 40}  # test text lengths, reference §4 and §5.1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The zero-shot evaluation `arg` names (one of TEXT_LENGTH, optionally with tiny and official)."""
    arg, official = split_official(arg)
    a = parse_arg(arg, tiny=False, **dict.fromkeys(TEXT_LENGTH, False))
    chosen = [name for name in TEXT_LENGTH if a[name]]
    if len(chosen) != 1:
        raise ValueError(f"choose one dataset of {tuple(TEXT_LENGTH)}, got {chosen or 'none'}")
    name = chosen[0]
    c = pretrain.get_config("tiny" if a.tiny else "base")
    if not a.tiny:
        c.eval.update(num_frames=32, image_size=224, crop="centre", text_length=TEXT_LENGTH[name])
    c.evals = {name: dict(type="retrieval", every_steps=0, every_epochs=0.0)}
    c.best_metric = ""
    return apply_official(c) if official else c
