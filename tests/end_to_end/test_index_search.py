"""`python -m clover_jax.index` and `python -m clover_jax.search` end to end (issue 32; subprocesses, 2 CPU devices).

A tiny Clover (`configs/pretrain.py:tiny`, fresh weights saved as two converter outputs, so no training)
indexes a folder of synthetic videos written with `synthetic.write_mp4`, plus a corrupt file, an empty file
and a link leaving the folder. One build is killed with SIGKILL after its first embedded batch and rerun:
it must end with the index an uninterrupted build writes. Then: the other weights are refused in one line,
search prints ranked clips and an HTML page, and an update after adding 3, deleting 2 and changing 1
file embeds exactly 4 clips; then one rewritten with its old size and mtime is embedded again and a touched
one is not (content digests).
"""
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from clover_jax import video_index
from clover_jax.video_clips import clip_windows
from data_pipelines.build import synthetic

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_VIDEOS = 16
SKIPS = "skipped 3 files by reason: {'corrupt': 1, 'empty_file': 1, 'outside_dir': 1}"
MAKE_MODEL = """
import json, pathlib, sys
import flax.linen as nn, jax, orbax.checkpoint as ocp
from clover_jax import run_setup
from clover_jax.models.clover import init_params
out = pathlib.Path(sys.argv[1])
config = run_setup.load_config_file("configs/pretrain.py:tiny")
(out / "config.json").write_text(json.dumps(config.to_dict()))
model_config = run_setup.model_config_from(config)
for seed, name in ((0, "weights_a"), (1, "weights_b")):
    params = nn.unbox(jax.jit(lambda r: init_params(model_config, r))(jax.random.key(seed)))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / name / "params", params, force=True)
    checkpointer.wait_until_finished()
    (out / name / "conversion.json").write_text(json.dumps({"source": "test_fresh_init"}))
"""


def _run(cli_env, module, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=timeout)


def _index_args(workdir, videos, out, weights="weights_a"):
    return ["-m", "clover_jax.index", f"--workdir={workdir}", f"--videos={videos}", f"--out={out}",
            f"--checkpoint={workdir / weights}", "--batch-size=2"]


