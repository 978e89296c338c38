"""Restoring picks the newest checkpoint that reads and holds finite values; damaged ones are reported in
one line each and never deleted (in-process, tiny pytrees)."""
import numpy as np
import pytest

from clover_jax import checkpoint as ckpt_lib


@pytest.fixture()
def three_steps(tmp_path):
    manager = ckpt_lib.make_manager(tmp_path, save_every=1, keep=10, async_save=False)
    for step, value in ((1, 1.0), (2, 2.0), (3, np.nan)):
        params = {"w": np.full((3,), value, np.float32), "count": np.arange(2)}
        ckpt_lib.save(manager, step, {"params": params}, {"step": step}, force=True)
    manager.wait_until_finished()
    manager.close()
    return tmp_path


def test_a_non_finite_newest_checkpoint_is_skipped(three_steps, capsys):
    params, step = ckpt_lib.load_params_and_step(three_steps)
    assert step == 2 and np.all(params["w"] == 2.0)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "checkpoint step 3 at" in out[0] and "NaN or inf" in out[0] and "trying step 2" in out[0]
    assert (three_steps / "checkpoints" / "3").is_dir()


def test_an_explicit_step_folder_is_the_only_one_tried(three_steps):
    with pytest.raises(ckpt_lib.NoReadableCheckpointError, match=r"tried step 3: ValueError: 1 arrays hold NaN"):
        ckpt_lib.load_params(three_steps / "checkpoints" / "3")
    assert np.all(ckpt_lib.load_params(three_steps / "checkpoints" / "1")["w"] == 1.0)


def test_unreadable_steps_fall_back_and_none_readable_lists_every_step(three_steps, capsys):
    for step in (2, 1):
        for f in (three_steps / "checkpoints" / str(step) / "state").rglob("*"):
            if f.is_file() and f.parent.name == "d":
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ckpt_lib.NoReadableCheckpointError) as info:
        ckpt_lib.load_params(three_steps)
    message = str(info.value)
    assert "\n" not in message and all(f"step {s}:" in message for s in (3, 2, 1)), message
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    assert sorted(p.name for p in (three_steps / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]


def test_missing_and_empty_folders_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt_lib.load_params(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        ckpt_lib.load_params(tmp_path)
