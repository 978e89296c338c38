"""Every run config builds, is lockable, and fine-tuning models load pre-training checkpoints' shapes."""
import ml_collections
import pytest

from clover_jax.convert.common import flatten
from clover_jax.evaluators import entries
from clover_jax.models.clover import abstract_params
from clover_jax.run_setup import load_config_file, model_config_from, resolve_durations
from configs import finetune_qa
from data_pipelines.input import qa_tasks

FILES = ["configs/pretrain.py", "configs/pretrain.py:tiny", "configs/pretrain.py:base",
         "configs/qa_synthetic.py:open", "configs/qa_synthetic.py:mc",
         "configs/finetune_retrieval.py:msrvtt", "configs/finetune_retrieval.py:didemo",
         "configs/finetune_retrieval.py:lsmdc", "configs/finetune_retrieval.py:demo",
         "configs/finetune_retrieval.py:msrvtt_mc", "configs/finetune_retrieval.py:msrvtt_mc,tiny",
         "configs/finetune_retrieval.py:msrvtt,tiny",
         *(f"configs/finetune_qa.py:{t}" for t in finetune_qa.TASKS),
         "configs/finetune_qa.py:msvd_qa,tiny"]


@pytest.mark.parametrize("spec", FILES)
def test_config_builds_and_locks(spec):
    config = load_config_file(spec)
    config.lock()
    with pytest.raises(AttributeError):
        config.optim.lrr = 1.0
    model_config_from(config)  # valid model fields and values


@pytest.mark.parametrize("variant", ["msrvtt", "didemo", "lsmdc"])
def test_retrieval_finetuning_accepts_the_base_pretraining_params(variant):
    """init_from needs identical parameter shapes: 12-frame fine-tuning keeps the 8-frame fusion tables."""
    shapes = lambda spec: {k: v.shape for k, v in flatten(abstract_params(  # noqa: E731
        model_config_from(load_config_file(spec)))).items()}
    assert shapes(f"configs/finetune_retrieval.py:{variant}") == shapes("configs/pretrain.py:base")


@pytest.mark.parametrize("variant", ["msrvtt_qa", "tgif_action"])
def test_qa_finetuning_loads_every_base_pretraining_tensor(variant):
    """init_from the base pre-training run fills everything but the fresh QA head."""
    shapes = lambda spec: {k: v.shape for k, v in flatten(abstract_params(  # noqa: E731
        model_config_from(load_config_file(spec)))).items()}
    qa = shapes(f"configs/finetune_qa.py:{variant}")
    head = {k for k in qa if k.split("/")[0] in ("qa_head", "mc_head")}
    assert head and {k: v for k, v in qa.items() if k not in head} == shapes("configs/pretrain.py:base")


def test_qa_config_needs_exactly_one_task():
    with pytest.raises(ValueError, match="exactly one"):
        load_config_file("configs/finetune_qa.py:tiny")


def test_bad_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid"):
        load_config_file("configs/finetune_retrieval.py:msvd")


@pytest.mark.parametrize("spec", FILES)
def test_every_evaluator_entry_is_valid_and_best_metric_names_a_scheduled_one(spec):
    config = load_config_file(spec)
    for name in entries.evaluator_names(config):
        settings = entries.settings_of(config, name)
        assert settings.every_steps >= -1 and settings.split and settings.batch_size > 0
    scheduled = entries.evaluator_names(config, scheduled_only=True)
    assert config.best_metric.partition("/")[0] in scheduled
    for name in scheduled:
        if config.evals[name].get("every_epochs", 0) > 0:  # 64 steps per epoch
            assert entries.settings_of(config, name, 64.0).every_steps == round(64 * config.evals[name].every_epochs)


def test_qa_recipes_cover_exactly_the_qa_sources_and_take_their_task():
    assert finetune_qa.TASKS == tuple(qa_tasks.SOURCE_TASKS)
    assert set(finetune_qa._RECIPES) == set(qa_tasks.SOURCE_TASKS)
    for source, task in qa_tasks.SOURCE_TASKS.items():
        assert load_config_file(f"configs/finetune_qa.py:{source}").task == task


