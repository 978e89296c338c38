"""Tests for the annotation readers: real MSR-VTT / MSVD files and small synthetic files of other formats."""
import collections
import json

import pytest

from data_pipelines.build import annotation_rows, caption_readers, qa_readers, qa_sources
from data_pipelines.input import qa_tasks

BAD_BYTES = b"\xff\xfe caf\xe9"  # not UTF-8


# ----------------------------------------------------------------------------- real files


def test_msrvtt_jsfusion_and_train_ids(real_data_dir):
    test = caption_readers.read_msrvtt_jsfusion_csv(real_data_dir / "msrvtt" / "MSRVTT_JSFUSION_test.csv")
    assert len(test) == 1000 and not test.bad
    assert len({r.video for r in test}) == 1000
    assert test[0].video == "video9770" and test[0].captions == ["a person is connecting something to system"]
    assert all(r.split == "test" and len(r.captions) == 1 for r in test)
    train_ids = caption_readers.read_video_id_list(real_data_dir / "msrvtt" / "MSRVTT_train.9k.csv")
    assert len(train_ids) == len(set(train_ids)) == 9000 and train_ids[0] == "video0"
    assert not set(train_ids) & {r.video for r in test}


def test_msrvtt_multiple_choice(real_data_dir):
    mc = qa_readers.read_msrvtt_mc_jsonl(real_data_dir / "msrvtt" / "msrvtt_mc_test.jsonl")
    print(f"\n[MSRVTT-MC] {len(mc)} items, option counts {collections.Counter(len(m.options) for m in mc)}")
    assert len(mc) == 2990 and not mc.bad
    assert all(len(m.options) == 5 and m.options[m.answer_index] == m.answer for m in mc)
    assert mc[0].qid == "mc0" and mc[0].video == "video9770" and mc[0].answer_index == 0


def test_msrvtt_qa_answer_coverage(real_data_dir):
    qa = qa_readers.read_msrvtt_qa_jsonl(real_data_dir / "msrvtt" / "msrvtt_qa" / "msrvtt_qa_val.jsonl")
    vocab = qa_readers.read_ans2label(real_data_dir / "msrvtt" / "msrvtt_qa" / "msrvtt_train_ans2label.json")
    coverage = qa_sources.answer_coverage(qa, vocab)
    own_vocab = qa_tasks.rank_answers((q.answer for q in qa), 1500)
    print(f"\n[MSRVTT-QA val] {len(qa)} QAs over {len({q.video for q in qa})} videos; "
          f"1,500-answer train vocab covers {100 * coverage:.2f}%; "
          f"val's own top-1500 covers {100 * qa_sources.answer_coverage(qa, own_vocab):.2f}%")
    assert len(qa) == 12278 and not qa.bad and len(vocab) == 1500
    assert round(100 * coverage, 1) == 93.0
    assert {q.extra["answer_type"] for q in qa} == {"what", "who", "how", "when", "where"}
    assert len(own_vocab) == 1500 and qa_sources.answer_coverage(qa, own_vocab) >= coverage


def test_msvd_captions_and_splits(real_data_dir):
    root = real_data_dir / "msvd" / "annotations"
    everything = caption_readers.read_msvd_captions(root / "captions_msvd.json")
    n_captions = sum(len(r.captions) for r in everything)
    sizes = {}
    for split in ("train", "val", "test"):
        ids = caption_readers.read_video_id_list(root / f"{split}_list.txt")
        records = caption_readers.read_msvd_captions(root / "captions_msvd.json", ids, split)
        assert [r.video for r in records] == ids and not records.bad
        sizes[split] = len(records)
    print(f"\n[MSVD] {len(everything)} clips, {n_captions} captions; splits {sizes}")
    assert len(everything) == 1970 and n_captions == 80827 and not everything.bad
    assert sizes == {"train": 1200, "val": 100, "test": 670}