def _update_reports(cli_env, workdir, videos, out, *lines: str) -> None:
    """Runs an index update of `out` and checks that it succeeds and prints each of `lines`."""
    proc = subprocess.run([sys.executable, *_index_args(workdir, videos, out)], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in lines:
        assert line in proc.stdout, proc.stdout


def _write_video(path: pathlib.Path, index: int) -> None:
    cfg = synthetic.SyntheticConfig(num_frames=8, size=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.write_mp4(path, synthetic.render_clip(synthetic.clip_spec(0, "test", index, cfg), cfg), cfg.fps)


def _name(i: int) -> str:
    return f"{'sub/' if i % 3 == 0 else ''}v{i:02d}.mp4"


@pytest.fixture(scope="module")
def model_dir(cli_env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("model")
    proc = subprocess.run([sys.executable, "-c", MAKE_MODEL, str(workdir)], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    videos = root / "videos"
    for i in range(NUM_VIDEOS):
        _write_video(videos / _name(i), i)
    (videos / "zz_corrupt.mp4").write_bytes(b"not a video at all" * 50)
    (videos / "zz_empty.webm").write_bytes(b"")
    (videos / "notes.txt").write_text("not a video name: not indexed, not a skip")
    _write_video(root / "elsewhere" / "secret.mp4", 99)
    os.symlink(root / "elsewhere" / "secret.mp4", videos / "zz_link.mp4")
    return videos


@pytest.fixture(scope="module")
def builds(cli_env, model_dir, library, tmp_path_factory):
    """A build killed (SIGKILL) after its first embedded batch and rerun, and an uninterrupted build."""
    out = tmp_path_factory.mktemp("indexes")
    killed = subprocess.Popen([sys.executable, *_index_args(model_dir, library, out / "resumed")], cwd=REPO,
                              env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = []
    for line in killed.stderr:
        progress.append(line)
        match = re.match(r"index: (\d+)/(\d+) files, (\d+) clips, [\d.]+ clips/s, ETA \d+:\d\d", line)
        if match and int(match.group(3)) > 0:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    journal_after_kill = sorted(p.name for p in (out / "resumed" / video_index.JOURNAL).glob("*.npz"))
    resumed = subprocess.run([sys.executable, *_index_args(model_dir, library, out / "resumed")], cwd=REPO,
                             env=cli_env, capture_output=True, text=True, timeout=600)
    whole = subprocess.run([sys.executable, *_index_args(model_dir, library, out / "whole")], cwd=REPO,
                           env=cli_env, capture_output=True, text=True, timeout=600)
    return dict(out=out, killed=killed, progress=progress, journal_after_kill=journal_after_kill, resumed=resumed,
                whole=whole)


def _contents(index: pathlib.Path) -> tuple[dict, np.ndarray]:
    manifest = video_index.read_manifest(index)
    return manifest, video_index.read_embeddings(index / manifest["array"])


def test_kill_9_then_rerun_writes_the_uninterrupted_index(builds):
    assert builds["killed"].returncode == -signal.SIGKILL, "".join(builds["progress"])[-2000:]
    assert builds["journal_after_kill"], "the killed build left no journal shard"
    for proc in (builds["resumed"], builds["whole"]):
        assert proc.returncode == 0, proc.stderr[-3000:]
    resumed_clips = re.search(r"(\d+) clips resumed from an interrupted build", builds["resumed"].stdout)
    assert resumed_clips and int(resumed_clips.group(1)) > 0, builds["resumed"].stdout
    manifest_r, emb_r = _contents(builds["out"] / "resumed")
    manifest_w, emb_w = _contents(builds["out"] / "whole")
    assert manifest_r == manifest_w
    assert emb_r.shape == (NUM_VIDEOS, manifest_w["embedding_dim"])
    # Batches of 2 on 2 devices: each device embeds one clip, whatever its batch mates, so rows are bit-identical.
    np.testing.assert_array_equal(emb_r, emb_w)
    np.testing.assert_allclose(np.linalg.norm(emb_w, axis=1), 1.0, atol=1e-5)
    assert not (builds["out"] / "resumed" / video_index.JOURNAL).exists()
    assert sorted(p.name for p in (builds["out"] / "resumed").glob("embeddings-*")) == [manifest_r["array"]]


def test_skips_are_counted_by_reason_and_progress_shows_rate_and_eta(builds):
    whole = builds["whole"]
    assert SKIPS in whole.stdout, whole.stdout
    manifest = video_index.read_manifest(builds["out"] / "whole")
    assert [v["path"] for v in manifest["videos"]] == sorted(_name(i) for i in range(NUM_VIDEOS))
    assert manifest["refused"] == {"zz_link.mp4": "outside_dir"}
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == {"zz_corrupt.mp4": "corrupt",
                                                                    "zz_empty.webm": "empty_file"}
    assert re.search(r"index: 18/18 files, 16 clips, [\d.]+ clips/s, ETA 0:00", whole.stderr), whole.stderr[-2000:]


def test_another_model_is_refused_in_one_line(cli_env, model_dir, library, builds):
    proc = subprocess.run([sys.executable, *_index_args(model_dir, library, builds["out"] / "whole", "weights_b")],
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "was built by another model (weights" in errors[0], errors
    proc = subprocess.run([sys.executable, *_index_args(model_dir, library, builds["out"] / "whole"),
                           "--clip-seconds=0.5"], cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "was built by another model (model config + preprocessing" in errors[0], errors


def test_clip_windows_split_a_video_into_clips_of_about_the_asked_length():
    assert clip_windows(40, 0.0, 4.0) == [(0, 40)]
    assert clip_windows(40, 2.0, 4.0) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 40)]
    assert clip_windows(42, 2.0, 4.0) == [(0, 8), (8, 17), (17, 25), (25, 34), (34, 42)]  # the tail is shared out
    assert clip_windows(3, 2.0, 4.0) == [(0, 3)]


def test_a_long_video_is_streamed_window_by_window(tmp_path, monkeypatch):
    """`ClipReader.read` streams the file once, holding at most the frames one window's eval sampling takes, and
    gives the clips (times and model inputs) of a whole-file decode."""
    from clover_jax import video_clips
    from clover_jax.video_clips import ClipReader
    from data_pipelines.build.video_io import DecodeConfig, decode_video
    from data_pipelines.input.input_config import InputConfig

    path = tmp_path / "long.mp4"
    cfg = synthetic.SyntheticConfig(num_frames=240, size=64)  # 30 s at 8 fps
    synthetic.write_mp4(path, synthetic.render_clip(synthetic.clip_spec(0, "test", 3, cfg), cfg), cfg.fps)
    decode = DecodeConfig(fps=4.0, short_side=64)
    assert len(decode_video(path, decode).frames) == 120
    model_input = InputConfig(num_frames=4, image_size=56)
    for clip_seconds, windows, count in ((0.0, None, 1), (5.0, None, 6), (1.0, None, 30),
                                         (0.0, [(2.0, 4.0), (3.0, 9.5), (29.5, 40.0), (50.0, 51.0)], 4)):
        reader = ClipReader(model_input, decode, clip_seconds, 90)
        stats: dict = {}
        reason, clips = reader.read(path, windows, stats=stats)
        whole = reader._read_whole(path, windows)
        assert reason is None and len(clips) == count
        assert [(c.start, c.end) for c in clips] == [(c.start, c.end) for c in whole]
        for streamed, reference in zip(clips, whole):
            np.testing.assert_array_equal(streamed.video, reference.video)
        overlap = 2 if windows else 1  # overlapping windows are filled side by side
        assert stats["passes"] == 1 and 0 < stats["peak_frames"] <= overlap * model_input.num_frames, stats
        # A clip waits as the JPEGs of its sampled frames alone (preprocessed when embedded).
        assert all(0 < sum(map(bool, c.jpegs)) <= model_input.num_frames for c in clips)
    assert ClipReader(model_input, decode, 0.0, 90).read(tmp_path / "gone.mp4")[0] == "missing_file"
    # A frame count the packets get wrong is found by the decode, which runs again with it; none: counted first.
    reader = ClipReader(model_input, decode, 5.0, 90)
    for estimate in ((119, 4.0), None):
        monkeypatch.setattr(video_clips, "estimate_num_frames", lambda path, decode: estimate)
        stats = {}
        reason, clips = reader.read(path, stats=stats)
        assert reason is None and stats["passes"] == 2 and stats["peak_frames"] <= model_input.num_frames
        assert [(c.start, c.end) for c in clips] == [(c.start, c.end) for c in reader._read_whole(path, None)]


def test_search_prints_ranked_clips_and_writes_the_html_page(cli_env, builds, tmp_path):
    page = tmp_path / "hits.html"
    proc = _run(cli_env, "clover_jax.search", f"--index={builds['out'] / 'whole'}", "three red squares move up",
                "a blue circle", "--top", "3", f"--html={page}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocks = proc.stdout.split("query: ")[1:]
    assert len(blocks) == 2, proc.stdout
    names = {_name(i) for i in range(NUM_VIDEOS)}
    for block in blocks:
        hits = re.findall(r"^\s+(\d)\. +(-?[\d.]+)  (\S+)  0\.00-1\.00 s$", block, re.M)
        assert [h[0] for h in hits] == ["1", "2", "3"] and {h[2] for h in hits} <= names, block
        assert [float(h[1]) for h in hits] == sorted((float(h[1]) for h in hits), reverse=True)
    text = page.read_text()
    assert text.count("<img src=\"data:image/png;base64,") == 6 and "a blue circle" in text


def test_an_update_embeds_only_new_and_changed_files_and_drops_deleted_ones(cli_env, model_dir, library, builds):
    index = builds["out"] / "resumed"
    before, emb_before = _contents(index)
    for i in (16, 17, 18):
        _write_video(library / _name(i), i)
    for i in (1, 4):
        (library / _name(i)).unlink()
    changed = library / _name(2)
    _write_video(changed, 40)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    _update_reports(cli_env, model_dir, library, index, "this run: 4 clips embedded (4 files new or changed)",
                    "15 files unchanged, 2 dropped")
    after, emb_after = _contents(index)
    expected = sorted(_name(i) for i in range(NUM_VIDEOS + 3) if i not in (1, 4))
    assert [v["path"] for v in after["videos"]] == expected and after["num_clips"] == len(expected)
    old_rows = {v["path"]: v["first_row"] for v in before["videos"]}
    for video in after["videos"]:
        if video["path"] in old_rows and video["path"] != _name(2):
            np.testing.assert_array_equal(emb_after[video["first_row"]], emb_before[old_rows[video["path"]]])
    assert not np.allclose(emb_after[[v["first_row"] for v in after["videos"] if v["path"] == _name(2)][0]],
                           emb_before[old_rows[_name(2)]])
    assert after["generation"] == before["generation"] + 1 and json.dumps(after["identity"]) == json.dumps(
        before["identity"])
    assert all(len(v["digest"]) == 32 for v in after["videos"] + after["skipped"])

    # Content decides: a file rewritten with its old size and mtime is embedded again, a touched one is not,
    # and an entry written before digests (none in the manifest) is compared by size and mtime.
    rewritten, touched, undigested = library / _name(3), library / _name(5), _name(6)
    _rewrite_keeping_size_and_mtime(rewritten)
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 5 * 10**9))
    old_style = json.loads((index / video_index.MANIFEST).read_text())
    next(v for v in old_style["videos"] if v["path"] == undigested).pop("digest")
    (index / video_index.MANIFEST).write_text(json.dumps(old_style))
    _update_reports(cli_env, model_dir, library, index, "this run: 1 clips embedded (1 files new or changed)",
                    "18 files unchanged, 0 dropped")
    final, emb_final = _contents(index)
    rows_then = {v["path"]: v["first_row"] for v in after["videos"]}
    for video in final["videos"]:
        same = np.array_equal(emb_final[video["first_row"]], emb_after[rows_then[video["path"]]])
        assert same == (video["path"] != _name(3)), video["path"]
    entry = {v["path"]: v for v in final["videos"]}
    assert entry[_name(5)]["mtime_ns"] == touched.stat().st_mtime_ns and len(entry[undigested]["digest"]) == 32
    assert entry[_name(3)]["size"] == next(v for v in after["videos"] if v["path"] == _name(3))["size"]
    shutil.rmtree(library.parent / "elsewhere", ignore_errors=True)


def _rewrite_keeping_size_and_mtime(path: pathlib.Path) -> None:
    """Another synthetic clip in `path`, padded to the old size with an MP4 `free` box; the old mtime restored."""
    stat = path.stat()
    for content in (42, 43, 44, 45, 46, 47, 48, 49):
        scratch = pathlib.Path(tempfile.mkdtemp()) / "scratch.mp4"
        _write_video(scratch, content)
        data = scratch.read_bytes()
        scratch.unlink()
        pad = stat.st_size - len(data)
        if pad >= 8:
            path.write_bytes(data + struct.pack(">I", pad) + b"free" + bytes(pad - 8))
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            assert path.stat().st_size == stat.st_size
            return
    raise AssertionError(f"no synthetic clip is smaller than {path} ({stat.st_size} bytes)")
