"""`peers`: the one line a survivor prints when another process of a run is lost, which errors read like a
lost process, and `PeerWatch.verdict` on a collective error while every process still answers (the
multi-process behaviour itself: tests/end_to_end/test_multihost.py)."""
import time

from clover_jax import peers


def test_lost_peer_message_names_the_process_and_the_resume_step(tmp_path):
    assert peers.lost_peer_message(tmp_path, [1], 15) == (
        "error: process 1 stopped answering (coordination timeout 15 s); rerunning the same command on all hosts "
        "starts again "
        "from step 0 (no checkpoint was finished)")
    for step in (2, 4):
        (tmp_path / "checkpoints" / str(step) / "state").mkdir(parents=True)
    (tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # unfinished: not counted
    assert peers.lost_peer_message(tmp_path, [0]) == (
        "error: process 0 (the coordinator) stopped answering; rerunning the same command on all hosts resumes "
        f"from step 4 ({tmp_path / 'checkpoints' / '4'})")
    assert peers.lost_peer_message(tmp_path, None, 15).startswith("error: another process stopped answering; ")


def test_collective_errors_of_a_lost_peer_are_recognised():
    assert peers.looks_like_lost_peer(RuntimeError("INTERNAL: Gloo all-reduce failed: Connection closed by peer"))
    assert peers.looks_like_lost_peer(RuntimeError("UNAVAILABLE: The following tasks are unhealthy"))
    assert not peers.looks_like_lost_peer(ValueError("batch size 3 does not divide by 2"))


class _AllAlive:
    """A coordination client whose every process answers."""

    def get_live_nodes(self, processes):
        time.sleep(0.05)
        return {p: 1 for p in processes}


def test_a_collective_error_with_every_process_alive_is_raised_again(monkeypatch, tmp_path):
    from jax._src import distributed

    monkeypatch.setattr(distributed.global_state, "client", _AllAlive())
    monkeypatch.setattr(distributed.global_state, "num_processes", 2)
    monkeypatch.setattr(distributed.global_state, "process_id", 0)
    watch = peers.PeerWatch(tmp_path, timeout_s=30)
    try:
        start = time.monotonic()
        watch.verdict(ValueError("not a collective"))  # returns at once
        watch.verdict(RuntimeError("Gloo: Connection closed by peer"))  # returns once all answered again
        assert time.monotonic() - start < 5
    finally:
        watch._stopped.set()
