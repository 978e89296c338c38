"""VideoQA items from annotation files: the QA examples of one source -> `QAItems` over the clips of a built split.

A source (`annotations.read_qa_examples`) names a task of reference §5.2:
  open-ended       msrvtt_qa, msvd_qa, tgif_frame, tgif_count, activitynet_qa: the question alone, answer
                   index in a vocabulary (a file such as MSRVTT-QA's `msrvtt_train_ans2label.json` / MSVD-QA's
                   `msvd_answer_set.txt`, or the most frequent training answers); -1 = out of vocabulary.
  multiple choice  tgif_action, tgif_transition, lsmdc_mc: one text per option (`synthetic_qa.mc_option_text`):
                   the official question + " Options: " + " ".join(options) + " Answer: " + option ("full"),
                   cut at the right like the official tokenizer (a long text loses its tail, answer
                   included); "full_answer_kept" (options joined by ". ") loses the end of its option list
                   instead, never its "Answer: option" tail; "caption" is the option alone. Options keep the
                   file's order (official) unless `qa.option_order="shuffled"` permutes the training ones.
  fill-in-blank    lsmdc_fib: the sentence with its "_____" blank as the [MASK] token, answer index in a
                   vocabulary; a long sentence is cut around the [MASK], which always stays.

Questions are matched to clips by video id (the `video_id` the builder stored; MSVD-QA needs its
`msvd_youtube_mapping.txt` so "vidN" becomes the clip name). A question whose clip is not in the split
is not an item: it is returned in `missing_kinds`, and evaluation counts it wrong (never dropped).
"""
from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Iterable, Mapping, Sequence

import numpy as np

from data_pipelines.build.annotation_rows import QAExample
from data_pipelines.build.qa_readers import FIB_BLANK, read_ans2label, read_answer_set
from data_pipelines.build.qa_sources import QA_SOURCE_TABLE
from data_pipelines.build.synthetic_qa import MC_FORMATS, mc_option_text
from data_pipelines.input.qa_inputs import QAItems

# The trainable sources of the QA source table (MSR-VTT multiple choice is zero-shot: the retrieval model).
SOURCE_TASKS: dict[str, str] = {
    name: source.task for name, source in QA_SOURCE_TABLE.items() if source.task != "zero_shot_multiple_choice"
}
# qa.option_order: the training options as the file lists them (the official pipeline) or permuted per item.
OPTION_ORDERS = ("file", "shuffled")
QUESTION_WORDS = ("what", "who", "how", "when", "where", "which", "why", "whose", "whom")


@dataclasses.dataclass(frozen=True)
class QASplit:
    """The items of one split and what evaluation needs about them.

    items: the questions whose clip is in the split, in annotation order. answers / kinds: per item, the
    answer text (multiple choice: the true option) and the question kind used for per-kind accuracy.
    missing_kinds: the kind of every question whose clip is not in the split (scored wrong).
    num_truncated: texts cut to fit the text length.
    """

    items: QAItems
    answers: list[str]
    kinds: list[str]
    missing_kinds: list[str]
    num_truncated: int


def question_kind(example: QAExample, source: str) -> str:
    """The per-kind accuracy bucket: MSRVTT-QA's answer_type, TGIF-Frame's type, the TGIF task, else the
    question's first word when it is a question word (MSVD-QA), else the source."""
    extra = example.extra or {}
    for key in ("answer_type", "type"):
        if extra.get(key):
            return str(extra[key])
    if source.startswith("tgif_") and extra.get("task"):
        return str(extra["task"])
    words = example.question.lower().split()
    return words[0] if words and words[0] in QUESTION_WORDS else source


