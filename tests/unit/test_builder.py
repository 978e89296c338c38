"""TFDS builder on the real clips (zero skips), bad inputs counted by reason, synthetic dataset, CLI."""
import json
import os

import numpy as np
import pytest

from clover_jax import prepare
from data_pipelines.build import annotation_rows, builder, built_splits, caption_readers, clip_examples, synthetic
from data_pipelines.build.video_io import DecodeConfig, decode_video

FAST = DecodeConfig(fps=1.0, short_side=32)


def _msvd_records(real_data_dir, split="train"):
    ids = sorted(os.path.splitext(f)[0] for d in ("clips", "gifs") for f in os.listdir(real_data_dir / "msvd" / d))
    captions = real_data_dir / "msvd/annotations/captions_msvd.json"
    return caption_readers.read_msvd_captions(captions, video_ids=ids, split=split)


def _demo_records(real_data_dir):
    rows = map(json.loads, (real_data_dir / "manifest.jsonl").read_text().splitlines())
    return [
        annotation_rows.VideoText(r["path"], list(r["text"]), "test", {"text_kind": r["text_kind"]})
        for r in rows
        if r["path"].startswith("demo_clips/")
    ]


@pytest.fixture(scope="module")
def real_build(real_data_dir, tmp_path_factory):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    records = {"train": _msvd_records(real_data_dir), "test": _demo_records(real_data_dir)}
    # The demo set has a clip without text (mmaction2_test.avi): keep it, as a retrieval distractor would be.
    cfg = builder.BuildConfig(decode=FAST, require_captions=False, num_workers=2, progress=False)
    built = builder.build_dataset("real", records, real_data_dir, tmp_path_factory.mktemp("tfds"), cfg)
    return records, built


def test_real_clips_build_with_zero_skips(real_build):
    records, built = real_build
    print(built.summary.format())
    assert len(records["train"]) == 9 and len(records["test"]) == 18  # 5 AVI + 4 GIF; all demo clips
    assert dict(built.summary.clips_written) == {"train": 9, "test": 18}
    assert sum(built.summary.skipped.values()) == 0
    assert built.summary.captions_written == sum(len(r.captions) for recs in records.values() for r in recs)
    saved = json.loads((built.data_dir / builder.SUMMARY_FILE).read_text())
    assert saved["clips_written"] == {"train": 9, "test": 18}


def test_real_examples_hold_frames_captions_and_tags(real_build):
    import tensorflow as tf
    import tensorflow_datasets as tfds

    records, built = real_build
    by_id = {r.video: r for r in records["train"]}
    index = built_splits.split_index(built.data_dir, "train")
    assert sorted(index.video_id) == sorted(by_id)
    source = built_splits.open_source(built.data_dir, "train")
    features = built_splits.load_builder(built.data_dir).info.features
    for i in range(len(source)):
        ex = features.deserialize_example(tf.constant(source[i]), decoders={"frames": tfds.decode.SkipDecoding()})
        video_id = ex["video_id"].numpy().decode()
        captions = [c.decode() for c in ex["captions"].numpy()]
        assert captions == by_id[video_id].captions
        assert int(ex["num_frames"]) == len(ex["frames"]) == index.num_frames[i] >= 4
        first = tf.io.decode_jpeg(ex["frames"][0]).numpy()
        assert first.shape == (int(ex["height"]), int(ex["width"]), 3) and min(first.shape[:2]) == 32
        for k in clip_examples.TAG_KEYS:
            assert ex[k].shape[0] == len(captions)
        ws, we = ex["word_start"][0].numpy(), ex["word_end"][0].numpy()
        words = [captions[0][s:e] for s, e in zip(ws, we)]
        assert " ".join(words).split() == captions[0].split()  # tags index the stored caption
    print("train clips:", dict(zip(index.video_id, index.num_frames.tolist())))


