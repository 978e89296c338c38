"""VideoQA on real annotation files: QA items over built clips, fill-in-the-blank, multi-view testing,
and a tiny fine-tune + `python -m clover_jax.eval` on the real MSVD clips with the real MSVD-QA test file."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from clover_jax import eval as eval_lib
from clover_jax import partitioning, prepare, run_inputs, run_setup, tasks
from clover_jax import train as train_lib
from clover_jax.evaluators import entries
from clover_jax.models.clover import Clover, clover_config, init_params
from configs import finetune_qa
from data_pipelines.build import builder, built_splits, qa_sources
from data_pipelines.build.annotation_rows import QAExample
from data_pipelines.build.qa_readers import read_lsmdc_fib, read_msvd_qa
from data_pipelines.input import qa_inputs, qa_tasks
from data_pipelines.input.device_transfer import numpy_batches

MSVD_CLIPS = ("3qqEKTPxLNs_1_15", "UXs3eq68ZjE_250_255", "WTf5EgVY5uU_124_128", "j2Dhf-xFUxU_13_20",
              "klteYv1Uv9A_27_33")  # the MSVD clips in shared/data/real/msvd/clips


def ex(video, question, answer, **extra):
    return QAExample(video, question, answer, extra=extra)


# ---------------------------------------------------------------- items (no model)


def test_open_ended_items_match_clips_mark_out_of_vocab_and_keep_missing_kinds():
    examples = [ex("b", "what is it?", "cat", answer_type="what"), ex("zz", "who sings?", "man"),
                ex("a", "who is it?", "dog"), ex("a", "how many?", "seven")]
    split = qa_tasks.open_ended_items(examples, ["a", "b"], ("cat", "dog", "man"), 16, source="msvd_qa", split="test")
    assert split.items.clip_index.tolist() == [1, 0, 0]
    assert split.items.answer_index.tolist() == [0, 1, -1]  # "seven" is outside the vocabulary
    assert split.kinds == ["what", "who", "how"] and split.missing_kinds == ["who"]
    assert split.answers == ["cat", "dog", "seven"]
    assert split.items.text_ids.shape == (3, 16) and (split.items.text_ids[:, 0] == 101).all()
    with pytest.raises(ValueError, match="msvd_mapping"):
        qa_tasks.open_ended_items(examples, ["vid1"], ("cat",), 16, source="msvd_qa", split="test")


def test_tgif_count_trains_as_open_ended_over_its_count_answers(tmp_path):
    path = tmp_path / "Train_count_question.csv"
    path.write_text("gif_name\tquestion\tanswer\tvid_id\tkey\n"
                    "g1\thow many times does the man nod ?\t3\tc1\t1\n"
                    "g2\thow many birds fly ?\t2\tc2\t2\n"
                    "g1\thow many cars pass ?\t3\tc3\t3\n"
                    "g3\thow many times does she jump ?\t12\tc4\t4\n")
    examples = qa_sources.read_qa_examples("tgif_count", path, "train")
    assert qa_tasks.SOURCE_TASKS["tgif_count"] == "qa_open_ended" == finetune_qa.get_config("tgif_count,tiny").task
    vocab = qa_tasks.rank_answers([e.answer for e in examples])
    assert vocab == ("3", "12", "2")  # by frequency, then alphabetical
    split = qa_tasks.open_ended_items(examples, ["g1", "g2"], vocab, 16, source="tgif_count", split="train")
    assert split.items.answer_index.tolist() == [0, 2, 0] and split.kinds == ["count"] * 3
    assert split.missing_kinds == ["count"]  # g3 has no clip in the split: kept, scored wrong


def test_fill_in_blank_puts_mask_in_place_and_cuts_long_sentences_around_it():
    long_left = " ".join(["word"] * 40)
    examples = [ex("a", "someone _____ the door.", "opens"), ex("a", f"{long_left} she _____ it twice today .", "hits")]
    split = qa_tasks.open_ended_items(examples, ["a"], ("opens", "hits"), 12, source="lsmdc_fib", split="train",
                                      fill_in_blank=True)
    ids, mask = split.items.text_ids, split.items.text_mask
    assert ((ids == 103).sum(axis=1) == 1).all()  # exactly one [MASK] per question, even when cut
    tok = qa_tasks._Tokens()
    expected = [101, *tok.ids("someone"), 103, *tok.ids("the door."), 102]
    assert ids[0, :mask[0].sum()].tolist() == expected
    assert mask[1].sum() == 12 and split.num_truncated == 1
    row = ids[1].tolist()
    after = row[row.index(103) + 1:row.index(102)]
    assert len(after) >= 3  # the words after the blank survive the cut
    with pytest.raises(ValueError, match="exactly one"):
        qa_tasks.open_ended_items([ex("a", "no blank here", "x")], ["a"], ("x",), 12, source="lsmdc_fib",
                                  split="train", fill_in_blank=True)


def test_multiple_choice_items_keep_the_answer_tail_and_track_the_truth_when_shuffled():
    options = [f"option number {i} " + "long " * 30 for i in range(5)]
    item = QAExample("a", "what happens?", options[0], options, 0)
    fixed = qa_tasks.multiple_choice_items([item], ["a"], 32, "full_answer_kept", source="lsmdc_mc", split="test")
    assert fixed.items.text_ids.shape == (1, 5, 32) and fixed.items.answer_index.tolist() == [0]
    tail = qa_tasks._Tokens().ids(f"Answer: {options[3]}")[:30]
    assert fixed.items.text_ids[0, 3, 1:31].tolist()[-len(tail):] == tail[-30:]  # the tail is what is kept
    shuffled = qa_tasks.multiple_choice_items([item] * 20, ["a"], 32, "caption", source="lsmdc_mc", split="train",
                                              shuffle_seed=0)
    answers = shuffled.items.answer_index
    assert len(set(answers.tolist())) > 1  # the truth no longer always sits first
    truth = qa_tasks._Tokens().ids(options[0])[:30]
    for row, a in zip(shuffled.items.text_ids, answers):
        assert row[a, 1:31].tolist() == truth


# ---------------------------------------------------------------- model and pipeline: multi-view


def test_multi_view_video_averages_the_views_swin_features():
    config = clover_config("tiny", num_frames=2, image_size=28)
    model = Clover(config)
    video = jax.random.normal(jax.random.key(1), (2, 3, 2, 28, 28, 3))
    params = jax.jit(lambda r: model.init(r, video[:, 0], method=Clover.video_features))(jax.random.key(0))
    f = jax.jit(lambda v: model.apply(params, v, method=Clover.video_features))
    one = np.asarray(f(video[:, :1]))
    np.testing.assert_allclose(one, np.asarray(f(video[:, 0])), atol=1e-6)
    mean = np.mean([np.asarray(f(video[:, v])) for v in range(3)], axis=0)
    np.testing.assert_allclose(np.asarray(f(video)), mean, atol=1e-5)
    with pytest.raises(ValueError, match="B, V, T"):
        model.apply(params, video[0, 0], method=Clover.video_features)


# ---------------------------------------------------------------- real MSVD clips + real MSVD-QA


@pytest.fixture(scope="module")
def msvd(real_data_dir, tmp_path_factory):
    """The 5 real MSVD clips built as both a 'train' and a 'test' split (`prepare --format msvd`), and the
    real MSVD-QA test file, vocabulary and id mapping."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    qa_dir = real_data_dir / "msvd" / "msvd_qa"
    out = tmp_path_factory.mktemp("msvd_qa_tfds")
    clip_list = out / "clips.txt"
    clip_list.write_text("\n".join(sorted(p.stem for p in (real_data_dir / "msvd" / "clips").glob("*.avi"))) + "\n")
    rc = prepare.main(["--format", "msvd", "--annotations", str(real_data_dir / "msvd" / "annotations" /
                                                               "captions_msvd.json"),
                       "--split-list", f"train={clip_list}", "--split-list", f"test={clip_list}",
                       "--media", str(real_data_dir / "msvd" / "clips"), "--out", str(out), "--no-tags",
                       "--short-side", "32", "--fps", "2", "--workers", "1"])
    assert rc == 0
    folder = str(builder.dataset_dir(out, "msvd"))
    return dict(folder=folder, clips=built_splits.split_index(folder, "test").video_id,
                qa=str(qa_dir / "msvd_test_qa_encode.json"), vocab=str(qa_dir / "msvd_answer_set.txt"),
                mapping=str(qa_dir / "msvd_youtube_mapping.txt"))