def rank_answers(train_answers: Iterable[str], top_k: int = 0) -> tuple[str, ...]:
    """The `top_k` (0: all) most frequent training answers, most frequent first; equal counts in alphabetical
    order, so the vocabulary does not depend on the order of the annotation file. Label = position."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    counts = collections.Counter(train_answers)
    ranked = sorted(counts, key=lambda a: (-counts[a], a))
    return tuple(ranked[:top_k] if top_k else ranked)


def load_answer_vocab(path: str | pathlib.Path) -> tuple[str, ...]:
    """Answers ordered by label from an `{answer: label}` JSON (MSRVTT-QA) or a one-per-line list (MSVD-QA)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"answer vocabulary {path} does not exist (set qa.answer_vocab, or '' for the "
                                "most frequent training answers)")
    labels = read_ans2label(path) if path.suffix == ".json" else read_answer_set(path)
    return tuple(sorted(labels, key=labels.__getitem__))


def _clip_positions(examples: Sequence[QAExample], clip_ids: Sequence[str], source: str, split: str
                    ) -> list[int | None]:
    position: dict[str, int] = {}
    for i, vid in enumerate(clip_ids):
        position.setdefault(vid, i)
    found = [position.get(ex.video) for ex in examples]
    if examples and all(p is None for p in found):
        hint = " (MSVD-QA: set qa.msvd_mapping to msvd_youtube_mapping.txt)" if source == "msvd_qa" else ""
        raise ValueError(f"none of the {len(examples)} {source} questions refers to a clip of split {split!r}: "
                         f"e.g. video {examples[0].video!r}, while the clips are named like "
                         f"{list(clip_ids[:3])}{hint}. Build the clips with `python -m clover_jax.prepare`.")
    return found


class _Tokens:
    """WordPiece ids of texts (no special tokens); `tok.pack` lays out the [CLS] ... [SEP] [PAD] rows."""

    def __init__(self):
        from data_pipelines.input.text_masking import load_tokenizer

        self.tok = load_tokenizer()

    def ids(self, text: str) -> list[int]:
        return [int(i) for i in self.tok.tokenize(text)[0]] if text else []


def _check_length(text_length: int) -> None:
    if text_length < 4:
        raise ValueError(f"qa.text_length={text_length} is too short for [CLS] text [SEP]; use >= 4")