def test_unknown_evaluator_keys_and_types_are_named():
    config = load_config_file("configs/pretrain.py:tiny")
    config.evals.retrieval.every_step = 5
    with pytest.raises(ValueError, match="every_step"):
        entries.settings_of(config, "retrieval")
    config = load_config_file("configs/pretrain.py:tiny")
    config.evals.retrieval.type = "recall"
    with pytest.raises(ValueError, match="'retrieval', 'qa', 'multiple_choice'"):
        entries.settings_of(config, "retrieval")


def test_epochs_resolve_to_steps_from_the_training_examples():
    config = load_config_file("configs/finetune_retrieval.py:msrvtt")  # 100 epochs, 10 warm-up, batch 128
    durations = resolve_durations(config, 9000)
    assert durations.steps_per_epoch == 9000 / 128
    assert (durations.total_steps, durations.warmup_steps) == (7032, 704)  # ceil(100 * 70.3125), ceil(703.125)
    assert "9000 training examples, batch 128: 1 epoch = 70.3 steps" in durations.describe(9000, 128)
    demo = load_config_file("configs/pretrain.py")  # given in steps: the split size only describes them
    assert (resolve_durations(demo, 1024).total_steps, resolve_durations(demo, 1024).warmup_steps) == (400, 25)
    with pytest.raises(ValueError, match="no example"):
        resolve_durations(demo, 0)


def test_official_replicas_are_the_official_runs_gpu_counts():
    """`loss.official_replicas` (for contrastive_grad_scale="official"): num_gpus x machines of the official
    pretrain_webvid_cc3m (8 x 4) and finetune_{msrvtt_retrieval, didemo, lsmdc_retrieval} (8, 8, 8 x 2)."""
    from configs import finetune_retrieval, pretrain

    assert pretrain.get_config("base").loss.official_replicas == 32
    got = {name: finetune_retrieval.get_config(name).loss.official_replicas for name in ("msrvtt", "didemo", "lsmdc")}
    assert got == {"msrvtt": 8, "didemo": 8, "lsmdc": 16}
    assert pretrain.get_config("base").loss.contrastive_grad_scale == "global"  # the default stays the paper's


# The reference evaluates after every epoch; pre-training keeps the best Recall@all, the fine-tunings the
# best epoch by the first metric their evaluation returns (save_best "auto"): Recall@1, acc, overall_acc.
OFFICIAL_SELECTION = {
    "configs/pretrain.py:base": ("retrieval", "retrieval/recall_all"),
    "configs/pretrain.py:tiny": ("retrieval", "retrieval/recall_all"),
    **{f"configs/finetune_retrieval.py:{v}{t}": ("retrieval", "retrieval/t2v_r1")
       for v in ("msrvtt", "didemo", "lsmdc") for t in ("", ",tiny")},
    "configs/finetune_retrieval.py:msrvtt_mc": ("msrvtt_mc", "msrvtt_mc/mc_accuracy"),
    "configs/finetune_retrieval.py:msrvtt_mc,tiny": ("msrvtt_mc", "msrvtt_mc/mc_accuracy"),
    **{f"configs/finetune_qa.py:{t}{v}": ("qa", "qa/accuracy") for t in finetune_qa.TASKS for v in ("", ",tiny")},
}


@pytest.mark.parametrize("spec", sorted(OFFICIAL_SELECTION))
def test_recipes_evaluate_every_epoch_and_keep_the_official_best(spec):
    config = load_config_file(spec)
    evaluator, metric = OFFICIAL_SELECTION[spec]
    assert entries.evaluator_names(config, scheduled_only=True) == [evaluator]
    assert config.evals[evaluator].every_epochs == 1.0 and config.evals[evaluator].every_steps == 0
    assert (config.best_metric, config.best_mode) == (metric, "max")


