"""The `official` lr schedule against mmcv's formula, and the default schedule unchanged (issue 31 D1, D7, D8).

`_mmcv_lrs` transcribes, in plain Python floats, mmcv 1.3.18's `LrUpdaterHook` (before_train_epoch /
before_train_iter, linear warm-up, `warmup_by_epoch=True`) with `CosineAnnealingLrUpdaterHook.get_lr` and
`annealing_cos` (mmcv/runner/hooks/lr_updater.py), driven the way the official runners drive it
(mmaction/core/runner/clover_runner.py): `MyEpochBasedRunner` advances `iter` every batch;
`MyEpochBasedMultiDatasetRunner` (pre-training) calls the hook once per loader batch but advances `iter`
once per round, with max_iters = max_epochs * len(longest loader).
"""
import math

import jax
import numpy as np
import optax
import pytest

from clover_jax import optim
from clover_jax.run_setup import load_config_file, optim_config, resolve_durations


def _annealing_cos(start, end, factor, weight=1):
    cos_out = math.cos(math.pi * factor) + 1
    return end + 0.5 * weight * (start - end) * cos_out


def _mmcv_lrs(*, base_lr, min_lr_ratio, by_epoch, warmup_epochs, warmup_ratio, max_epochs, epoch_len, loaders=1):
    """The lr of every optimizer step of an official run, as mmcv's hook sets it."""
    warmup_iters = warmup_epochs * epoch_len  # before_train_epoch, warmup_by_epoch=True
    max_iters = max_epochs * epoch_len
    lrs, it = [], 0

    def regular(epoch):
        progress, max_progress = (epoch, max_epochs) if by_epoch else (it, max_iters)
        return _annealing_cos(base_lr, base_lr * min_lr_ratio, progress / max_progress)

    for epoch in range(max_epochs):
        epoch_lr = regular(epoch) if by_epoch else None  # before_train_epoch
        for _ in range(epoch_len):
            for _ in range(loaders):  # before_train_iter, once per loader batch
                reg = epoch_lr if by_epoch else regular(epoch)
                if it < warmup_iters:
                    k = (1 - it / warmup_iters) * (1 - warmup_ratio)
                    lrs.append(reg * (1 - k))
                else:
                    lrs.append(reg)
            it += 1
    return lrs


def _our_lrs(spec, examples_per_epoch, steps):
    config = load_config_file(spec)
    durations = resolve_durations(config, examples_per_epoch)
    _, schedule = optim.make_optimizer(optim_config(config, durations), durations.total_steps)
    with jax.enable_x64(True):
        ours = np.asarray(jax.jit(schedule)(np.asarray(steps, np.int64)))
    f32 = np.asarray(jax.jit(schedule)(np.asarray(steps, np.int32)))
    return config, durations, ours, f32


def _ten_points(total, warmup, epoch):
    """Step 0, inside and at the end of the warm-up, epoch boundaries, the middle and the last step."""
    return sorted({0, 1, warmup // 2, warmup - 1, warmup, epoch - 1, epoch + 1, total // 2 + 3, total - epoch,
                   total - 1})


def _compare(name, want, ours, f32, points, peak):
    """Our lr against mmcv's: exactly equal in float64 at the points and everywhere, float32 within a few ulps."""
    print(f"{name}: step, mmcv lr, ours:", [(s, want[s], ours[s]) for s in points])
    diff = np.abs(ours - want)
    f32_diff = np.abs(f32 - want).max()
    print(f"{name}: max abs diff float64 {diff[points].max()} at 10 points, {diff.max()} over all "
          f"{len(want)} steps; float32 (as training computes it) {f32_diff:.2e} = {f32_diff / peak:.1e} x peak lr")
    assert diff[points].max() == 0.0 and diff.max() == 0.0
    assert f32_diff < 5e-7 * peak  # a few float32 ulps of the peak


def test_official_pretraining_lr_is_mmcvs_formula():
    # Official :base: WebVid-2M (2,492,265 clips) and CC3M (2,864,250 images), batch 1024, 40 epochs, 4 warm-up
    # epochs. The official alternation's epoch: 2 sources x the longer one's ceil(2,864,250 / 1024) = 2798 batches.
    spec = "configs/pretrain.py:base,official"
    longest = math.ceil(2_864_250 / 1024)
    want = _mmcv_lrs(base_lr=5e-5, min_lr_ratio=1e-3, by_epoch=False, warmup_epochs=4, warmup_ratio=1e-3,
                     max_epochs=40, epoch_len=longest, loaders=2)
    steps = np.arange(len(want))
    config, durations, ours, f32 = _our_lrs(spec, 2 * longest * 1024, steps)
    assert (config.optim.schedule, config.optim.schedule_by_epoch) == ("mmcv_cosine", False)
    assert (durations.total_steps, durations.warmup_steps) == (80 * longest, 8 * longest) == (len(want), 22384)
    want = np.asarray(want)
    _compare("pretrain,official", want, ours, f32, _ten_points(len(want), durations.warmup_steps, 2 * longest), 5e-5)
    # The shape issue 31 D1 describes: at epoch 20 the regular curve is at cos(pi/2), half-way.
    assert want[20 * 2 * longest] == pytest.approx(5e-5 * 1e-3 + 0.5 * (5e-5 - 5e-8), rel=1e-15)


