"""Synthetic VideoQA from the synthetic clips' metadata: open-ended attribute questions and 5-way multiple choice.

The clips are those of `data_pipelines.build.synthetic` (same seeds, same cache, nothing re-rendered): each
built example carries its colour / shape / count / motion as JSON metadata, read by `clip_attributes`.

Open-ended: per clip, one question per attribute, phrased so the question never names its answer:
  colour  "what colour are the squares?"        -> "red"
  shape   "what shape are the red objects?"     -> "square"
  count   "how many red squares are there?"     -> "two"   (always plural: the noun cannot leak the count)
  motion  "how do the red squares move?"        -> "left"
Answers form one vocabulary (`ANSWERS`, 21 words); `qa_tasks.rank_answers` keeps the most frequent training
answers (like MSRVTT-QA's top-1500) and `answer_indices` gives -1 to an answer outside it.

Multiple choice: 5 caption-style options per clip, one true. The options form a "star": a centre
attribute tuple plus its 4 one-attribute variants (one per attribute), and the truth is placed at a
uniformly drawn node of the star. So every distractor is close to the truth, yet the text alone cannot
tell which node is true (with the truth always at the centre, "the option most like the others" would
win without looking at the video). `mc_option_text` renders the reference §5.2 format
(question + " Options: " + all options + " Answer: " + option) or the option alone.

Everything is a pure function of (attributes, seed).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from data_pipelines.build import built_splits
from data_pipelines.build.synthetic import COLOURS, COUNT_WORDS, MOTIONS, SHAPES, TEMPLATES, ClipSpec, captions_for

ATTRIBUTES = ("colour", "shape", "count", "motion")
ATTRIBUTE_VALUES: dict[str, tuple] = {
    "colour": tuple(COLOURS), "shape": SHAPES, "count": tuple(COUNT_WORDS), "motion": MOTIONS,
}
# Every possible open-ended answer, in a fixed order (colours, shapes, counts, motions).
ANSWERS: tuple[str, ...] = (*COLOURS, *SHAPES, *COUNT_WORDS.values(), *MOTIONS)
NUM_OPTIONS = 5
MC_QUESTION = "which sentence describes the video?"
# "full": the official text (right-truncated); "full_answer_kept": ours before, options joined with ". " and,
# in `qa_tasks.multiple_choice_items`, a long text cut in its option list so " Answer: option" survives.
MC_FORMATS = ("caption", "full", "full_answer_kept")


@dataclasses.dataclass(frozen=True)
class OpenQuestion:
    """An open-ended question about clip `clip_index` (storage order of the built split)."""

    clip_index: int
    kind: str  # one of ATTRIBUTES
    question: str
    answer: str


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    """A multiple-choice item: `options[answer_index]` describes clip `clip_index`."""

    clip_index: int
    question: str
    options: tuple[str, ...]
    answer_index: int


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _answer(kind: str, attrs: Mapping) -> str:
    return COUNT_WORDS[int(attrs["count"])] if kind == "count" else str(attrs[kind])


def _question(kind: str, attrs: Mapping, template: int) -> str:
    """Question text of `kind` about a clip; never mentions the asked attribute."""
    many = int(attrs["count"]) > 1
    noun = _plural(attrs["shape"]) if many else attrs["shape"]
    be, do = ("are", "do") if many else ("is", "does")
    colour = attrs["colour"]
    templates = {
        "colour": (f"what colour {be} the {noun}?", f"what is the colour of the {noun}?"),
        "shape": (f"what shape {be} the {colour} {'objects' if many else 'object'}?",
                  f"which shape is shown in {colour}?"),
        "count": (f"how many {colour} {_plural(attrs['shape'])} are there?",
                  f"how many {_plural(attrs['shape'])} can you see?"),
        "motion": (f"how {do} the {colour} {noun} move?", f"in which direction {do} the {noun} move?"),
    }[kind]
    return templates[template % len(templates)]


def open_ended_questions(attributes: Sequence[Mapping], seed: int = 0) -> list[OpenQuestion]:
    """One question per (clip, attribute kind); the phrasing is drawn from (seed, clip, kind)."""
    out = []
    for clip, attrs in enumerate(attributes):
        _check_attrs(clip, attrs)
        for k, kind in enumerate(ATTRIBUTES):
            template = int(np.random.default_rng([seed, clip, k, 0x0A]).integers(2))
            out.append(OpenQuestion(clip, kind, _question(kind, attrs, template), _answer(kind, attrs)))
    return out


def _check_attrs(clip: int, attrs: Mapping) -> None:
    for name in ATTRIBUTES:
        if name not in attrs:
            raise ValueError(f"clip {clip}: metadata lacks {name!r} (has {sorted(attrs)}); synthetic QA needs "
                             "a dataset built by data_pipelines.build.synthetic")
        if name != "count" and attrs[name] not in ATTRIBUTE_VALUES[name]:
            raise ValueError(f"clip {clip}: {name}={attrs[name]!r} is not one of {ATTRIBUTE_VALUES[name]}")


def _valid(t: Mapping) -> bool:
    return not (t["motion"] == "spin" and t["shape"] == "circle")  # never rendered (looks still)


def _variant(t: Mapping, name: str, rng: np.random.Generator, avoid: Sequence[Mapping] = ()) -> dict:
    """`t` with attribute `name` changed to a random other value (a rendered combination, not in `avoid`)."""
    choices = [v for v in ATTRIBUTE_VALUES[name]
               if v != t[name] and _valid({**t, name: v}) and {**t, name: v} not in avoid]
    return {**t, name: choices[int(rng.integers(len(choices)))]}


def _caption(attrs: Mapping, template: int) -> str:
    spec = ClipSpec(attrs["colour"], attrs["shape"], int(attrs["count"]), attrs["motion"], (), 0.0, (template,))
    return captions_for(spec)[0]


def multiple_choice_questions(attributes: Sequence[Mapping], seed: int = 0, per_clip: int = 1) -> list[MCQuestion]:
    """`per_clip` 5-option items per clip (see the module docstring for how distractors are drawn)."""
    out = []
    for clip, attrs in enumerate(attributes):
        _check_attrs(clip, attrs)
        truth = {k: (int(attrs[k]) if k == "count" else attrs[k]) for k in ATTRIBUTES}
        for item in range(per_clip):
            rng = np.random.default_rng([seed, clip, item, 0x3C])
            node = int(rng.integers(NUM_OPTIONS))  # 0: the truth is the centre; a: variant on attribute a-1
            centre = truth if node == 0 else _variant(truth, ATTRIBUTES[node - 1], rng)
            tuples = [centre] + [truth if a + 1 == node else _variant(centre, name, rng, avoid=[truth])
                                 for a, name in enumerate(ATTRIBUTES)]
            order = rng.permutation(NUM_OPTIONS)
            template = int(rng.integers(len(TEMPLATES)))
            options = tuple(_caption(tuples[i], template) for i in order)
            out.append(MCQuestion(clip, MC_QUESTION, options, int(np.flatnonzero(order == node)[0])))
    return out


def mc_option_text(question: str, options: Sequence[str], option: str, fmt: str = "full") -> str:
    """Text scored for one option: the official question + " Options: " + " ".join(options) + " Answer: " +
    option ("full", §5.2; the official `QATextPrepare` with use_all_ans), the same with the options joined
    by ". " ("full_answer_kept"), or the option alone ("caption")."""
    if fmt == "caption":
        return option
    if fmt == "full":
        return question + " Options: " + " ".join(options) + " Answer: " + option
    if fmt == "full_answer_kept":
        return f"{question} Options: {'. '.join(options)}. Answer: {option}"
    raise ValueError(f"multiple-choice text format {fmt!r}; valid: {MC_FORMATS}")


def answer_indices(answers: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """int32 index of each answer in `vocab`; -1 (out of vocabulary: always scored wrong) when absent."""
    position = {a: i for i, a in enumerate(vocab)}
    return np.asarray([position.get(a, -1) for a in answers], np.int32)


def encode_texts(texts: Sequence[str], max_length: int, *, truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] tokens [SEP] [PAD]... ids and masks, int32 (N, max_length). A text that does not fit raises
    (a cut multiple-choice text would lose the option it is about) unless `truncate` cuts it."""
    from data_pipelines.input.text_masking import load_tokenizer

    tok = load_tokenizer()
    token_lists = []
    for text in texts:
        tokens = tok.tokenize(text)[0]
        if truncate:
            tokens = tokens[: max_length - 2]
        if len(tokens) + 2 > max_length:
            raise ValueError(f"text of {len(tokens) + 2} tokens does not fit text_length={max_length}: "
                             f"{text!r}; raise the QA text length")
        token_lists.append(tokens)
    return tok.pack(token_lists, max_length)


def clip_attributes(dataset_folder: str | os.PathLike, split: str) -> list[dict]:
    """Metadata dicts (colour, shape, count, motion, ...) of every example of a built split, in storage order."""
    import tensorflow as tf


    source = built_splits.open_source(dataset_folder, split)
    spec = {"metadata": tf.io.FixedLenFeature([], tf.string)}
    out: list[dict] = []
    for start in range(0, len(source), 512):
        raw = source.__getitems__(list(range(start, min(start + 512, len(source)))))
        out += [json.loads(m.decode("utf-8")) for m in tf.io.parse_example(tf.constant(raw), spec)["metadata"].numpy()]
    return out