def test_msvd_qa_and_answer_set(real_data_dir):
    root = real_data_dir / "msvd" / "msvd_qa"
    qa = qa_readers.read_msvd_qa(root / "msvd_test_qa_encode.json", root / "msvd_youtube_mapping.txt")
    answers = qa_readers.read_answer_set(root / "msvd_answer_set.txt")
    coverage = qa_sources.answer_coverage(qa, answers)
    print(f"\n[MSVD-QA test] {len(qa)} QAs over {len({q.video for q in qa})} videos; "
          f"{len(answers)}-answer set covers {100 * coverage:.2f}%")
    assert len(qa) == 13157 and not qa.bad and len(answers) == 1000
    assert len({q.video for q in qa}) == 504
    assert 0.85 < coverage < 1.0
    per_video = collections.Counter(q.video for q in qa)
    # manifest.jsonl gives, per staged MSVD clip, its MSVD-QA id and test-question count (the README's
    # "22 and 23" disagrees for j2Dhf-xFUxU_13_20, which the manifest and the QA file put at 0)
    with open(real_data_dir / "manifest.jsonl", encoding="utf-8") as f:
        staged = [row for row in map(json.loads, f) if "msvd_qa_video_id" in row]
    assert len(staged) == 9
    for row in staged:
        assert per_video[row["video_id"]] == row["msvd_qa_test_questions"], row["video_id"]
    assert per_video["klteYv1Uv9A_27_33"] == 23
    unmapped = qa_readers.read_msvd_qa(root / "msvd_test_qa_encode.json")
    assert unmapped[0].video == f"vid{unmapped[0].extra['video_index']}"


# ----------------------------------------------------------------------------- synthetic files


def write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_webvid_csv(tmp_path):
    path = write(tmp_path / "webvid.csv", [
        b"videoid,contentUrl,duration,page_dir,name",
        b'1001,https://x/1001.mp4,PT00H00M11S,000001_000050,"Aerial view, sunset over the sea"',
        b"1002,https://x/1002.mp4,PT00H01M02S,000001_000050,Dog running on grass",
        b"1003,https://x/1003.mp4,PT00H00M05S,000001_000050,   ",
        b"1004,https://x/1004.mp4,PT00H00M05S,000001_000050," + BAD_BYTES,
        b",https://x/1005.mp4,PT00H00M05S,000001_000050,No id here",
        b"1006,https://x/1006.mp4",
    ])
    records = caption_readers.read_webvid_csv(path)
    assert [r.video for r in records] == ["1001", "1002"]
    assert records[0].captions == ["Aerial view, sunset over the sea"]
    assert records[0].extra["relpath"] == "000001_000050/1001.mp4"
    assert records[0].extra["duration"] == 11.0 and records[1].extra["duration"] == 62.0
    assert records.bad == {"empty_caption": 1, "non_utf8": 1, "missing_field": 2}
    with pytest.raises(ValueError, match="lacks column"):
        caption_readers.read_webvid_csv(write(tmp_path / "wrong.csv", [b"id,caption", b"1,a"]))


def test_cc3m_tsv(tmp_path):
    path = write(tmp_path / "cc3m.tsv", [
        b"a dog on a beach\timages/000001.jpg",
        b'the "best" cake ever\thttps://example.com/cake.jpg',
        b"no url on this line",
        b"\timages/000004.jpg",
        BAD_BYTES + b"\timages/000005.jpg",
        b"a caption\t",
    ])
    records = caption_readers.read_cc3m_tsv(path)
    assert [(r.video, r.captions[0]) for r in records] == [
        ("images/000001.jpg", "a dog on a beach"), ("https://example.com/cake.jpg", 'the "best" cake ever')]
    assert records[0].extra["is_image"] and records[0].extra["num_frames"] == 1
    assert records.bad == {"missing_field": 2, "empty_caption": 1, "non_utf8": 1}