def test_msrvtt_multiple_choice_has_its_own_fine_tune():
    """Reference finetune_msrvtt_mc.py: 2 videos x 8 GPUs, 8 frames (32 at test), text 30, 100 epochs
    (10 warm-up), lr 1.2e-5, wd 0.01, clip 5."""
    c = load_config_file("configs/finetune_retrieval.py:msrvtt_mc")
    assert c.task == "retrieval" and c.evals.msrvtt_mc.type == "multiple_choice"
    assert (c.data.batch_size, c.data.num_frames, c.eval.num_frames, c.data.text_length, c.eval.text_length) == (
        16, 8, 32, 30, 30)
    assert (c.total_epochs, c.optim.warmup_epochs, c.optim.lr, c.optim.weight_decay, c.optim.grad_clip) == (
        100.0, 10.0, 1.2e-5, 0.01, 5.0)
    assert c.data.flip_prob == 0.0 and c.data.text_masking == "none"
    tiny = load_config_file("configs/finetune_retrieval.py:msrvtt_mc,tiny")
    assert tiny.data.sources.synthetic.dataset == "synthetic" and tiny.total_steps == 6  # 2 epochs of 3 steps
    with pytest.raises(ValueError, match="tiny"):
        load_config_file("configs/finetune_retrieval.py:demo,tiny")


def test_mixture_order_and_mode_switch(tmp_path):
    """Ours: sorted names (CC3M first), each stream on its own; the reference's: WebVid first and its epoch."""
    from clover_jax.run_inputs import train_mixture

    base = load_config_file("configs/pretrain.py:base")
    assert (base.data.mixture_mode, tuple(base.data.source_order)) == ("alternate", ())
    data = base.data
    for name in ("webvid", "cc3m"):
        (tmp_path / name).mkdir()
        data.sources[name].dataset = str(tmp_path / name)
    ours = train_mixture(data)
    assert [s.name for s in ours.sources] == ["cc3m", "webvid"] and ours.mode == "alternate"
    data.update(mixture_mode="alternate_official", source_order=("webvid", "cc3m"))
    official = train_mixture(data)
    assert [s.name for s in official.sources] == ["webvid", "cc3m"] and official.mode == "alternate_official"
    # A source's stream does not depend on the order.
    assert {s.name: s.input for s in official.sources} == {s.name: s.input for s in ours.sources}
    data.source_order = ("webvid",)
    with pytest.raises(ValueError, match="source_order"):
        train_mixture(data)


@pytest.mark.parametrize("spec", ["configs/pretrain.py:base", "configs/pretrain.py:tiny",
                                  "configs/finetune_retrieval.py:lsmdc", "configs/finetune_qa.py:tgif_action,tiny"])
def test_official_variant_selects_every_official_switch(spec):
    """`,official` = the per-item switches of the rows where ours differs on purpose; nothing else changes."""
    ours, official = load_config_file(spec), load_config_file(spec + ",official")
    assert (ours.pixel_stats, ours.loss.contrastive_grad_scale) == ("auto", "global")
    assert (official.pixel_stats, official.loss.contrastive_grad_scale) == ("official", "official")
    both = sorted(ours.data.sources) == ["cc3m", "webvid"]
    assert (official.data.mixture_mode, tuple(official.data.source_order)) == (
        ("alternate_official", ("webvid", "cc3m")) if both else (ours.data.mixture_mode, ()))
    switched = {"pixel_stats", "loss.contrastive_grad_scale", "loss.mlm_mean", "data.mixture_mode", "data.source_order"}
    switched |= {"data.frame_sampling", "data.epoch_unit", "data.mask_fill", "data.word_budget", "data.random_ids",
                 "data.epoch_order", "data.sources.cc3m.resize_method", "data.train_crop", "data.crop_sampler"}
    switched |= {"optim.schedule", "optim.decay_rules", "optim.schedule_by_epoch", "optim.warmup_init_ratio"}

    def flat(c, prefix=""):
        out = {}
        for k, v in c.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else {f"{prefix}{k}": v})
        return out

    splits = official.data.batch_size % official.loss.official_replicas == 0
    assert official.loss.mlm_mean == ("per_replica" if splits else "global") and ours.loss.mlm_mean == "global"
    a, b = flat(ours), flat(official)
    assert {k for k in a if a[k] != b[k]} <= switched and set(a) == set(b)