def test_official_per_epoch_qa_lr_is_mmcvs_formula():
    # MSRVTT-QA: 158,581 training questions, batch 256 (619.5 -> 620 batches an epoch, drop_last=False),
    # lr 1.2e-5, 20 epochs, 2 warm-up epochs from 1e-4 (D7), min_lr_ratio 0, by_epoch=True (D8).
    spec = "configs/finetune_qa.py:msrvtt_qa,official"
    want = np.asarray(_mmcv_lrs(base_lr=1.2e-5, min_lr_ratio=0.0, by_epoch=True, warmup_epochs=2,
                                warmup_ratio=1e-4, max_epochs=20, epoch_len=620))
    steps = np.arange(len(want))
    config, durations, ours, f32 = _our_lrs(spec, 158_581, steps)
    assert (config.optim.schedule, config.optim.schedule_by_epoch, config.optim.warmup_init_ratio) == (
        "mmcv_cosine", True, 1e-4)
    assert (durations.total_steps, durations.warmup_steps) == (len(want), 1240)
    _compare("msrvtt_qa,official", want, ours, f32, _ten_points(len(want), 1240, 620), 1.2e-5)
    assert len(np.unique(want[1240:1860])) == 1  # held within an epoch after the warm-up


@pytest.mark.parametrize("spec, by_epoch, ratio, rules", [
    ("configs/finetune_qa.py:msvd_qa,official", False, 1e-4, "official_qa"),
    ("configs/finetune_qa.py:tgif_frame,official", False, 1e-4, "official_qa"),
    ("configs/finetune_qa.py:lsmdc_mc,official", False, 1e-4, "official_qa"),
    ("configs/finetune_qa.py:lsmdc_fib,official", False, 1e-4, "official_qa"),
    ("configs/finetune_qa.py:tgif_action,official", True, 1e-4, "official_qa"),
    ("configs/finetune_qa.py:tgif_transition,official", True, 1e-4, "official_qa"),
    ("configs/finetune_retrieval.py:msrvtt,official", True, 1e-3, "official"),
    ("configs/finetune_retrieval.py:didemo,official", True, 1e-3, "official"),
    ("configs/finetune_retrieval.py:lsmdc,official", True, 1e-3, "official"),
    ("configs/finetune_retrieval.py:msrvtt_mc,official", True, 1e-3, "official"),
    ("configs/pretrain.py:base,official", False, 1e-3, "official"),
])
def test_official_variants_take_each_official_lr_config(spec, by_epoch, ratio, rules):
    o = load_config_file(spec).optim
    assert (o.schedule, o.schedule_by_epoch, o.warmup_init_ratio, o.decay_rules) == ("mmcv_cosine", by_epoch,
                                                                                     ratio, rules)


@pytest.mark.parametrize("spec", ["configs/pretrain.py:base", "configs/finetune_qa.py:msrvtt_qa",
                                  "configs/finetune_retrieval.py:msrvtt"])
def test_default_schedule_is_unchanged(spec):
    config = load_config_file(spec)
    assert (config.optim.schedule, config.optim.schedule_by_epoch, config.optim.decay_rules) == (
        "warmup_then_cosine", False, "ours")
    durations = resolve_durations(config, 100_000)
    o = optim_config(config, durations)
    _, schedule = optim.make_optimizer(o, durations.total_steps)
    reference = optax.warmup_cosine_decay_schedule(o.warmup_init_ratio * o.lr, o.lr, durations.warmup_steps,
                                                   durations.total_steps, o.min_lr_ratio * o.lr)
    steps = np.linspace(0, durations.total_steps, 50).astype(np.int32)
    assert durations.steps_per_epoch == 100_000 / config.data.batch_size  # epochs not rounded to whole batches
    np.testing.assert_array_equal(np.asarray(jax.jit(schedule)(steps)), np.asarray(jax.jit(reference)(steps)))


def test_bad_schedule_values_name_the_key():
    with pytest.raises(ValueError, match=r"optim.schedule='cosine'; valid: \['warmup_then_cosine', 'mmcv_cosine'\]"):
        optim.make_optimizer(dict(schedule="cosine"), 10)
    with pytest.raises(ValueError, match="optim.schedule_by_epoch=True needs optim.schedule='mmcv_cosine'"):
        optim.make_optimizer(dict(schedule_by_epoch=True), 10)
    with pytest.raises(ValueError, match=r"optim.decay_rules='mmcv'; valid: \['official', 'official_qa', 'ours'\]"):
        optim.make_optimizer(dict(decay_rules="mmcv"), 10)