def test_didemo_paragraphs(tmp_path):
    moments = [
        {"video": "v1.mp4", "description": "a girl walks in.", "times": [[0, 1]], "annotation_id": 1},
        {"video": "v2.mp4", "description": "the car stops", "times": [[2, 2]], "annotation_id": 2},
        {"video": "v1.mp4", "description": "she sits down", "times": [[1, 2]], "annotation_id": 3},
        {"video": "v2.mp4", "description": "  ", "times": [[3, 3]], "annotation_id": 4},
        {"description": "no video field"},
    ]
    path = tmp_path / "train_data.json"
    path.write_text(json.dumps(moments))
    records = caption_readers.read_didemo_json(path)
    assert [(r.video, r.captions) for r in records] == [
        ("v1.mp4", ["a girl walks in. she sits down"]), ("v2.mp4", ["the car stops"])]
    assert records[0].extra["sentences"] == ["a girl walks in.", "she sits down"]
    assert records[0].extra["times"] == [[[0, 1]], [[1, 2]]]
    assert records.bad == {"empty_caption": 1, "missing_field": 1}


def test_lsmdc_tsv(tmp_path):
    clip = b"0001_American_Beauty_00.00.51.926-00.00.54.129"
    path = write(tmp_path / "LSMDC16_annos_training.csv", [
        clip + b"\t00.00.51.926\t00.00.54.129\t00.00.51.926\t00.00.54.129\tSomeone's \"car\" pulls up.",
        b"0002_Movie_00.01.00.000-00.01.02.000\t00.01.00.000\t00.01.02.000\t00.01.00.000\t00.01.02.000\t",
        b"0003_Movie_00.02.00.000-00.02.02.000\t" + BAD_BYTES,
        b"lonely_field",
    ])
    records = caption_readers.read_lsmdc_tsv(path)
    assert len(records) == 1 and records[0].captions == ['Someone\'s "car" pulls up.']
    assert records[0].extra["movie"] == "0001_American_Beauty"
    assert records[0].extra["relpath"] == "0001_American_Beauty/" + clip.decode() + ".avi"
    assert records.bad == {"empty_caption": 1, "non_utf8": 1, "missing_field": 1}


def test_tgif_qa_four_tasks(tmp_path):
    action = write(tmp_path / "Train_action_question.csv", [
        b"gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey",
        b"tumblr_a\tWhat does the man do 3 times ?\tnod\tjump\twave\tclap\tspin\t2\tACTION1\t10",
        b"tumblr_b\tWhat does the cat do 2 times ?\tnod\tjump\twave\tclap\tspin\t7\tACTION2\t11",
        b"tumblr_c\tWhat does the dog do 2 times ?\tnod\t\twave\tclap\tspin\t0\tACTION3\t12",
    ])
    transition = write(tmp_path / "Test_transition_question.csv", [
        b"gif_name\tquestion\ta1\ta2\ta3\ta4\ta5\tanswer\tvid_id\tkey",
        b"tumblr_d\tWhat does the man do after sitting ?\tstand\trun\tsing\teat\tcry\t0\tTRANS1\t20",
    ])
    frameqa = write(tmp_path / "Train_frameqa_question.csv", [
        b"gif_name\tquestion\tanswer\ttype\tvid_id\tkey\tdescription",
        b"tumblr_e\twhat is the color of the shirt ?\tblack\t2\tFRAMEQA1\t30\ta man in a black shirt .",
        b"tumblr_f\thow many dogs run ?\ttwo\t9\tFRAMEQA2\t31\ttwo dogs run .",
        b"tumblr_g\t\tcat\t0\tFRAMEQA3\t32\ta cat .",
    ])
    count = write(tmp_path / "Test_count_question.csv", [
        b"gif_name\tquestion\tanswer\tvid_id\tkey",
        b"tumblr_h\tHow many times does the man nod ?\t3\tCOUNT1\t40",
        b"tumblr_i\tHow many times does the cat jump ?\tmany\tCOUNT2\t41",
        b"tumblr_j\tHow many times does the dog bark ?",
    ])
    act = qa_readers.read_tgif_qa_tsv(action)
    assert len(act) == 1 and act[0].options == ["nod", "jump", "wave", "clap", "spin"]
    assert act[0].answer_index == 2 and act[0].answer == "wave" and act[0].qid == "ACTION1"
    assert act.bad == {"bad_value": 1, "empty_caption": 1}
    trans = qa_readers.read_tgif_qa_tsv(transition, split="test")
    assert len(trans) == 1 and trans[0].answer == "stand" and trans[0].extra["task"] == "transition"
    frame = qa_readers.read_tgif_qa_tsv(frameqa)
    assert [(q.video, q.answer, q.extra["type"]) for q in frame] == [("tumblr_e", "black", "color")]
    assert frame[0].options is None and frame.bad == {"bad_value": 1, "empty_caption": 1}
    cnt = qa_readers.read_tgif_qa_tsv(count)
    assert [(q.answer, q.extra["count"]) for q in cnt] == [("3", 3)]
    assert cnt.bad == {"bad_value": 1, "missing_field": 1}
    with pytest.raises(ValueError, match="TGIF-QA task"):
        qa_readers.read_tgif_qa_tsv(write(tmp_path / "questions.tsv", [b"gif_name\tquestion\tanswer"]))


