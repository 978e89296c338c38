"""`python -m clover_jax.prepare --format qa`: builds the clips a VideoQA file refers to."""
import json

import pytest

from clover_jax import prepare
from data_pipelines.build import builder, built_splits

PRESENT = ("j2Dhf-xFUxU_13_20", "klteYv1Uv9A_27_33")  # the 2 MSVD test clips in msvd/clips


def _msvd_qa_file(real_data_dir, tmp_path):
    """A small MSVD-QA JSON: a few questions per present clip, one for a clip not in the media folder."""
    mapping_path = real_data_dir / "msvd" / "msvd_qa" / "msvd_youtube_mapping.txt"
    vid_of = {clip: vid for clip, vid in (line.split() for line in mapping_path.read_text().splitlines())}
    absent = next(clip for clip in vid_of if clip not in PRESENT)
    rows = []
    for clip in (PRESENT[1], absent, PRESENT[0], PRESENT[1]):
        index = int(vid_of[clip][3:])
        rows += [{"id": len(rows), "video_id": index, "question": "what is the man doing?", "answer": "cook"},
                 {"id": len(rows) + 1, "video_id": index, "question": "who is talking?", "answer": "man"}]
    path = tmp_path / "msvd_small_qa.json"
    path.write_text(json.dumps(rows))
    return path, mapping_path


def test_prepare_qa_builds_present_msvd_clips(real_data_dir, tmp_path, capsys):
    qa_path, mapping_path = _msvd_qa_file(real_data_dir, tmp_path)
    rc = prepare.main([
        "--format", "qa", "--qa-source", "msvd_qa", "--split", "test", "--annotations", str(qa_path),
        "--msvd-mapping", str(mapping_path), "--media", str(real_data_dir / "msvd" / "clips"),
        "--out", str(tmp_path / "tfds"), "--only-present", "--no-tags", "--short-side", "32", "--fps", "1",
        "--workers", "1",
    ])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    folder = builder.dataset_dir(tmp_path / "tfds", "msvd_qa_test")  # default name: {source}_{split}
    index = built_splits.split_index(folder, "test")
    assert index.video_id == [PRESENT[1], PRESENT[0]]  # first-seen order of the QA file, absent one dropped
    assert index.num_captions.tolist() == [0, 0] and (index.num_frames >= 4).all()
    summary = json.loads((folder / builder.SUMMARY_FILE).read_text())
    assert summary["clips_written"] == {"test": 2} and summary["skipped"] == {}
    assert summary["annotation_rows_bad"] == {"not_in_media_folder": 1}


@pytest.mark.parametrize("extra_args, message", [
    ([], "needs --qa-source"),
    (["--qa-source", "msrvtt_qa", "--msvd-mapping", "m.txt"], "only applies to --qa-source msvd_qa"),
    (["--qa-source", "msvd_qa", "--split-list", "test=list.txt"], "--split-list does not apply"),
])
def test_prepare_qa_rejects_mismatched_options(tmp_path, capsys, extra_args, message):
    with pytest.raises(SystemExit):
        prepare.main(["--format", "qa", "--annotations", "qa.json", "--media", str(tmp_path),
                      "--out", str(tmp_path), *extra_args])
    assert message in capsys.readouterr().err


def test_prepare_rejects_qa_source_without_format_qa(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--format", "msvd", "--qa-source", "msvd_qa", "--annotations", "a.json",
                      "--media", str(tmp_path), "--out", str(tmp_path)])
    assert "only apply to --format qa" in capsys.readouterr().err
