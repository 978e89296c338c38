"""A workdir's config.json against a new run's config: state-shaping differences stop the run in one line,
the others are allowed and listed (in-process, no model)."""
import json

import pytest

from clover_jax.workdir_config import WorkdirConfigError, check_workdir_config, config_differences
from configs.pretrain import get_config


@pytest.fixture()
def workdir(tmp_path):
    saved = get_config("tiny").to_dict()
    # A run saved before `microbatches` and `model.attention` existed.
    saved.pop("microbatches", None)
    saved["model"].pop("attention", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    return tmp_path


def test_allowed_differences_are_listed(workdir):
    new = get_config("tiny")
    new.total_steps, new.log_every, new.microbatches = 12, 1, 2
    new.model.attention, new.compilation_cache_dir, new.eval.batch_size = "dense", "", 4
    note = check_workdir_config(workdir, new.to_dict(), has_checkpoint=True)
    for part in ("total_steps 6 -> 12", "log_every 2 -> 1", 'microbatches <absent> -> 2',
                 'model.attention <absent> -> "dense"', "eval.batch_size 8 -> 4"):
        assert part in note, note
    assert "\n" not in note


@pytest.mark.parametrize("key, value, shown", [
    ("model.preset", "small", 'model.preset: "tiny" in the workdir, "small" now'),
    ("optim.grad_clip", 0.0, "optim.grad_clip: 15.0 in the workdir, 0.0 now"),
    ("data.image_size", 64, "data.image_size: 56 in the workdir, 64 now"),
    ("task", "retrieval", 'task: "pretrain" in the workdir, "retrieval" now'),
])
def test_state_shaping_differences_stop_in_one_line(workdir, key, value, shown):
    new = get_config("tiny")
    section, _, leaf = key.rpartition(".")
    (new[section] if section else new)[leaf] = value
    with pytest.raises(WorkdirConfigError) as info:
        check_workdir_config(workdir, new.to_dict(), has_checkpoint=True)
    message = str(info.value)
    assert shown in message and "--workdir" in message and f"--config.init_from={workdir}" in message
    assert "\n" not in message
    # Without a checkpoint there is no state to clash with: allowed, and listed.
    assert key in check_workdir_config(workdir, new.to_dict(), has_checkpoint=False)


def test_unreadable_config_json_says_what_to_do(tmp_path):
    (tmp_path / "config.json").write_text("{half")
    with pytest.raises(WorkdirConfigError, match="another --workdir"):
        check_workdir_config(tmp_path, get_config("tiny").to_dict(), has_checkpoint=True)
    assert check_workdir_config(tmp_path / "absent", {}, has_checkpoint=False) is None


def test_identical_configs_say_nothing():
    config = get_config("tiny").to_dict()
    assert config_differences(config, config) == ({}, {})