def test_generic_jsonl_and_shared_counter(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [
        json.dumps({"video": "a.mp4", "text": "a cat", "source": "x"}).encode(),
        json.dumps({"video": "b.mp4", "text": ["one", "  ", "two"]}).encode(),
        b"",
        b"{not json",
        json.dumps({"video": "c.mp4"}).encode(),
        json.dumps({"video": "d.mp4", "text": ["", " "]}).encode(),
        b'{"video": "e.mp4", "text": "' + BAD_BYTES + b'"}',
        json.dumps({"text": "orphan"}).encode(),
    ])
    shared = collections.Counter()
    records = caption_readers.read_generic_jsonl(path, bad=shared)
    assert [(r.video, r.captions) for r in records] == [("a.mp4", ["a cat"]), ("b.mp4", ["one", "two"])]
    assert records[0].extra == {"source": "x"}
    expected = {"empty_caption": 3, "bad_json": 1, "missing_field": 2, "no_valid_caption": 1, "non_utf8": 1}
    assert records.bad == expected
    caption_readers.read_generic_jsonl(path, bad=shared)
    assert shared == {k: 2 * v for k, v in expected.items()}


def test_answer_vocabulary_and_coverage():
    examples = [annotation_rows.QAExample("v", "q", a) for a in ["dog", "cat", "dog", "bird", "cat", "ant", "dog"]]
    vocab = qa_tasks.rank_answers((e.answer for e in examples), top_k=3)
    assert vocab == ("dog", "cat", "ant")  # ties (ant, bird: 1 each) broken alphabetically
    assert qa_tasks.rank_answers(e.answer for e in examples) == ("dog", "cat", "ant", "bird")  # 0: all
    assert qa_sources.answer_coverage(examples, vocab) == pytest.approx(6 / 7)
    assert qa_sources.answer_coverage(examples, ["bird"]) == pytest.approx(1 / 7)
    with pytest.raises(ValueError):
        qa_tasks.rank_answers(["dog"], top_k=-1)


# ----------------------------------------------------------------------------- LSMDC QA, QA dispatcher


LSMDC_CLIP = b"1001_Movie_A_00.01.02.300-00.01.05.400"
LSMDC_TIMES = b"\t00.01.02.300\t00.01.05.400\t00.01.02.100\t00.01.05.600"


