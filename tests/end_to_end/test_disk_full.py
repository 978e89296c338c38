"""A disk that fills up during a checkpoint save: one `error:` line, exit status 2, the earlier checkpoints
intact, and the next start removes the unfinished save's temporary folder (`checkpoint.remove_unfinished_saves`).

The disk is filled for real, from the save of step FULL_AT on: a small driver runs `clover_jax.train` as
`__main__` with `checkpoint.save` wrapped to first set RLIMIT_FSIZE (SIGXFSZ ignored), so tensorstore's writes
of the OCDBT data files fail with EFBIG ("File too large") the way they fail with ENOSPC on a full disk, while
the small log and metrics files still fit.
"""
import pathlib
import subprocess
import sys

from clover_jax.checkpoint import finished_steps, load_params

REPO = pathlib.Path(__file__).resolve().parents[2]
FULL_AT, TOTAL, FILE_LIMIT = 4, 6, 2_000_000
DRIVER = '''
import os, resource, runpy, signal, sys

sys.path.insert(0, os.getcwd())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
from clover_jax import checkpoint

original = checkpoint.save


def save(manager, step, *args, **kwargs):
    if step >= {full_at}:
        manager.wait_until_finished()  # the earlier saves complete while there is room
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    return original(manager, step, *args, **kwargs)


checkpoint.save = save
sys.argv[0] = "clover_jax.train"
runpy.run_module("clover_jax.train", run_name="__main__", alter_sys=True)
'''


def _args(cli_env, workdir) -> list[str]:
    return ["--config=configs/pretrain.py:tiny", f"--workdir={workdir}", f"--config.total_steps={TOTAL}",
            "--config.log_every=1", "--config.checkpoint_every=2",
            f"--config.data.cache_dir={cli_env['CLOVER_TEST_DATA_CACHE']}", "--config.evals.retrieval.every_epochs=0",
            "--config.evals.retrieval.every_steps=-1", "--config.best_metric="]


def test_disk_full_at_a_checkpoint_is_one_line_and_the_next_start_cleans_up(cli_env, tmp_path):
    workdir, driver = tmp_path / "run", tmp_path / "disk_full_driver.py"
    driver.write_text(DRIVER.format(full_at=FULL_AT, limit=FILE_LIMIT))
    proc = subprocess.run([sys.executable, str(driver), *_args(cli_env, workdir)], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=900)
    print(f"\nstderr of the run whose disk filled up:\n{proc.stderr}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # beside the build's bars
    assert len(errors) == 1 and "OCDBT" in errors[0] and proc.stderr.strip().endswith(errors[0]), proc.stderr[-3000:]
    assert f"/checkpoints/{FULL_AT}.orbax-checkpoint-tmp" in errors[0]
    ckpt_dir = workdir / "checkpoints"
    assert finished_steps(workdir)[1] == [FULL_AT - 2]  # the step before the full disk, finished
    leftovers = sorted(p.name for p in ckpt_dir.iterdir() if ".orbax-checkpoint-tmp" in p.name)
    assert leftovers == [f"{FULL_AT}.orbax-checkpoint-tmp"], leftovers
    load_params(ckpt_dir / str(FULL_AT - 2))  # restores

    # Room again: the next start removes the unfinished save in one line and resumes from the finished step.
    proc = subprocess.run([sys.executable, "-m", "clover_jax.train", *_args(cli_env, workdir)], cwd=REPO,
                          env=cli_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    removed = [line for line in proc.stdout.splitlines() if "unfinished checkpoint" in line]
    assert len(removed) == 1 and removed[0].startswith("clover_jax: removed 1 ") and leftovers[0] in removed[0]
    assert f"workdir checkpoint step {FULL_AT - 2}" in proc.stdout
    assert not [p for p in ckpt_dir.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert finished_steps(workdir)[1][0] == TOTAL
