"""Damaged checkpoints and reused workdirs, end to end on the `:tiny` config (subprocesses, 2 CPU devices).

One uninterrupted run writes checkpoints at steps 2, 4 and 6. Copies of its workdir then get their
newest checkpoint's data files cut in half: eval falls back to step 4, and continuing the run resumes
from step 4 and reproduces the uninterrupted run's losses at steps 5 and 6 bit for bit. A workdir
also refuses a config whose state would not fit it, and the entry points answer user mistakes with
one line and exit status 2.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clover_jax.checkpoint import load_params
from clover_jax.convert.common import flatten

REPO = pathlib.Path(__file__).resolve().parents[2]
TOTAL = 6


def _train(cli_env, workdir, *extra, timeout=900):
    args = [sys.executable, "-m", "clover_jax.train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
            "--config.log_every=1", "--config.checkpoint_every=2", "--config.keep_checkpoints=5",
            f"--config.data.cache_dir={cli_env['CLOVER_TEST_DATA_CACHE']}", *extra]
    return subprocess.run(args, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=timeout)


def _eval(cli_env, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "clover_jax.eval", *args], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=timeout)


def _losses(workdir) -> dict[int, float]:
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def _cut_data_files_in_half(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """Truncates every array data file of a checkpoint step (OCDBT `d/` files) to half its size."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, sorted(str(p) for p in step_dir.rglob("*"))
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return files


@pytest.fixture(scope="module")
def finished_run(cli_env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    proc = _train(cli_env, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6]
    return workdir, proc


@pytest.fixture()
def damaged_copy(finished_run, tmp_path):
    """A copy of the finished run whose step-6 checkpoint has every data file cut in half."""
    workdir = tmp_path / "damaged"
    shutil.copytree(finished_run[0], workdir)
    _cut_data_files_in_half(workdir / "checkpoints" / "6")
    return workdir


def test_terminal_shows_progress_and_results_not_library_logs(finished_run):
    workdir, proc = finished_run
    assert "I1" not in proc.stderr and "checkpoint_manager.py" not in proc.stderr, proc.stderr[-3000:]
    assert "step 6/6" in proc.stdout and "retrieval on " in proc.stdout
    log = (workdir / "logs" / "train.log").read_text()
    assert "checkpoint_manager.py" in log  # orbax's INFO lines went to the file


def test_eval_falls_back_to_the_previous_checkpoint(cli_env, damaged_copy):
    proc = _eval(cli_env, f"--workdir={damaged_copy}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    fallback = [line for line in proc.stdout.splitlines() if "cannot be restored" in line]
    assert len(fallback) == 1 and "checkpoint step 6 at" in fallback[0] and "trying step 4" in fallback[0]
    assert "step 4" in proc.stdout.splitlines()[-5]  # the table's title names the restored step
    assert (damaged_copy / "checkpoints" / "6").is_dir()  # eval deletes and moves nothing
    print(fallback[0])


def test_continuing_resumes_from_the_older_checkpoint_bit_identically(cli_env, finished_run, damaged_copy):
    uninterrupted = _losses(finished_run[0])
    proc = _train(cli_env, damaged_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 6 at" in proc.stdout and "workdir checkpoint step 4" in proc.stdout, proc.stdout
    resumed = _losses(damaged_copy)  # steps 5 and 6 were logged again by the resumed run
    print(f"uninterrupted losses 5, 6: {uninterrupted[5]!r}, {uninterrupted[6]!r}; "
          f"resumed from 4: {resumed[5]!r}, {resumed[6]!r}")
    assert resumed == uninterrupted
    moved = list((damaged_copy / "damaged_checkpoints").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("6_")  # set aside, not deleted
    want, got = flatten(load_params(finished_run[0])), flatten(load_params(damaged_copy))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_no_readable_checkpoint_stops_listing_what_was_tried(cli_env, finished_run, tmp_path):
    workdir = tmp_path / "all_damaged"
    shutil.copytree(finished_run[0], workdir)
    for step in (2, 4, 6):
        _cut_data_files_in_half(workdir / "checkpoints" / str(step))
    proc = _eval(cli_env, f"--workdir={workdir}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and all(f"step {s}:" in errors[0] for s in (6, 4, 2)), errors
    print(errors[0][:300])


def test_a_workdir_refuses_a_config_whose_state_would_not_fit(cli_env, finished_run, tmp_path):
    workdir = tmp_path / "other_model"
    shutil.copytree(finished_run[0], workdir)
    proc = _train(cli_env, workdir, "--config.model.preset=small", timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and 'model.preset: "tiny" in the workdir, "small" now' in errors[0], errors
    assert "--config.init_from=" in errors[0] and "--workdir" in errors[0]
    print(errors[0])


def test_a_longer_run_continues_and_logs_the_allowed_difference(cli_env, finished_run, tmp_path):
    workdir = tmp_path / "longer"
    shutil.copytree(finished_run[0], workdir)
    proc = _train(cli_env, workdir, "--config.total_steps=7", "--config.eval.report_queries=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    note = [line for line in proc.stdout.splitlines() if "config differs from" in line]
    assert len(note) == 1 and "total_steps 6 -> 7" in note[0] and "eval.report_queries 20 -> 5" in note[0], note
    assert "workdir checkpoint step 6" in proc.stdout and "step 7/7" in proc.stdout


@pytest.mark.parametrize("case", ["empty_workdir", "missing_workdir", "missing_checkpoint_file", "bad_config_json"])
def test_eval_user_mistakes_end_in_one_line(cli_env, tmp_path, case):
    if case == "empty_workdir":
        (tmp_path / "w").mkdir()
        args = [f"--workdir={tmp_path / 'w'}"]
    elif case == "missing_workdir":
        args = [f"--workdir={tmp_path / 'absent'}"]
    elif case == "missing_checkpoint_file":
        (tmp_path / "w").mkdir()
        args = [f"--workdir={tmp_path / 'w'}", "--config=configs/pretrain.py:tiny",
                f"--checkpoint={tmp_path / 'nothing'}"]
    else:
        (tmp_path / "w").mkdir()
        (tmp_path / "w" / "config.json").write_text("{not json")
        args = [f"--workdir={tmp_path / 'w'}"]
    proc = _eval(cli_env, *args, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    print(case, "->", lines[0])