def test_lsmdc_multiple_choice_both_layouts(tmp_path):
    sentences = [b"Someone opens the door.", b"He runs.", b"She sings.", b"They eat.", b"It rains."]
    path = write(tmp_path / "LSMDC16_multiple_choice_mixed.csv", [
        LSMDC_CLIP + LSMDC_TIMES + b"\t" + b"\t".join(sentences),  # train/valid: correct first
        b"",
        b"1002_Movie_B_00.00.01.000-00.00.02.000" + LSMDC_TIMES + b"\t" + b"\t".join(sentences) + b"\t3",
        b"1003_Movie_B_x" + LSMDC_TIMES + b"\t" + b"\t".join(sentences) + b"\t6",  # index out of 1..5
        b"1004_Movie_B_x" + LSMDC_TIMES + b"\t" + b"\t".join(sentences) + b"\tthree",
        b"1005_Movie_B_x" + LSMDC_TIMES + b"\t" + b"\t".join(sentences[:4]) + b"\t \t1",  # empty sentence
        b"1006_Movie_B_x" + LSMDC_TIMES + b"\t" + b"\t".join(sentences[:4]),  # 9 fields
        b"1007_Movie_B_x" + LSMDC_TIMES + b"\t" + b"\t".join(sentences) + b"\t1\textra",  # 12 fields
        b"1008_Movie_B_x" + LSMDC_TIMES + b"\t" + b"\t".join(sentences[:4]) + b"\t" + BAD_BYTES,
    ])
    shared = collections.Counter()
    mc = qa_readers.read_lsmdc_mc_tsv(path, split="valid", bad=shared)
    assert [(q.video, q.answer_index, q.answer, q.qid) for q in mc] == [
        (LSMDC_CLIP.decode(), 0, "Someone opens the door.", "valid_0"),
        ("1002_Movie_B_00.00.01.000-00.00.02.000", 2, "She sings.", "valid_2"),
    ]
    assert all(q.options == [s.decode() for s in sentences] and q.question == "" for q in mc)
    assert mc[0].extra["times"] == ["00.01.02.300", "00.01.05.400", "00.01.02.100", "00.01.05.600"]
    assert mc[0].extra["split"] == "valid" and mc[0].extra["relpath"] == f"1001_Movie_A/{LSMDC_CLIP.decode()}.avi"
    assert mc.bad == {"bad_value": 3, "empty_caption": 1, "missing_field": 1, "non_utf8": 1} == shared


def test_lsmdc_fill_in_the_blank_tsv_and_json(tmp_path):
    tsv = write(tmp_path / "LSMDC16_FIB_train.csv", [
        LSMDC_CLIP + LSMDC_TIMES + b"\tSomeone opens the ___ slowly.\tdoor",
        b"1002_Movie_B_y\tHe picks up the _________ .\tphone",  # no time stamps, long blank
        b"1003_Movie_B_y\tNo blank in this sentence.\tword",
        b"1004_Movie_B_y\tTwo ___ blanks ___ here.\tword",
        b"1005_Movie_B_y\tOne __ is too short.\tword",
        b"1006_Movie_B_y\tShe ___ away.\tNOTHINGTOBLANK",
        b"1007_Movie_B_y\tShe ___ away.\t  ",
        b"1008_Movie_B_y\t   \tword",
        b"1009_Movie_B_y\tShe ___ " + BAD_BYTES + b".\tword",
        b"only_two\tfields",
    ])
    fib = qa_readers.read_lsmdc_fib(tsv)
    assert [(q.video, q.question, q.answer, q.qid) for q in fib] == [
        (LSMDC_CLIP.decode(), "Someone opens the _____ slowly.", "door", "train_0"),
        ("1002_Movie_B_y", "He picks up the _____ .", "phone", "train_1"),
    ]
    assert fib[0].options is None and fib[0].extra["times"] == ["00.01.02.300", "00.01.05.400",
                                                                   "00.01.02.100", "00.01.05.600"]
    assert fib[1].extra["times"] == [] and fib[1].extra["movie"] == "1002_Movie_B"
    assert fib.bad == {"bad_value": 4, "nothing_to_blank": 1, "empty_caption": 1, "non_utf8": 1,
                       "missing_field": 1}

    rows = [
        {"video": "a_1", "question": "A man ____ a car.", "answer": "drives"},
        {"clip_id": "b_2", "sentence": "The ___ barks.", "answer": "dog"},
        {"clip_name": "c_3", "question": "Nothing here.", "answer": "x"},
        {"question": "No video ___ .", "answer": "y"},
        {"video": "d_4", "question": "The ___ sleeps."},
    ]
    jsonl = write(tmp_path / "fib.jsonl", [json.dumps(r).encode() for r in rows] + [b"{broken"])
    from_jsonl = qa_readers.read_lsmdc_fib(jsonl, split="test")
    assert [(q.video, q.question, q.answer, q.qid) for q in from_jsonl] == [
        ("a_1", "A man _____ a car.", "drives", "test_0"), ("b_2", "The _____ barks.", "dog", "test_1")]
    assert from_jsonl.bad == {"bad_value": 1, "missing_field": 2, "bad_json": 1}
    listed = tmp_path / "fib.json"
    listed.write_text(json.dumps(rows, indent=1))
    from_list = qa_readers.read_lsmdc_fib(listed, split="val")
    assert [q.qid for q in from_list] == ["val_0", "val_1"]
    assert from_list.bad == {"bad_value": 1, "missing_field": 2}