def test_bad_inputs_are_skipped_and_counted(real_data_dir, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    good = ["j2Dhf-xFUxU_13_20", "klteYv1Uv9A_27_33", "WTf5EgVY5uU_124_128"]
    for vid in good:
        os.symlink(real_data_dir / "msvd/clips" / f"{vid}.avi", media / f"{vid}.avi")
    (media / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (media / "empty.avi").write_bytes(b"")
    records = [annotation_rows.VideoText(v, ["a man is cooking", "   "], "train") for v in good]
    records += [
        annotation_rows.VideoText("broken", ["a corrupt clip"], "train"),
        annotation_rows.VideoText("empty", ["an empty file"], "train"),
        annotation_rows.VideoText("only_bad_caption", [""], "train"),
        annotation_rows.VideoText(good[0], ["x" * 50 + " tail words here"], "train"),
    ]
    cfg = builder.BuildConfig(decode=FAST, max_bad_fraction=0.5, max_caption_chars=40, progress=False)
    built = builder.build_dataset("bad", {"train": records}, media, tmp_path / "tfds", cfg)
    print(built.summary.format())
    assert dict(built.summary.skipped) == {"corrupt": 1, "empty_file": 1, "no_captions": 1}
    assert dict(built.summary.captions_dropped) == {"empty": 4}
    assert built.summary.captions_truncated == 1
    # good[0] appears twice: one example, its captions united (the long one cut at the word boundary).
    assert built.summary.clips_written["train"] == 3 and dict(built.summary.duplicates_merged) == {"train": 1}

    strict = builder.BuildConfig(decode=FAST, max_bad_fraction=0.2, progress=False)
    with pytest.raises(builder.BuildError, match="max_bad_fraction"):
        builder.build_dataset("bad_strict", {"train": records}, media, tmp_path / "tfds", strict)
    assert not (builder.dataset_dir(tmp_path / "tfds", "bad_strict") / "dataset_info.json").exists()


def test_clean_captions():
    kept, dropped, truncated = clip_examples.clean_captions(
        ["  a  dog runs ", "", b"\xff\xfe", "bad \udcff surrogate", "one two three four", 7], max_chars=12
    )
    assert kept == ["a dog runs", "one two"]
    assert dict(dropped) == {"empty": 1, "non_utf8": 2, "not_text": 1} and truncated == 1


SMALL = synthetic.SyntheticConfig(seed=3, num_train=6, num_test=3, num_frames=8, size=32)


def test_synthetic_is_deterministic_with_splits_and_attributes():
    a = [synthetic.clip_spec(3, "train", i, SMALL) for i in range(20)]
    b = [synthetic.clip_spec(3, "train", i, SMALL) for i in range(20)]
    other = [synthetic.clip_spec(4, "train", i, SMALL) for i in range(20)]
    test = [synthetic.clip_spec(3, "test", i, SMALL) for i in range(20)]
    assert a == b and a != other and a != test
    np.testing.assert_array_equal(synthetic.render_clip(a[0], SMALL), synthetic.render_clip(b[0], SMALL))
    frames = synthetic.render_clip(a[0], SMALL)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    moved = [s for s in a if s.motion != "still"][0]
    clip = synthetic.render_clip(moved, SMALL)
    assert not np.array_equal(clip[0], clip[-1])  # motion is visible
    for spec in a:
        attrs = spec.attributes()
        assert set(attrs) == {"colour", "shape", "count", "motion"} and 1 <= attrs["count"] <= 3
        for caption in synthetic.captions_for(spec):
            assert spec.colour in caption and spec.shape in caption
    print("example captions:", synthetic.captions_for(a[0]), a[0].attributes())


def test_synthetic_captions_have_nouns_and_verbs():
    from spacy.symbols import NOUN, PROPN, VERB

    from data_pipelines.build import text_tags

    nlp = text_tags.load_tagger()
    specs = [synthetic.clip_spec(0, "train", i, synthetic.SyntheticConfig()) for i in range(60)]
    per_clip = [text_tags.tag_captions(synthetic.captions_for(s), nlp, with_pos=True) for s in specs]
    tags = [t for clip in per_clip for t in clip]
    has_noun = [bool(np.isin(t["pos"], (NOUN, PROPN)).any()) for t in tags]
    has_verb = [bool((t["pos"] == VERB).any()) for t in tags]
    has_candidate = [bool(t["candidate"].any()) for t in tags]
    print(f"{len(tags)} captions: with NOUN/PROPN {sum(has_noun)}, with VERB {sum(has_verb)}, "
          f"with a masking candidate {sum(has_candidate)}")
    assert all(has_candidate)
    assert sum(has_noun) >= 0.98 * len(tags) and sum(has_verb) >= 0.85 * len(tags)
    for clip in per_clip:  # every clip has a caption with both a noun and a verb
        assert any(np.isin(t["pos"], (NOUN, PROPN)).any() and (t["pos"] == VERB).any() for t in clip)


def test_synthetic_build_through_builder_and_cli(tmp_path):
    folder = synthetic.build_synthetic(tmp_path, SMALL)
    again = synthetic.ensure_synthetic(tmp_path, SMALL)  # cached: no rewrite
    assert (again.root / "DONE").exists()
    other = synthetic.ensure_synthetic(tmp_path / "second", SMALL)
    train_files = sorted(p.name for p in (again.media_dir / "train").iterdir())
    raw = DecodeConfig(fps=None, short_side=None)
    for name in train_files:  # same seed -> identical decoded clips (lossless), close to the drawing
        first = decode_video(again.media_dir / "train" / name, raw).frames
        np.testing.assert_array_equal(first, decode_video(other.media_dir / "train" / name, raw).frames)
        spec = synthetic.clip_spec(SMALL.seed, "train", int(name[-9:-4]), SMALL)
        assert np.abs(first.astype(int) - synthetic.render_clip(spec, SMALL)).max() <= 3
    summary = json.loads((folder / builder.SUMMARY_FILE).read_text())
    assert summary["clips_written"] == {"train": 6, "test": 3} and summary["skipped"] == {}
    import tensorflow as tf
    import tensorflow_datasets as tfds

    source = built_splits.open_source(folder, "test")
    features = built_splits.load_builder(folder).info.features
    ex = features.deserialize_example(tf.constant(source[0]), decoders={"frames": tfds.decode.SkipDecoding()})
    meta = json.loads(ex["metadata"].numpy())
    assert {"colour", "shape", "count", "motion"} <= set(meta) and int(ex["num_frames"]) == 8

    # The CLI on the generated JSONL (format "jsonl"), as a user would run it.
    rc = prepare.main([
        "--format", "jsonl", "--annotations", str(again.annotations["train"]), "--media", str(again.media_dir),
        "--out", str(tmp_path / "cli"), "--name", "syn_cli", "--fps", "8", "--short-side", "32", "--workers", "1",
    ])
    assert rc == 0
    index = built_splits.split_index(builder.dataset_dir(tmp_path / "cli", "syn_cli"), "train")
    assert index.num_captions.tolist() == [3] * 6