def tiny_config(variant, msvd, **qa):
    c = finetune_qa.get_config(f"{variant},tiny")
    c.compilation_cache_dir = ""
    c.qa.update(dataset=msvd["folder"], **qa)
    c.data.update(image_size=28, num_frames=2, batch_size=8)  # train() uses all 8 test devices
    c.eval.update(image_size=28, num_frames=2, batch_size=8)
    return c


@pytest.fixture(scope="module")
def batch_sharding():
    return partitioning.batch_sharding(partitioning.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1]))


def test_msvd_qa_fine_tune_then_eval_counts_every_real_question(msvd, tmp_path, capsys):
    config = tiny_config("msvd_qa", msvd, train_file=msvd["qa"], eval_file=msvd["qa"], answer_vocab=msvd["vocab"],
                         msvd_mapping=msvd["mapping"])
    all_questions = read_msvd_qa(msvd["qa"], msvd["mapping"])
    present = [q for q in all_questions if q.video in msvd["clips"]]
    # Of the 5 clips only klteYv1Uv9A_27_33 has MSVD-QA test questions (23; the manifest agrees).
    assert len(all_questions) == 13157 and {q.video for q in present} == {"klteYv1Uv9A_27_33"} and len(present) == 23
    metrics = train_lib.train(config, tmp_path)["qa"]
    out = capsys.readouterr().out
    assert "msvd_qa train: 13157 questions, 23 with their clip, 13134 without" in out
    assert metrics["num"] == 13157 and metrics["num_missing_clip"] == 13134
    assert metrics["vocab_size"] == 1000
    assert metrics["accuracy"] == pytest.approx(metrics["accuracy_on_clips"] * 23 / 13157)
    assert sum(metrics["num_by_kind"].values()) == 13157
    assert {"what", "who"} <= set(metrics["accuracy_by_kind"])
    # `python -m clover_jax.eval` on the run's checkpoint gives the same figures.
    assert eval_lib.main(["--workdir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "open-ended QA accuracy" in printed and "by question kind: " in printed
    saved = json.loads((tmp_path / "eval" / f"qa_step{config.total_steps}.json").read_text())
    assert saved["accuracy"] == pytest.approx(metrics["accuracy"])
    assert saved["accuracy_by_kind"] == pytest.approx(metrics["accuracy_by_kind"])


def _lsmdc_files(tmp_path, real_data_dir):
    """LSMDC-format MC and FiB files over the two MSVD clips, from their real MSVD captions."""
    captions = json.loads((real_data_dir / "msvd" / "annotations" / "captions_msvd.json").read_text())
    mc, fib = [], []
    others = [c for v, caps in captions.items() if v not in MSVD_CLIPS for c in caps[:1]][:40]
    for n, clip in enumerate(MSVD_CLIPS[:4]):
        truth = captions[clip][n]
        mc.append("\t".join([clip, "0", "1", "0", "1", truth, *others[4 * n:4 * n + 4]]))
        words = truth.split()
        fib.append("\t".join([clip, "0", "1", " ".join(words[:1] + ["_____"] + words[2:]), words[1]]))
    (tmp_path / "mc.csv").write_text("\n".join(mc) + "\n")
    (tmp_path / "fib.csv").write_text("\n".join(fib) + "\n")
    return str(tmp_path / "mc.csv"), str(tmp_path / "fib.csv")


def test_lsmdc_mc_eval_on_four_views_and_fib_reads_the_mask_token(msvd, real_data_dir, tmp_path, batch_sharding):
    mc_file, fib_file = _lsmdc_files(tmp_path, real_data_dir)
    # Multiple choice, tested on 4 interleaved views per clip.
    config = tiny_config("lsmdc_mc", msvd, train_file=mc_file, eval_file=mc_file)
    config.eval.num_views = 4
    model_config = run_setup.model_config_from(config)
    params = jax.jit(lambda r: nn.unbox(init_params(model_config, r)))(jax.random.key(0))
    metrics = entries.make_evaluators(config, model_config, batch_sharding, None, ["qa"])["qa"].run(params)
    assert metrics["num"] == 4 and metrics["num_views"] == 4 and metrics["chance"] == 20.0
    assert metrics["accuracy_by_kind"].keys() == {"lsmdc_mc"}
    items, _ = run_inputs.qa_items(config, "test", 0)
    cfg = run_inputs.qa_eval_input(config)
    batch = next(iter(qa_inputs.make_qa_eval_dataset(cfg, items)))
    assert batch["video"].shape == (8, 4, 2, 28, 28, 3) and batch["option_ids"].shape == (8, 5, 64)
    single = next(iter(qa_inputs.make_qa_eval_dataset(cfg.replace(num_views=1, num_frames=8), items)))
    np.testing.assert_allclose(batch["video"][:, 1], single["video"][:, 1::4], atol=1e-5)  # view 1: frames 1, 5
    # Fill in the blank: the head reads the fused state at the [MASK].
    config = tiny_config("lsmdc_fib", msvd, train_file=fib_file, eval_file=fib_file)
    config.model.overrides.num_answers = 3
    model_config = run_setup.model_config_from(config)
    items, info = run_inputs.qa_items(config, "train", 3)
    assert len(items) == 4 and ((items.text_ids == 103).sum(axis=1) == 1).all()
    assert info["vocab"] == qa_tasks.rank_answers([ex.answer for ex in read_lsmdc_fib(fib_file)], 3)
    loss_fn = tasks.qa_fill_in_blank_loss_fn(model_config, config.loss, 1)
    params = jax.jit(lambda r: nn.unbox(init_params(model_config, r)))(jax.random.key(0))
    batch = next(numpy_batches(qa_inputs.make_qa_train_dataset(run_inputs.train_input(
        config.data, run_inputs.qa_clips_folder(config, "train")), items)))
    model = Clover(model_config)

    @jax.jit  # one compile of the whole check, not an op-by-op dispatch of the model three times
    def heads_and_loss(params, batch):
        inputs = batch["video"], batch["text_ids"], batch["text_mask"]
        return (model.apply({"params": params}, *inputs, at_mask_token=True, method=Clover.qa_open_ended),
                model.apply({"params": params}, *inputs, method=Clover.qa_open_ended),
                loss_fn(params, batch, jax.random.key(1)))

    at_mask, at_cls, (loss, metrics) = heads_and_loss(params, batch)
    assert not np.allclose(at_mask, at_cls)
    assert np.isfinite(float(loss)) and 0.0 <= float(metrics["accuracy"]) <= 100.0
    metrics = entries.make_evaluators(config, model_config, batch_sharding, None, ["qa"])["qa"].run(params)
    assert metrics["task"] == "qa_fill_in_blank" and metrics["num"] == 4