def _fill_in_blank_tokens(tokens: _Tokens, question: str, budget: int) -> tuple[list[int], bool]:
    """Tokens of `question` with its blank as [MASK]; cut around the [MASK] to `budget` tokens."""
    if question.count(FIB_BLANK) != 1:
        raise ValueError(f"a fill-in-the-blank question needs exactly one {FIB_BLANK!r}: {question!r}")
    before, after = question.split(FIB_BLANK)
    left, right = tokens.ids(before), tokens.ids(after)
    room = budget - 1
    if len(left) + len(right) <= room:
        return left + [tokens.tok.mask_id] + right, False
    keep_right = min(len(right), max(room // 2, room - len(left)))
    keep_left = room - keep_right
    return left[len(left) - keep_left:] + [tokens.tok.mask_id] + right[:keep_right], True


def open_ended_items(examples: Sequence[QAExample], clip_ids: Sequence[str], vocab: Sequence[str],
                     text_length: int, *, source: str, split: str, fill_in_blank: bool = False) -> QASplit:
    """Open-ended (or, with `fill_in_blank`, [MASK]-position) items: (L,) question tokens, answer index in
    `vocab` or -1 (outside it: never trained on, always scored wrong)."""
    _check_length(text_length)
    tokens = _Tokens()
    found = _clip_positions(examples, clip_ids, source, split)
    answer_of = {a: i for i, a in enumerate(vocab)}
    kept, token_lists, truncated = [], [], 0
    for ex, clip in zip(examples, found):
        if clip is None:
            continue
        if fill_in_blank:
            ids, cut = _fill_in_blank_tokens(tokens, ex.question, text_length - 2)
        else:
            ids = tokens.ids(ex.question)
            cut = len(ids) > text_length - 2
            ids = ids[: text_length - 2]
        truncated += cut
        kept.append((ex, clip))
        token_lists.append(ids)
    ids, mask = tokens.tok.pack(token_lists, text_length)
    items = QAItems(np.asarray([c for _, c in kept], np.int32), ids, mask,
                    np.asarray([answer_of.get(ex.answer, -1) for ex, _ in kept], np.int32))
    return QASplit(items, [ex.answer for ex, _ in kept], [question_kind(ex, source) for ex, _ in kept],
                   [question_kind(ex, source) for ex, c in zip(examples, found) if c is None], truncated)


def training_shuffle_seed(option_order: str, seed: int) -> int | None:
    """`multiple_choice_items`' shuffle_seed for a training split: None ("file") or `seed` ("shuffled")."""
    if option_order not in OPTION_ORDERS:
        raise ValueError(f"qa.option_order={option_order!r}; valid: {OPTION_ORDERS}")
    return seed if option_order == "shuffled" else None


def _option_tokens(tokens: _Tokens, question: str, options: Sequence[str], option: str, fmt: str,
                   budget: int) -> tuple[list[int], bool]:
    """One option's text as at most `budget` tokens, and whether it was cut (see the module doc)."""
    if fmt != "full_answer_kept":
        ids = tokens.ids(mc_option_text(question, options, option, fmt))
        return ids[:budget], len(ids) > budget
    head = tokens.ids(f"{question} Options: {'. '.join(options)}.".strip())
    tail = tokens.ids(f"Answer: {option}")
    if len(head) + len(tail) <= budget:
        return head + tail, False
    tail = tail[:budget]
    return head[: budget - len(tail)] + tail, True


def multiple_choice_items(examples: Sequence[QAExample], clip_ids: Sequence[str], text_length: int, fmt: str,
                          *, source: str, split: str, shuffle_seed: int | None = None) -> QASplit:
    """K-option items: (K, L) option texts and the true option's index. Options keep the file's order unless
    `shuffle_seed` permutes each item's options (seeded per item; see `training_shuffle_seed`)."""
    if fmt not in MC_FORMATS:
        raise ValueError(f"qa.mc_format={fmt!r}; valid: {MC_FORMATS}")
    _check_length(text_length)
    tokens = _Tokens()
    found = _clip_positions(examples, clip_ids, source, split)
    ks = {len(ex.options or ()) for ex in examples}
    if len(ks) != 1 or 0 in ks:
        raise ValueError(f"{source} {split}: every multiple-choice item needs the same number of options, got {ks}")
    kept, token_lists, answers, truncated = [], [], [], 0
    for n, (ex, clip) in enumerate(zip(examples, found)):
        if clip is None:
            continue
        order = (np.random.default_rng([shuffle_seed, n]).permutation(len(ex.options)) if shuffle_seed is not None
                 else np.arange(len(ex.options)))
        options = [ex.options[i] for i in order]
        for option in options:
            ids, cut = _option_tokens(tokens, ex.question, options, option, fmt, text_length - 2)
            token_lists.append(ids)
            truncated += cut
        kept.append((ex, clip))
        answers.append(int(np.flatnonzero(order == ex.answer_index)[0]))
    k = ks.pop()
    ids, mask = tokens.tok.pack(token_lists, text_length)
    items = QAItems(np.asarray([c for _, c in kept], np.int32), ids.reshape(len(kept), k, text_length),
                    mask.reshape(len(kept), k, text_length), np.asarray(answers, np.int32))
    return QASplit(items, [ex.answer for ex, _ in kept], [question_kind(ex, source) for ex, _ in kept],
                   [question_kind(ex, source) for ex, c in zip(examples, found) if c is None], truncated)


def coverage_line(split_result: QASplit, source: str, split: str, vocab: Mapping | Sequence | None = None) -> str:
    """One printed line: questions, those with a clip, out-of-vocabulary answers, truncated texts."""
    n_items, n_missing = len(split_result.items), len(split_result.missing_kinds)
    line = (f"{source} {split}: {n_items + n_missing} questions, {n_items} with their clip, {n_missing} without "
            f"(scored wrong)")
    if vocab is not None:
        oov = int(np.sum(split_result.items.answer_index < 0))
        line += f", {oov} answers outside the {len(vocab)}-answer vocabulary (scored wrong)"
    return line + f", {split_result.num_truncated} texts cut to fit"
