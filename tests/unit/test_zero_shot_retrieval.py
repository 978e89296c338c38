"""The named zero-shot retrieval recipes (configs/zero_shot_retrieval.py): text lengths, test views, evaluator."""
from __future__ import annotations

import pytest

from clover_jax.evaluators import entries
from clover_jax.run_setup import load_config_file, model_config_from
from configs import pretrain, zero_shot_retrieval


@pytest.mark.parametrize("name, text_length", [("msrvtt", 30), ("didemo", 64), ("lsmdc", 40)])
def test_recipe_evaluates_one_dataset_at_its_text_length(name, text_length):
    c = zero_shot_retrieval.get_config(name)
    assert entries.evaluator_names(c, scheduled_only=True) == [name]
    s = entries.settings_of(c, name)
    assert (s.text_length, s.num_frames, s.image_size, s.crop, s.split, s.dataset) == (
        text_length, 32, 224, "centre", "test", "")  # the dataset folder comes from --config.eval.dataset
    assert c.evals[name].type == "retrieval" and c.best_metric == ""
    assert c.model.to_dict() == pretrain.get_config("base").model.to_dict()
    assert zero_shot_retrieval.get_config(f"{name},official").pixel_stats == "official"


def test_msrvtt_matches_the_pretraining_validation():
    base = entries.settings_of(pretrain.get_config("base"), "retrieval")
    assert entries.settings_of(zero_shot_retrieval.get_config("msrvtt"), "msrvtt").to_dict() == base.to_dict()


def test_tiny_runs_on_synthetic_clips_and_bad_args_fail():
    s = entries.settings_of(zero_shot_retrieval.get_config("lsmdc,tiny"), "lsmdc")
    assert (s.dataset, s.text_length) == ("synthetic", pretrain.get_config("tiny").eval.text_length)
    for arg in ("", "didemo,lsmdc"):
        with pytest.raises(ValueError, match="choose one dataset"):
            zero_shot_retrieval.get_config(arg)


@pytest.mark.parametrize("spec", ["didemo", "lsmdc,tiny", "msrvtt,official"])
def test_config_file_builds_and_locks(spec):
    config = load_config_file(f"configs/zero_shot_retrieval.py:{spec}")
    config.lock()
    with pytest.raises(AttributeError):
        config.eval.text_lenght = 1
    model_config_from(config)
