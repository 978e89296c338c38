"""Rebuilding is safe: staging + publish, build keys, zero-clip failures, inputs refused or merged, Beam parity."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clover_jax import prepare
from data_pipelines.build import annotation_rows, build_store, builder, built_splits, caption_readers, clip_examples
from data_pipelines.build.synthetic import write_mp4
from data_pipelines.build.video_io import DecodeConfig

FAST = DecodeConfig(fps=1.0, short_side=32)


def _cfg(**kw):
    return builder.BuildConfig(decode=FAST, tagger=None, progress=False, **kw)


REPO = pathlib.Path(__file__).resolve().parents[2]


def _clip(path, frames=4):
    rng = np.random.default_rng(frames)
    write_mp4(path, rng.integers(0, 255, (frames, 32, 32, 3), dtype=np.uint8), fps=2)


@pytest.fixture()
def media(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    for name in ("a", "b", "c"):
        _clip(folder / f"{name}.mp4")
    return folder


def _recs(*pairs):
    return [annotation_rows.VideoText(f"{v}.mp4", list(caps), "train") for v, caps in pairs]


def _ids(built):
    return sorted(built_splits.split_index(built.data_dir, "train").video_id)


def test_failed_overwrite_keeps_the_good_build_and_leaves_nothing_behind(tmp_path, media):
    out = tmp_path / "out"
    good = builder.build_dataset("d", {"train": _recs(("a", ["x"]), ("b", ["y"]))}, media, out, _cfg())
    assert not good.reused and _ids(good) == ["a", "b"]
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("a", "b"):
        (corrupt / f"{name}.mp4").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(builder.BuildError, match="no clip written"):
        builder.build_dataset("d", {"train": _recs(("a", ["x"]), ("b", ["y"]))}, corrupt, out,
                              _cfg(max_bad_fraction=1.0), overwrite=True)
    assert _ids(builder.BuiltDataset(good.data_dir, good.summary)) == ["a", "b"]
    assert build_store.finished_key(good.data_dir) is not None
    assert not (out / build_store.STAGING).exists()
    assert sorted(p.name for p in good.data_dir.parent.iterdir()) == ["1.0.0"]


def test_same_key_reuses_other_key_refuses_naming_the_difference(tmp_path, media):
    out = tmp_path / "out"
    records = {"train": _recs(("a", ["x"]), ("b", ["y"]))}
    builder.build_dataset("d", records, media, out, _cfg())
    assert builder.build_dataset("d", records, media, out, _cfg()).reused
    other_fps = builder.BuildConfig(decode=DecodeConfig(fps=2.0, short_side=32), tagger=None, progress=False)
    with pytest.raises(builder.BuildRefused, match=r"decode.fps: 1.0 -> 2.0"):
        builder.build_dataset("d", records, media, out, other_fps)
    with pytest.raises(builder.BuildRefused, match="annotations:"):
        builder.build_dataset("d", {"train": _recs(("a", ["x"]))}, media, out, _cfg())
    rebuilt = builder.build_dataset("d", {"train": _recs(("a", ["x"]))}, media, out, _cfg(), overwrite=True)
    assert not rebuilt.reused and _ids(rebuilt) == ["a"] and dict(rebuilt.summary.clips_written) == {"train": 1}


def test_leftovers_of_a_killed_build_are_never_taken_as_finished(tmp_path, media):
    out = tmp_path / "out"
    target = builder.dataset_dir(out, "d")
    target.mkdir(parents=True)
    (target / "dataset_info.json").write_text("{}")  # as a build killed half-way (old layout) could leave
    dead = out / build_store.STAGING / "d.999999999.deadbeef"
    dead.mkdir(parents=True)
    with pytest.raises(builder.BuildRefused, match="no build key"):
        builder.build_dataset("d", {"train": _recs(("a", ["x"]))}, media, out, _cfg())
    built = builder.build_dataset("d", {"train": _recs(("a", ["x"]))}, media, out, _cfg(), overwrite=True)
    assert _ids(built) == ["a"] and not dead.exists()


def test_inputs_outside_media_truncated_duplicates_and_invisible_captions(tmp_path, media):
    outside = tmp_path / "outside"
    outside.mkdir()
    _clip(outside / "x.mp4")
    records = [
        annotation_rows.VideoText("../outside/x.mp4", ["escape"], "train"),
        annotation_rows.VideoText("/etc/passwd", ["absolute"], "train"),
        *_recs(("a", ["one", "two"]), ("b", ["\x00\u200b"]), ("a", ["two", "three"]), ("a", ["four"]), ("c", ["z"])),
    ]
    built = builder.build_dataset("d", {"train": records}, media, tmp_path / "out", _cfg(max_bad_fraction=1.0))
    s = built.summary
    assert dict(s.skipped) == {"outside_media": 2, "no_captions": 1}
    assert dict(s.duplicates_merged) == {"train": 2} and dict(s.clips_written) == {"train": 2}
    assert s.captions_dropped == {"empty": 1}
    source = built_splits.open_source(built.data_dir, "train")
    import tensorflow as tf

    captions = {}
    for i in range(len(source)):
        ex = tf.train.Example.FromString(source[i]).features.feature
        captions[ex["video_id"].bytes_list.value[0].decode()] = [c.decode() for c in ex["captions"].bytes_list.value]
    assert captions == {"a": ["one", "two", "three", "four"], "c": ["z"]}


def _prepare(argv, capsys):
    code = prepare.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prepare_rows_of_the_issue_table(tmp_path, media, capsys):
    out = tmp_path / "out"
    jsonl = tmp_path / "ann.jsonl"
    jsonl.write_text("".join(json.dumps({"video": f"{v}.mp4", "text": f"caption {v}"}) + "\n" for v in "abc"))
    base = ["--format", "jsonl", "--annotations", str(jsonl), "--media", str(media), "--out", str(out),
            "--no-tags", "--fps", "1", "--short-side", "32", "--workers", "1"]
    code, stdout, _ = _prepare(base, capsys)
    assert code == 0 and "clips written: 3" in stdout
    code, stdout, _ = _prepare(base, capsys)
    assert code == 0 and "reusing the finished build" in stdout
    code, _, err = _prepare(base[:-6] + ["--fps", "2", "--short-side", "32", "--workers", "1"], capsys)
    assert code == 2 and "decode.fps: 1.0 -> 2.0" in err and "--overwrite" in err
    one_row = tmp_path / "one.jsonl"
    one_row.write_text(json.dumps({"video": "a.mp4", "text": "only"}) + "\n")
    code, _, err = _prepare(["--annotations", str(one_row), *base[:2], *base[4:]], capsys)
    assert code == 2 and "annotations:" in err
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 8)
    code, _, err = _prepare(["--annotations", str(binary), *base[:2], *base[4:], "--name", "bin"], capsys)
    assert code == 2 and "binary.jsonl" in err and err.startswith("error: ") and "Traceback" not in err
    assert not builder.dataset_dir(out, "bin").exists()
    empty_media = tmp_path / "nothing"
    empty_media.mkdir()
    code, _, err = _prepare([*base[:4], "--media", str(empty_media), "--out", str(out), "--name", "none",
                             "--only-present", "--no-tags"], capsys)
    assert code == 2 and "--only-present" in err and not builder.dataset_dir(out, "none").exists()
    csv_file = tmp_path / "test.csv"
    csv_file.write_text("key,vid_key,video_id\n1,2,a\n")
    code, _, err = _prepare(["--format", "msrvtt", "--annotations", str(csv_file), *base[4:]], capsys)
    assert code == 2 and "sentence" in err and "test.csv" in err and len(err.strip().splitlines()) == 1
    code, _, err = _prepare([*base[:4], "--media", str(jsonl), *base[6:]], capsys)
    assert code == 2 and "is not a folder" in err


def _canonical(folder, split="train"):
    """{video_id: example bytes re-serialised deterministically} of a built split."""
    import tensorflow as tf

    source = built_splits.open_source(folder, split)
    out = {}
    for i in range(len(source)):
        ex = tf.train.Example.FromString(source[i])
        out[ex.features.feature["video_id"].bytes_list.value[0].decode()] = ex.SerializeToString(deterministic=True)
    return out


def test_beam_build_writes_the_same_examples_as_the_in_process_build(real_data_dir, tmp_path):
    """Raw example bytes differ between any two processes (the protobuf runtime orders the entries of
    tf.train.Example's feature map differently in each process; two in-process builds differ the same
    way), so each example is parsed and re-serialised deterministically: those bytes are equal."""
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(real_data_dir / "msvd" / "gifs"))[:2]
    ids += sorted(os.path.splitext(f)[0] for f in os.listdir(real_data_dir / "msvd" / "clips"))[:1]
    records = caption_readers.read_msvd_captions(real_data_dir / "msvd/annotations/captions_msvd.json", video_ids=ids)
    records = {"train": list(records) + [records[0]]}  # a duplicate id: merged the same way by both
    local = builder.build_dataset("r", records, real_data_dir, tmp_path / "local", _cfg(num_workers=2))
    beam_cfg = _cfg(beam=builder.BeamConfig(runner="direct", workers=2))
    beamed = builder.build_dataset("r", records, real_data_dir, tmp_path / "beam", beam_cfg)
    assert local.summary.to_dict() == beamed.summary.to_dict()
    assert dict(beamed.summary.duplicates_merged) == {"train": 1} and dict(beamed.summary.clips_written) == {"train": 3}
    a, b = _canonical(local.data_dir), _canonical(beamed.data_dir)
    assert sorted(a) == sorted(ids) and a == b
    order = [built_splits.split_index(b.data_dir, "train").video_id for b in (local, beamed)]
    assert order[0] == order[1]  # the same keys, so the same storage order
    shutil.rmtree(tmp_path / "beam")


def test_prepare_on_beam_streams_webvid_and_fails_a_split_with_no_clip(tmp_path, media, capsys):
    csv_file = tmp_path / "results.csv"
    csv_file.write_text("videoid,contentUrl,duration,page_dir,name\n"
                        "a,u,PT00H00M02S,,a clip\nb,u,PT00H00M02S,,\na,u,PT00H00M02S,,again a\nc,u,,,third\n")
    args = ["--format", "webvid", "--annotations", str(csv_file), "--out", str(tmp_path / "out"), "--no-tags",
            "--fps", "1", "--short-side", "32", "--runner", "direct", "--workers", "1"]
    code, stdout, _ = _prepare([*args, "--media", str(media)], capsys)
    assert code == 0 and "on Beam (direct): train=streamed" in stdout
    summary = json.loads((builder.dataset_dir(tmp_path / "out", "webvid") / builder.SUMMARY_FILE).read_text())
    assert summary["clips_written"] == {"train": 2} and summary["duplicates_merged"] == {"train": 1}
    assert summary["annotation_rows_bad"] == {"empty_caption": 1} and summary["captions_written"] == 3
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("a", "c"):
        (corrupt / f"{name}.mp4").write_bytes(b"\x00garbage" * 100)
    code, _, err = _prepare([*args, "--media", str(corrupt), "--name", "bad", "--max-bad-fraction", "1"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("BUILD FAILED: split 'train': no clip written")
    assert not builder.dataset_dir(tmp_path / "out", "bad").exists()
    assert not (tmp_path / "out" / build_store.STAGING).exists()


def test_media_index_refuses_paths_leaving_the_folder(tmp_path, media):
    index = clip_examples.MediaIndex(media)
    (tmp_path / "outside.mp4").write_bytes(b"x")
    locate = lambda video, **extra: index.locate(annotation_rows.VideoText(video, [], "train", extra))  # noqa: E731
    assert locate("/etc/passwd") == (None, "outside_media")
    assert locate("../outside.mp4") == (None, "outside_media")
    assert locate("x", relpath="sub/../../outside.mp4") == (None, "outside_media")
    assert locate(str(media / "a.mp4")) == (str(media / "a.mp4"), None)  # absolute, but inside
    assert locate("sub/../b.mp4") == (str(media / "b.mp4"), None)
    assert locate("c") == (str(media / "c.mp4"), None) and locate("zzz.mp4") == (None, "missing_file")


def test_the_old_prepare_module_path_still_builds_with_one_notice(tmp_path, media):
    jsonl = tmp_path / "ann.jsonl"
    jsonl.write_text("".join(json.dumps({"video": f"{v}.mp4", "text": f"caption {v}"}) + "\n" for v in "ab"))
    out = subprocess.run(
        [sys.executable, "-m", "data_pipelines.prepare", "--format", "jsonl", "--annotations", str(jsonl),
         "--media", str(media), "--out", str(tmp_path / "out"), "--no-tags", "--fps", "1", "--short-side", "32",
         "--workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "clips written: 2" in out.stdout
    notices = [line for line in out.stderr.splitlines() if "deprecated" in line]
    assert notices == ["note: python -m data_pipelines.prepare is deprecated; use python -m clover_jax.prepare "
                       "(same flags)"]
