"""The terminal of `python -m clover_jax.train` / `clover_jax.eval` shows only our lines; what C++ libraries print
(TF's oneDNN notice, absl's "before absl::InitializeLog()" warning, XLA's I0000/W0000/E0000 records) goes to
the run's log file (`launch.capture_native_output`).

TF_CPP_MIN_LOG_LEVEL is left unset, as a user's shell has it, so TF does print its start-up lines. The first
run builds the synthetic dataset and trains 3 steps; the second resumes it to step 5 with the dataset built
(its whole terminal output is checked line by line), then the eval CLI runs on the result.
"""
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# What train and eval print: our status lines, the step lines, the retrieval table.
OUR_PREFIXES = ("clover_jax: ", "step ", "retrieval on ", "direction ", "text->video ", "video->text ", "chance R@")
NATIVE_MARKERS = ("oneDNN", "absl::InitializeLog", "I0000", "W0000", "E0000")


def _env(cli_env) -> dict[str, str]:
    env = dict(cli_env)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _train(env, workdir, total_steps: int) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "clover_jax.train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
            f"--config.data.cache_dir={env['CLOVER_TEST_DATA_CACHE']}", f"--config.total_steps={total_steps}",
            "--config.log_every=1", "--config.checkpoint_every=1", "--config.evals.retrieval.every_epochs=0",
            "--config.evals.retrieval.every_steps=-1", "--config.best_metric="]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _native_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(marker in line for marker in NATIVE_MARKERS)]


@pytest.fixture(scope="module")
def runs(cli_env, tmp_path_factory):
    env, workdir = _env(cli_env), tmp_path_factory.mktemp("terminal")
    first = _train(env, workdir, 3)  # builds the dataset
    assert first.returncode == 0, first.stderr[-3000:]
    log = workdir / "logs" / "train.log"
    after_first = log.read_text()
    second = _train(env, workdir, 5)
    assert second.returncode == 0, second.stderr[-3000:]
    evaluated = subprocess.run([sys.executable, "-m", "clover_jax.eval", f"--workdir={workdir}",
                                "--evaluator=retrieval"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    return dict(workdir=workdir, first=first, second=second, eval=evaluated, log_after_first=after_first)


def test_no_native_lines_on_the_terminal(runs):
    for name in ("first", "second", "eval"):
        proc = runs[name]
        assert not _native_lines(proc.stdout + proc.stderr), f"{name} run:\n{proc.stdout}\n{proc.stderr}"


def test_a_run_with_the_dataset_built_prints_only_our_lines(runs):
    proc = runs["second"]
    print(f"\nterminal of the resumed run (stdout, then stderr):\n{proc.stdout}---\n{proc.stderr}---")
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    strangers = [line for line in lines if not line.startswith(OUR_PREFIXES)]
    assert not strangers, strangers
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["4/5", "5/5"]
    assert "library logs: " + str(runs["workdir"] / "logs" / "train.log") in proc.stdout
    eval_lines = runs["eval"].stdout.splitlines() + runs["eval"].stderr.splitlines()
    assert not [line for line in eval_lines if not line.startswith(OUR_PREFIXES)], runs["eval"].stdout
    assert any(line.startswith("text->video ") for line in eval_lines)  # the table came out
    assert "library logs: " + str(runs["workdir"] / "logs" / "eval.log") in runs["eval"].stdout


def test_the_native_lines_are_in_the_log_files(runs):
    logs = runs["workdir"] / "logs"
    train_log = (logs / "train.log").read_text()
    first, both = _native_lines(runs["log_after_first"]), _native_lines(train_log)
    assert any("oneDNN custom operations" in line for line in first), runs["log_after_first"][:3000]
    assert any("absl::InitializeLog" in line for line in first)
    assert len(both) > len(first), "the second run's native lines did not reach the log file"
    assert any("oneDNN custom operations" in line for line in _native_lines((logs / "eval.log").read_text()))
