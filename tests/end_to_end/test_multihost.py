"""Multi-process training on one machine: a 2-process run (2 CPU devices each) equals a 1-process run.

`python -m clover_jax.train --config=configs/pretrain.py:tiny` is launched as two processes that meet at a
coordinator on 127.0.0.1 (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), each with 2
virtual CPU devices, so the mesh is {"data": 4} spread over 2 processes: every process reads its half of
each global batch, the loss and gradients need cross-process collectives (gloo, jax's CPU default), and
the checkpoint is written by both processes together. The same config then runs as 1 process with 4
devices (same mesh shape), and once more as 1 process resuming the 2-process run's step-2 checkpoint
(`config.resume`). Asserted: same per-step losses, same parameters at steps 2 and 4, and the resumed run
continues exactly (losses of steps 3-4 and the final parameters).

A lost host: process 1 of a 2-process run is killed (-9) after step 3; process 0 must leave within
`--coordination_timeout` (and a margin) with exit status 3 and one line naming process 1 and the step a
rerun resumes from, and rerunning both processes must resume right after that checkpoint.

Adam's eps is set to 1e-3 (as in test_clover_train.py): with the reference 1e-8, an entry whose gradient
is pure rounding noise (e.g. attention key biases, which get no gradient in exact arithmetic) moves by
about lr * sign(noise), so a reduction done in another order flips such updates. The runs here differ only
in how the cross-device sums are done, which is exactly that kind of rounding.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

from clover_jax.checkpoint import finished_steps, load_params
from clover_jax.convert.common import flatten

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 600  # per launch; a tiny run takes 1-4 minutes on a loaded 2-core machine
TOTAL_STEPS = 4
RESUME_STEP = 2
TOLERANCE = 1e-5
OVERRIDES = (
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.log_every=1",
    f"--config.checkpoint_every={RESUME_STEP}",  # checkpoints at steps 2 and 4 (keep_checkpoints=2)
    "--config.optim.eps=1e-3",  # see the module docstring
    # no scheduled evaluation and no best checkpoint: the tests compare losses and parameters only
    "--config.evals.retrieval.every_epochs=0", "--config.evals.retrieval.every_steps=-1", "--config.best_metric=",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(num_devices: int, distributed: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: `num_devices` CPU devices (replacing conftest's 8), no stray coordinator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(distributed or {})
    return env


def _tail(log: pathlib.Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace").splitlines() if log.exists() else ["<no log>"]
    return "\n".join(text[-lines:])


def _launch(workdir: pathlib.Path, cache_dir: pathlib.Path, num_processes: int, devices_per_process: int,
            extra: tuple[str, ...] = ()) -> list[pathlib.Path]:
    """Runs one training job as `num_processes` processes; returns their log files. Fails (after killing
    whatever still runs) when any process exits non-zero or the job outlives RUN_TIMEOUT_S."""
    cmd = [sys.executable, "-m", "clover_jax.train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
           f"--config.data.cache_dir={cache_dir}", f"--config.compilation_cache_dir={cache_dir / 'xla'}",
           *OVERRIDES, *extra]
    workdir.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for pid in range(num_processes):
        dist = (dict(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(num_processes),
                     JAX_PROCESS_ID=str(pid)) if num_processes > 1 else None)
        log = workdir.parent / f"{workdir.name}.process{pid}.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(devices_per_process, dist),
                                          stdout=out, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = now  # the others may wait forever at a collective: give them a moment, then kill
        if now > deadline or (failed_at is not None and now > failed_at + 30):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            break
        time.sleep(0.5)
    codes = [p.returncode for p in procs]
    if any(codes):
        report = "\n".join(f"--- process {i} (exit {c}), {log}:\n{_tail(log)}" for i, (c, log) in
                           enumerate(zip(codes, logs)))
        pytest.fail(f"training launch {cmd} with {num_processes} process(es) failed or timed out after "
                    f"{RUN_TIMEOUT_S}s:\n{report}")
    return logs


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def _params(workdir: pathlib.Path, step: int) -> dict[str, np.ndarray]:
    return flatten(load_params(workdir / "checkpoints" / str(step)))


def _max_param_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[float, str]:
    """Largest |got - want| / max(|want|, 1e-2) over all entries (the floor keeps near-zero biases from
    turning rounding into huge ratios), and the parameter where it occurs."""
    assert sorted(got) == sorted(want), "the two checkpoints hold different parameter trees"
    worst = (0.0, "")
    for key, w in want.items():
        assert got[key].shape == w.shape, f"{key}: shape {got[key].shape} vs {w.shape}"
        err = float(np.max(np.abs(got[key] - w) / np.maximum(np.abs(w), 1e-2)))
        worst = max(worst, (err, key))
    return worst


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> pathlib.Path:
    """Shared cache_dir for the synthetic dataset (the first, 2-process run builds it on process 0 while
    process 1 waits) and the XLA compilation cache (the resumed run reuses the 1-process run's programs;
    train.py leaves it off for multi-process CPU runs)."""
    return tmp_path_factory.mktemp("synthetic_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_cache) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("multihost")
    out = {"two_process": root / "two_process", "one_process": root / "one_process",
           "resumed": root / "resumed_as_one_process"}
    timings = {}
    t = time.monotonic()
    out["two_process_logs"] = _launch(out["two_process"], synthetic_cache, num_processes=2, devices_per_process=2)
    timings["2 processes x 2 devices"] = time.monotonic() - t
    t = time.monotonic()
    _launch(out["one_process"], synthetic_cache, num_processes=1, devices_per_process=4)
    timings["1 process x 4 devices"] = time.monotonic() - t
    t = time.monotonic()
    resume_from = out["two_process"] / "checkpoints" / str(RESUME_STEP)
    _launch(out["resumed"], synthetic_cache, num_processes=1, devices_per_process=4,
            extra=(f"--config.resume={resume_from}",))
    timings[f"1 process resuming step {RESUME_STEP}"] = time.monotonic() - t
    print("\nlaunch wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return out


def test_two_processes_really_ran(runs):
    for pid, log in enumerate(runs["two_process_logs"]):
        text = log.read_text(errors="replace")
        assert "4 devices, 2 processes" in text, f"process {pid} did not join a 2-process run:\n{_tail(log)}"
        assert "mesh {'data': 4, 'fsdp': 1, 'model': 1}" in text, _tail(log)
        steps = [line.split()[1] for line in text.splitlines() if line.startswith("step ")]
        assert steps == [f"{s}/{TOTAL_STEPS}" for s in range(1, TOTAL_STEPS + 1)], f"process {pid}: {steps}"
    assert "4 devices, 1 processes" in (runs["one_process"].parent / "one_process.process0.log").read_text()


def test_same_losses_per_step(runs):
    two, one = _losses(runs["two_process"]), _losses(runs["one_process"])
    print("\nstep  loss (2 processes)  loss (1 process)  rel diff")
    for s in sorted(one):
        print(f"{s:4d}  {two.get(s, float('nan')):18.8f}  {one[s]:16.8f}  {abs(two.get(s, np.nan) / one[s] - 1):.2e}")
    assert sorted(two) == sorted(one) == list(range(1, TOTAL_STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)], rtol=TOLERANCE, atol=0)
    assert one[1] != one[TOTAL_STEPS], "the loss did not change: the runs did not train"


@pytest.mark.parametrize("step", [RESUME_STEP, TOTAL_STEPS])
def test_same_parameters(runs, step):
    err, where = _max_param_error(_params(runs["two_process"], step), _params(runs["one_process"], step))
    print(f"\nstep {step}: params max rel error 2 processes vs 1 process {err:.2e} ({where})")
    assert err <= TOLERANCE, f"step {step}: params differ by {err:.2e} at {where}"


def test_two_process_checkpoint_resumes_in_one_process(runs):
    resumed, one = _losses(runs["resumed"]), _losses(runs["one_process"])
    print("\nresumed as 1 process: " + ", ".join(f"step {s} loss {v:.8f} (uninterrupted {one[s]:.8f})"
                                                 for s, v in sorted(resumed.items())))
    assert sorted(resumed) == list(range(RESUME_STEP + 1, TOTAL_STEPS + 1)), "did not resume at the checkpoint"
    np.testing.assert_allclose([resumed[s] for s in sorted(resumed)], [one[s] for s in sorted(resumed)],
                               rtol=TOLERANCE, atol=0)
    err, where = _max_param_error(_params(runs["resumed"], TOTAL_STEPS), _params(runs["one_process"], TOTAL_STEPS))
    print(f"final params max rel error resumed vs uninterrupted 1-process run {err:.2e} ({where})")
    assert err <= TOLERANCE, f"resumed run's params differ by {err:.2e} at {where}"


LOST_TIMEOUT_S = 15  # --coordination_timeout of the lost-host run
EXIT_MARGIN_S = 45  # on top of it: the heartbeat checks, a loaded machine
KILL_AFTER_STEP = 3


def test_a_lost_process_ends_the_survivor_in_one_line_and_the_rerun_resumes(synthetic_cache, tmp_path):
    """kill -9 of process 1 after step 3: process 0 leaves with exit status 3 within the coordination
    timeout, printing one line that names process 1 and the step a rerun resumes from (no traceback, no
    native stack on its terminal); rerunning both processes resumes right after that checkpoint."""
    workdir = tmp_path / "lost_host"
    extra = (f"--coordination_timeout={LOST_TIMEOUT_S}",)
    cmd = [sys.executable, "-m", "clover_jax.train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
           f"--config.data.cache_dir={synthetic_cache}", *OVERRIDES, *extra]
    coordinator = f"127.0.0.1:{_free_port()}"
    dist = [dict(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid)) for pid in (0, 1)]
    out0, err0, err1 = tmp_path / "p0.stdout", tmp_path / "p0.stderr", tmp_path / "p1.stderr"
    with open(out0, "w") as o0, open(err0, "w") as e0, open(err1, "w") as e1:
        survivor = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(2, dist[0]), stdout=o0, stderr=e0, text=True)
        victim = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(2, dist[1]), stdout=subprocess.PIPE, stderr=e1,
                                  text=True)
    try:
        victim_lines = []
        for line in victim.stdout:
            victim_lines.append(line)
            if line.startswith(f"step {KILL_AFTER_STEP}/"):
                victim.kill()
                break
        killed_at = time.monotonic()
        victim.wait(timeout=60)
        assert victim.returncode == -9, "".join(victim_lines) + err1.read_text()
        code = survivor.wait(timeout=LOST_TIMEOUT_S + EXIT_MARGIN_S)
        took = time.monotonic() - killed_at
    finally:
        for p in (survivor, victim):
            if p.poll() is None:
                p.kill()
                p.wait()
    terminal = out0.read_text() + err0.read_text()
    print(f"\nprocess 0 left {took:.1f} s after the kill with exit status {code}; its terminal:\n{terminal}")
    assert code == 3, f"{terminal}\n{_tail(workdir / 'logs' / 'train.process0.log')}"
    assert took <= LOST_TIMEOUT_S + EXIT_MARGIN_S
    try:
        step = finished_steps(workdir)[1][0]
        resume = f"resumes from step {step} ({workdir / 'checkpoints' / str(step)})"
    except FileNotFoundError:  # killed before the first save finished
        step, resume = 0, "starts again from step 0"
    lines = terminal.splitlines()
    lost = [line for line in lines if "stopped answering" in line]
    assert len(lost) == 1 and lost[0].startswith(f"error: process 1 stopped answering (coordination timeout "
                                                 f"{LOST_TIMEOUT_S} s); "
                                                 f"rerunning the same command on all hosts {resume}"), terminal
    build = ("prepare train:", "prepare test:", "Downloading and preparing dataset", "Dataset clover_video_text")
    ours = [line for line in lines if line.strip() and not line.startswith(build)]  # unless the dataset was built
    assert not [line for line in ours if not line.startswith(("clover_jax: ", "step ", "error: "))], terminal
    assert "Traceback" not in terminal and "Check failure" not in terminal and "Fatal Python error" not in terminal
    assert "[Gloo] Rank 0" in (workdir / "logs" / "train.process0.log").read_text()  # gloo's C++ prints: there

    logs = _launch(workdir, synthetic_cache, num_processes=2, devices_per_process=2, extra=extra)
    for pid, log in enumerate(logs):
        steps = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("step ")]
        print(f"rerun, process {pid}: first step line {steps[0] if steps else None}")
        assert steps == [f"{s}/{TOTAL_STEPS}" for s in range(step + 1, TOTAL_STEPS + 1)], _tail(log)
