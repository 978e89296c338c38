"""Multi-process runs: a process that stops answering ends every survivor with one line saying how to resume.

`run_setup.init_distributed` joins with `jax_enable_recoverability` on and JAX's heartbeat timeout set to
`--coordination_timeout`: without it the coordination service, once a process misses its heartbeats,
aborts every other process natively (a C++ stack trace after about a minute). `PeerWatch` instead asks the
coordination service which processes are alive (a blocking call every process makes about once a second,
which returns without a process once its heartbeats stopped for the timeout, or fails when the coordinator
itself is gone) and ends this process with `lost_peer_message` and exit status 3. A step blocked in a
collective with the dead process is ended the same way; a step whose collective fails first (gloo:
"Connection closed by peer") is handed to `PeerWatch.verdict` by the entry point. `PeerWatch.finish` ends
a finished run in order: every process marks itself finished (its leaving is then no loss), meets the
others at a barrier, and process 0, which hosts the service, disconnects last.
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import threading
import time
from typing import NoReturn

from clover_jax.checkpoint import finished_steps

DEFAULT_TIMEOUT_S = 100  # JAX's own heartbeat timeout
EXIT_STATUS = 3
POLL_S = 1.0
FINISHED_KEY = "clover_jax/finished"  # set by a process whose work is done: its leaving is no loss
FINISH_BARRIER_S = 3600  # how long a finished process waits for the others (a lost one is caught sooner)
# Error texts of a collective or coordination call whose other end went away.
PEER_ERROR_MARKERS = ("connection closed by peer", "connection reset by peer", "gloo", "unavailable",
                      "deadline_exceeded", "heartbeat", "coordination service", "socket closed", "broken pipe")


def looks_like_lost_peer(error: BaseException) -> bool:
    """Whether `error` reads like a collective or coordination call that lost the process at its other end."""
    text = f"{type(error).__name__} {error}".lower()
    return any(marker in text for marker in PEER_ERROR_MARKERS)


def lost_peer_message(workdir: str | pathlib.Path, lost: list[int] | None = None, timeout_s: int | None = None) -> str:
    """One line: which process stopped answering (`lost`; None: not known) and the step a rerun resumes from
    (the newest finished checkpoint under `workdir`)."""
    who = ("another process" if not lost else
           f"process {lost[0]}" if len(lost) == 1 else "processes " + ", ".join(map(str, lost)))
    if lost == [0]:
        who += " (the coordinator)"
    silence = f" (coordination timeout {timeout_s} s)" if timeout_s and lost and lost != [0] else ""
    try:
        ckpt_dir, steps = finished_steps(workdir)
        resume = f"resumes from step {steps[0]} ({ckpt_dir / str(steps[0])})"
    except FileNotFoundError:
        resume = "starts again from step 0 (no checkpoint was finished)"
    return f"error: {who} stopped answering{silence}; rerunning the same command on all hosts {resume}"


def exit_lost_peer(message: str) -> NoReturn:
    """Prints `message` on the terminal and leaves at once: the coordination client's shutdown barrier would
    otherwise wait for the dead process and abort natively."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.shutdown()
    os._exit(EXIT_STATUS)


class PeerWatch:
    """A daemon thread that ends this process (`exit_lost_peer`) once another process of the run stops
    answering; `finish()` when this process's work is done."""

    def __init__(self, workdir: str | pathlib.Path, timeout_s: int):
        from jax._src import distributed  # the client jax.distributed.initialize made

        self.workdir, self.timeout_s = pathlib.Path(workdir), timeout_s
        self._client = distributed.global_state.client
        self._processes = list(range(distributed.global_state.num_processes))
        self._me = distributed.global_state.process_id
        self._stopped = threading.Event()
        self._all_alive_since = float("-inf")  # start time of the newest check that found every process alive
        self._thread = threading.Thread(target=self._run, name="clover_jax-peer-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            started = time.monotonic()
            try:  # returns once every live process asked; a silent one drops out after the heartbeat timeout
                alive = self._client.get_live_nodes(self._processes)
                lost = [p for p in self._processes if p not in alive]
            except Exception:  # noqa: BLE001 - the coordinator is gone (or, on process 0, the service broke)
                lost = [0] if self._me != 0 else [-1]
            lost = [p for p in lost if not self._finished(p)]  # a process that finished may leave
            if self._stopped.is_set():
                break
            if lost:
                exit_lost_peer(lost_peer_message(self.workdir, [p for p in lost if p >= 0], self.timeout_s))
            self._all_alive_since = started
            time.sleep(POLL_S)

    def _finished(self, process: int) -> bool:
        try:
            self._client.key_value_try_get(f"{FINISHED_KEY}/{process}")
            return True
        except Exception:  # noqa: BLE001 - not set, or no coordinator left to ask
            return False

    def finish(self) -> None:
        """This process's work is done: says so, waits for every process to get here (the watch still
        running: a process lost meanwhile ends this one), then leaves the coordination service in order
        (process 0, which hosts it, last: a process whose coordinator left first aborts natively at exit)."""
        from jax._src import distributed

        try:
            self._client.key_value_set(f"{FINISHED_KEY}/{self._me}", "1")
            self._client.wait_at_barrier("clover_jax_finished", max(self.timeout_s, FINISH_BARRIER_S) * 1000)
            self._stopped.set()
            if self._me != 0:
                distributed.global_state.shutdown()
                return
            self._thread.join()
            deadline = time.monotonic() + self.timeout_s
            while len(self._client.get_live_nodes(self._processes)) > 1 and time.monotonic() < deadline:
                time.sleep(0.1)  # the others are still disconnecting
        except Exception as err:  # noqa: BLE001 - a barrier or disconnect with a process that is gone
            logging.getLogger("clover_jax.peers").info("finishing", exc_info=err)
            exit_lost_peer(lost_peer_message(self.workdir, None, self.timeout_s))

    def verdict(self, error: BaseException) -> None:
        """For an error raised by a step or a fetch: when it reads like a lost process, waits until the
        watch either names the lost process (and ends this one) or finds every process alive in a check
        started after the error (then returns: the caller re-raises `error`). With neither after the
        timeout and a margin, ends the process naming "another process"."""
        if not looks_like_lost_peer(error):
            return
        failed_at = time.monotonic()
        while time.monotonic() < failed_at + self.timeout_s + 10:
            if self._all_alive_since > failed_at:
                return
            time.sleep(0.2)
        logging.getLogger("clover_jax.peers").info("collective failed", exc_info=error)
        exit_lost_peer(lost_peer_message(self.workdir, None, self.timeout_s))
