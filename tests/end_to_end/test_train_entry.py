"""End-to-end tests of `python -m clover_jax.train` / `python -m clover_jax.eval` on the `:tiny` config.

One uninterrupted run is the reference. A second run is stopped by SIGTERM, resumed, killed with
SIGKILL while checkpoints are being written every step, and resumed again: its loss sequence and final
parameters must equal the reference's exactly. The eval CLI must reproduce the run's printed metrics.
"""
import json
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from clover_jax.checkpoint import checkpoint_dir_and_step, load_params
from clover_jax.convert.common import flatten

REPO = pathlib.Path(__file__).resolve().parents[2]
TOTAL = 6


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "clover_jax.train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
            "--config.log_every=1", "--config.checkpoint_every=100", *extra]


def _run(cli_env, workdir, *extra, timeout=600):
    args = _cmd(workdir, *extra) + [f"--config.data.cache_dir={cli_env['CLOVER_TEST_DATA_CACHE']}"]
    return subprocess.run(args, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=timeout)


def _run_until(cli_env, workdir, marker, sig, *extra):
    """Starts training, sends `sig` once stdout shows `marker`; returns (returncode, stdout)."""
    args = _cmd(workdir, *extra) + [f"--config.data.cache_dir={cli_env['CLOVER_TEST_DATA_CACHE']}"]
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(marker):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + (rest or "")


def _losses(workdir) -> dict[int, float]:
    """Step -> loss from metrics.jsonl (a re-logged step keeps its last value)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def _table(stdout: str) -> list[str]:
    """The last retrieval table printed (the run evaluates after every epoch, then the eval CLI once)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("retrieval on "))
    return lines[start:start + 5]


@pytest.fixture(scope="module")
def reference(cli_env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    proc = _run(cli_env, workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


def test_resume_after_sigterm_and_kill9_matches_uninterrupted_run(cli_env, reference, tmp_path):
    ref_dir, _ = reference
    want = _losses(ref_dir)
    assert sorted(want) == list(range(1, TOTAL + 1))

    # SIGTERM: the step finishes, a checkpoint is saved and waited for, exit 0.
    code, out = _run_until(cli_env, tmp_path, "step 2/", signal.SIGTERM)
    assert code == 0 and "received signal" in out, out
    stopped = checkpoint_dir_and_step(tmp_path)[1]
    assert 2 <= stopped < TOTAL

    # Resume with a checkpoint every step and SIGKILL it mid-run (saves are async, so one is in flight).
    code, out = _run_until(cli_env, tmp_path, f"step {stopped + 1}/", signal.SIGKILL, "--config.checkpoint_every=1")
    assert code == -signal.SIGKILL
    assert f"workdir checkpoint step {stopped}" in out
    survived = checkpoint_dir_and_step(tmp_path)[1]  # the newest *finished* checkpoint
    assert survived >= stopped
    load_params(tmp_path)  # restorable

    proc = _run(cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"workdir checkpoint step {survived}" in proc.stdout
    got = _losses(tmp_path)
    print(f"stopped at {stopped} (SIGTERM), resumed from {survived} after SIGKILL; losses {got}")
    assert got == want  # bit-identical loss sequence
    ref_params, params = flatten(load_params(ref_dir)), flatten(load_params(tmp_path))
    assert ref_params.keys() == params.keys()
    for key in ref_params:
        np.testing.assert_array_equal(params[key], ref_params[key], err_msg=key)


def test_eval_cli_reproduces_the_run_metrics(cli_env, reference):
    ref_dir, train_out = reference
    trained = json.loads((ref_dir / "eval" / f"retrieval_step{TOTAL}.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "clover_jax.eval", f"--workdir={ref_dir}"], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _table(proc.stdout) == _table(train_out)
    assert json.loads((ref_dir / "eval" / f"retrieval_step{TOTAL}.json").read_text()) == trained
    html = (ref_dir / "eval" / f"retrieval_step{TOTAL}.html").read_text()
    assert html.count("<img") >= 5 and "data:image/png;base64," in html


def test_run_evaluates_every_epoch_and_keeps_the_best_recall_all(reference):
    """`:tiny` is `:base`'s schedule in miniature: 24 clips at batch 8 = 3 steps an epoch, zero-shot
    retrieval after each epoch, and <workdir>/best holds the step of the highest `retrieval/recall_all`."""
    ref_dir, _ = reference
    rows = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in rows if "retrieval/recall_all" in r}
    assert sorted(evaluated) == [3, 6] and [evaluated[s]["epoch"] for s in (3, 6)] == [1.0, 2.0]
    best = json.loads((ref_dir / "best" / "best.json").read_text())
    top = max(evaluated, key=lambda s: (evaluated[s]["retrieval/recall_all"], -s))  # ties keep the earlier
    assert best["metric"] == "retrieval/recall_all" and best["step"] == top
    assert best["value"] == evaluated[top]["retrieval/recall_all"]
    assert sorted(int(p.name) for p in (ref_dir / "best").iterdir() if p.name.isdigit()) == [top]


def test_config_typo_and_bad_batch_fail_in_one_line(cli_env, tmp_path):
    proc = _run(cli_env, tmp_path, "--config.optim.lrr=1", timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and "lrr" in lines[0] and '"lr"' in lines[0], proc.stderr[-2000:]

    proc = _run(cli_env, tmp_path, "--config.data.batch_size=3", timeout=300)  # 2 devices
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and "batch size 3" in lines[0] and "by 2" in lines[0], proc.stderr[-2000:]


def test_eval_cli_scores_msrvtt_style_multiple_choice(cli_env, reference, tmp_path):
    """The MSR-VTT MC format over the run's eval clips; an item whose clip is absent counts as wrong."""
    from data_pipelines.build.built_splits import split_index

    ref_dir, _ = reference
    config = json.loads((ref_dir / "config.json").read_text())
    folder = next(pathlib.Path(cli_env["CLOVER_TEST_DATA_CACHE"]).glob("tfds/*/synthetic_*/*"))
    assert config["eval"]["split"] == "test"
    videos = split_index(folder, "test").video_id
    options = ["a red circle moves to the left", "two blue squares spin around", "a green cross stays in place",
               "three white diamonds bounce up and down", "a purple triangle moves upwards"]
    rows = [{"qid": i, "clip_name": v, "options": options, "answer": str(i % 5)} for i, v in enumerate(videos)]
    rows.append({"qid": len(rows), "clip_name": "not_in_the_split", "options": options, "answer": "0"})
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in rows))
    proc = subprocess.run([sys.executable, "-m", "clover_jax.eval", f"--workdir={ref_dir}", "--evaluator=msrvtt_mc",
                           f"--config.evals.msrvtt_mc.file={mc}"],
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ref_dir / "eval" / f"msrvtt_mc_step{TOTAL}.json").read_text())
    print(proc.stdout.splitlines()[-1])
    assert result["num_items"] == len(videos) + 1 and result["num_missing_clip"] == 1
    assert 0.0 <= result["mc_accuracy"] <= 100.0 * len(videos) / (len(videos) + 1)
    assert "multiple choice (dual encoder)" in proc.stdout