def test_qa_dispatcher_on_real_files(real_data_dir):
    msrvtt, msvd = real_data_dir / "msrvtt", real_data_dir / "msvd" / "msvd_qa"
    mapping = msvd / "msvd_youtube_mapping.txt"
    cases = {
        "msrvtt_qa": (msrvtt / "msrvtt_qa" / "msrvtt_qa_val.jsonl", "val", None, 12278, 497),
        "msvd_qa": (msvd / "msvd_test_qa_encode.json", "test", mapping, 13157, 504),
        "msrvtt_mc": (msrvtt / "msrvtt_mc_test.jsonl", "test", None, 2990, 2990),
    }
    for source, (path, split, mapping_path, n_qa, n_videos) in cases.items():
        examples = qa_sources.read_qa_examples(source, path, split, mapping_path=mapping_path)
        videos = qa_sources.read_qa_videos(source, path, split, mapping_path=mapping_path)
        print(f"\n[{source} {split}] {len(examples)} QAs over {len(videos)} videos")
        assert len(examples) == n_qa and not examples.bad and examples[0].extra["split"] == split
        assert len(videos) == n_videos and not videos.bad
        first_seen = list(dict.fromkeys(q.video for q in examples))
        assert [v.video for v in videos] == first_seen
        assert all(v.captions == [] and v.split == split and v.extra["video_id"] == v.video for v in videos)
    assert qa_sources.read_qa_examples("msvd_qa", cases["msvd_qa"][0], "test")[0].video.startswith("vid")
    with pytest.raises(ValueError, match="msrvtt_qa"):
        qa_sources.read_qa_examples("tgif_qa", cases["msrvtt_qa"][0], "val")
    with pytest.raises(ValueError, match="mapping_path"):
        qa_sources.read_qa_examples("msrvtt_qa", cases["msrvtt_qa"][0], "val", mapping_path=mapping)


