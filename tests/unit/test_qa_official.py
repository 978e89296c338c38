"""The official QA recipe (issue 12, row 5) pinned on real items: multiple-choice text, right truncation,
option order, head dropout and gradient clip of every QA fine-tune config.

../shared/data/real holds no TGIF-QA or LSMDC-MC file; its MSR-VTT multiple-choice items have LSMDC-MC's
shape (five caption options, no question), so they stand in for the official `QATextPrepare` input. The
oracle for token ids is the tokenizer class the official pipeline calls (transformers' BertTokenizer with
`truncation=True, max_length=L, padding="max_length"`), on our shipped bert-base-uncased vocabulary.
"""
from __future__ import annotations

import functools

import pytest

from configs import finetune_qa
from data_pipelines.build import qa_sources
from data_pipelines.build.synthetic_qa import mc_option_text
from data_pipelines.input import qa_tasks
from data_pipelines.input.text_masking import VOCAB_PATH

# `dropout_ratio` of the QA head in each official configs/exp_local/finetune_*.py (all with max_norm=50).
OFFICIAL_DROPOUT = {"tgif_action": 0.5, "tgif_transition": 0.5, "lsmdc_mc": 0.5, "lsmdc_fib": 0.5,
                    "msvd_qa": 0.5, "tgif_frame": 0.1, "msrvtt_qa": 0.1}
TGIF_MC_LENGTH = 100  # the official TGIF action/transition tokenizer max_length


@functools.lru_cache(maxsize=None)
def _msrvtt_mc(path: str) -> dict:
    return {ex.qid: ex for ex in qa_sources.read_qa_examples("msrvtt_mc", path, "test")}


@pytest.fixture(scope="module")
def mc_items(real_data_dir):
    return _msrvtt_mc(str(real_data_dir / "msrvtt" / "msrvtt_mc_test.jsonl"))


@pytest.fixture(scope="module")
def official_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(VOCAB_PATH), do_lower_case=True)


@pytest.mark.parametrize("task", finetune_qa.TASKS)
def test_qa_recipes_use_the_official_dropout_clip_text_and_option_order(task):
    c = finetune_qa.get_config(task)
    assert c.model.overrides["qa_dropout"] == OFFICIAL_DROPOUT.get(task, 0.1)
    assert c.optim.grad_clip == 50.0
    assert (c.qa.mc_format, c.qa.option_order) == ("full", "file")
    assert qa_tasks.training_shuffle_seed(c.qa.option_order, c.qa.seed) is None


def test_mc_text_is_the_official_string_on_a_real_item(mc_items):
    ex = mc_items["mc0"]
    assert ex.question == "" and ex.answer_index == 0
    assert mc_option_text(ex.question, ex.options, ex.options[3], "full") == (
        " Options: the boy is trying to fix the problem a movie trailer shows various scenes from a movie "
        "asian man discusses technology in the younger generations two men on wave runner in ocean rescuing "
        "a surfer a group is dancing Answer: two men on wave runner in ocean rescuing a surfer")
    # Our earlier text, still available by name.
    assert mc_option_text(ex.question, ex.options, ex.options[3], "full_answer_kept").endswith(
        "rescuing a surfer. a group is dancing. Answer: two men on wave runner in ocean rescuing a surfer")


def test_long_real_item_is_cut_at_the_right_answer_included(mc_items, official_tokenizer):
    ex = mc_items["mc312"]  # 165 tokens as " Options: ... Answer: <option 4>", the longest of the file
    result = qa_tasks.multiple_choice_items([ex], [ex.video], TGIF_MC_LENGTH, "full", source="tgif_action",
                                            split="train")
    texts = [mc_option_text(ex.question, ex.options, o, "full") for o in ex.options]
    expected = official_tokenizer(texts, max_length=TGIF_MC_LENGTH, truncation=True, padding="max_length")
    assert result.items.text_ids[0].tolist() == expected["input_ids"]
    assert result.items.text_mask[0].tolist() == expected["attention_mask"]
    assert result.num_truncated == 5 and result.items.answer_index.tolist() == [4]
    # The cut falls inside the option list: "answer" never appears and the five texts are identical.
    answer_id = official_tokenizer.convert_tokens_to_ids("answer")
    rows = result.items.text_ids[0]
    assert answer_id not in rows and all((row == rows[0]).all() for row in rows)
    # "full_answer_kept" cuts the option list instead and keeps "Answer: option".
    kept = qa_tasks.multiple_choice_items([ex], [ex.video], TGIF_MC_LENGTH, "full_answer_kept",
                                          source="tgif_action", split="train").items.text_ids[0]
    tail = official_tokenizer("Answer: " + ex.options[1], add_special_tokens=False)["input_ids"]
    assert kept[1, TGIF_MC_LENGTH - 1 - len(tail):TGIF_MC_LENGTH - 1].tolist() == tail


def test_training_options_keep_the_file_order_unless_shuffled(mc_items, official_tokenizer):
    examples = [mc_items[f"mc{i}"] for i in range(12)]
    videos = [ex.video for ex in examples]
    seed = qa_tasks.training_shuffle_seed("file", 0)
    items = qa_tasks.multiple_choice_items(examples, videos, 40, "caption", source="lsmdc_mc", split="train",
                                           shuffle_seed=seed).items
    for ex, rows in zip(examples, items.text_ids):
        expected = official_tokenizer(list(ex.options), max_length=40, truncation=True, padding="max_length")
        assert rows.tolist() == expected["input_ids"]
    assert items.answer_index.tolist() == [ex.answer_index for ex in examples]
    shuffled = qa_tasks.multiple_choice_items(examples, videos, 40, "caption", source="lsmdc_mc", split="train",
                                              shuffle_seed=qa_tasks.training_shuffle_seed("shuffled", 0)).items
    assert shuffled.answer_index.tolist() != items.answer_index.tolist()
    with pytest.raises(ValueError, match="option_order"):
        qa_tasks.training_shuffle_seed("random", 0)