def test_qa_dispatcher_tgif_and_lsmdc(tmp_path):
    count = write(tmp_path / "questions.tsv", [  # the file name names no task: the source does
        b"gif_name\tquestion\tanswer\tvid_id\tkey",
        b"tumblr_h\tHow many times does the man nod ?\t3\tCOUNT1\t40",
        b"tumblr_h\tHow many times does the man jump ?\t2\tCOUNT2\t41",
    ])
    cnt = qa_sources.read_qa_examples("tgif_count", count, "test")
    assert [q.extra["count"] for q in cnt] == [3, 2] and cnt[0].extra["task"] == "count"
    assert [v.video for v in qa_sources.read_qa_videos("tgif_count", count, "test")] == ["tumblr_h"]
    with pytest.raises(ValueError, match="lacks column"):
        qa_sources.read_qa_examples("tgif_action", count, "test")
    mc = write(tmp_path / "mc.csv", [LSMDC_CLIP + LSMDC_TIMES + b"\ta\tb\tc\td\te", b"short\tline"])
    shared = collections.Counter()
    videos = qa_sources.read_qa_videos("lsmdc_mc", mc, "train", bad=shared)
    # LSMDC ids hold dots: the clip keeps the whole id as video_id, and the release relpath.
    assert [(v.video, v.extra["video_id"]) for v in videos] == [(LSMDC_CLIP.decode(),) * 2]
    assert videos[0].extra["relpath"] == f"1001_Movie_A/{LSMDC_CLIP.decode()}.avi"
    assert videos.bad == shared == {"missing_field": 1}


def test_qa_source_table_names_every_source_once_with_a_task_kind():
    assert qa_sources.QA_SOURCES == tuple(qa_sources.QA_SOURCE_TABLE)
    kinds = {s: src.task for s, src in qa_sources.QA_SOURCE_TABLE.items()}
    assert kinds["tgif_count"] == kinds["activitynet_qa"] == kinds["msrvtt_qa"] == "qa_open_ended"
    assert kinds["lsmdc_fib"] == "qa_fill_in_blank" and kinds["msrvtt_mc"] == "zero_shot_multiple_choice"
    assert set(kinds.values()) == {"qa_open_ended", "qa_multiple_choice", "qa_fill_in_blank",
                                   "zero_shot_multiple_choice"}


def test_activitynet_qa_joins_questions_and_answers_by_question_id(tmp_path):
    questions = [
        {"question": "what is the man doing", "video_name": "abc", "question_id": "abc_0"},
        {"question": "is it indoors", "video_name": "v_def", "question_id": "def_1"},
        {"question": "no answer row", "video_name": "ghi", "question_id": "ghi_2"},
        {"question": "\u200b\x00", "video_name": "jkl", "question_id": "jkl_3"},
    ]
    answers = [  # a different order than the questions: the join is by id
        {"answer": "yes", "type": 3, "question_id": "def_1"},
        {"answer": "skiing", "type": 0, "question_id": "abc_0"},
        {"answer": "x", "type": 99, "question_id": "jkl_3"},
    ]
    (tmp_path / "test_q.json").write_text(json.dumps(questions))
    (tmp_path / "test_a.json").write_text(json.dumps(answers))
    examples = qa_sources.read_qa_examples("activitynet_qa", tmp_path / "test_q.json", "test")
    assert [(q.video, q.question, q.answer, q.qid, q.extra["type"]) for q in examples] == [
        ("v_abc", "what is the man doing", "skiing", "abc_0", "motion"),
        ("v_def", "is it indoors", "yes", "def_1", "yes_no"),
    ]
    assert examples.bad == {"missing_field": 1, "empty_caption": 1}
    with pytest.raises(ValueError, match="_q.json"):
        qa_readers.read_activitynet_qa(tmp_path / "test_a.json")


def test_control_and_zero_width_characters_are_removed_before_the_emptiness_check(tmp_path):
    path = write(tmp_path / "c.jsonl", [json.dumps({"video": v, "text": t}).encode() for v, t in [
        ("a", "\x00\x00"), ("b", "\u200b\u200c\ufeff"), ("c", ["a\u200bdog\x07 runs", "\u2060"])]])
    records = caption_readers.read_generic_jsonl(path)
    assert [(r.video, r.captions) for r in records] == [("c", ["adog runs"])]
    assert records.bad == {"empty_caption": 3, "no_valid_caption": 2}
