"""Run-time WordPiece tokenization and whole-word MLM masking of captions (pure numpy; reference §3.2).

`encode_and_mask` turns a caption plus its build-time spaCy tags (`text_tags.tag_captions`) into
fixed-length int32 arrays: [CLS] tokens [SEP] + padding, the attention mask, the masked ids and the MLM
labels. Masking works on whole words: a tagged word covers every WordPiece token whose character span
overlaps it. `tf_encode_and_mask` wraps it for `tf.data.Dataset.map`.

Modes (`MASK_MODES`): "semantic" is the official rule: k = max(1, round(ratio x number of candidate
entries, a word counted as often as it enters the candidate list)); the entries are shuffled and the
first k distinct words taken. "semantic_dedup" is the previous rule: k from the distinct candidate words,
drawn uniformly. "random_whole_word" draws among the non-stop words; "none" masks nothing.

`word_budget` (random_whole_word only): "words" = k whole words; "tokens" (the official `_whole_word_mask`)
= k counts WordPiece tokens: shuffled words are taken while the total stays <= k, a word that would exceed
it is skipped. `random_ids`: "regular" draws replacement ids among regular tokens; "any" among the whole
vocabulary, special and [unusedN] entries included (the official `torch.randint(len(tokenizer))`).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

VOCAB_PATH = pathlib.Path(__file__).resolve().parents[1] / "assets" / "bert_base_uncased_vocab.txt"
IGNORE_LABEL = -100
OUTPUT_KEYS = ("text_ids", "text_mask", "text_ids_masked", "mlm_labels")
MASK_MODES = ("semantic", "semantic_dedup", "random_whole_word", "none")
WORD_BUDGETS = ("words", "tokens")
RANDOM_IDS = ("regular", "any")


@dataclasses.dataclass(frozen=True)
class TextMaskingConfig:
    """max_length counts [CLS] and [SEP]; mode: see `MASK_MODES` in the module docstring; mask_ratio sets
    how many candidate whole words are masked; each masked token becomes [MASK] with mask_prob, a random
    token with random_prob, else stays; word_budget and random_ids: see the module docstring."""

    max_length: int = 30
    mode: str = "semantic"
    mask_ratio: float = 0.3
    mask_prob: float = 0.8
    random_prob: float = 0.1
    word_budget: str = "words"
    random_ids: str = "regular"

    def __post_init__(self):
        if self.mode not in MASK_MODES:
            raise ValueError(f"TextMaskingConfig.mode must be one of {MASK_MODES}, got {self.mode!r}")
        if self.word_budget not in WORD_BUDGETS:
            raise ValueError(f"TextMaskingConfig.word_budget={self.word_budget!r}; valid: {WORD_BUDGETS}")
        if self.random_ids not in RANDOM_IDS:
            raise ValueError(f"TextMaskingConfig.random_ids={self.random_ids!r}; valid: {RANDOM_IDS}")
        if self.max_length < 3:
            raise ValueError(f"TextMaskingConfig.max_length must be >= 3 ([CLS] word [SEP]), got {self.max_length}")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"TextMaskingConfig.mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1.0:
            raise ValueError(
                f"TextMaskingConfig needs mask_prob, random_prob >= 0 and mask_prob + random_prob <= 1, "
                f"got {self.mask_prob} and {self.random_prob}"
            )


@dataclasses.dataclass(frozen=True)
class WordPieceTokenizer:
    """A lower-casing BERT WordPiece tokenizer (HF `tokenizers`) plus the special ids masking needs.

    `first_regular_id` is the first id that is not a bracketed special/[unused] entry: random
    replacement tokens are drawn from [first_regular_id, vocab_size).
    """

    backend: Any
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    first_regular_id: int
    vocab_size: int

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, char_start, char_end) of the WordPiece tokens, no special tokens; offsets index `text`."""
        enc = self.backend.encode(text, add_special_tokens=False)
        offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        return np.asarray(enc.ids, np.int32), offsets[:, 0], offsets[:, 1]

    def pack(self, token_lists: Sequence[Sequence[int]], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows `[CLS] tokens [SEP] [PAD]...` and their 0/1 masks, int32 (N, max_length)."""
        ids = np.full((len(token_lists), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(token_lists), max_length), np.int32)
        for row, tokens in enumerate(token_lists):
            n = len(tokens)
            if n + 2 > max_length:
                raise ValueError(f"{n} tokens + [CLS] + [SEP] do not fit max_length={max_length}")
            ids[row, 0], ids[row, 1:n + 1], ids[row, n + 1] = self.cls_id, tokens, self.sep_id
            mask[row, :n + 2] = 1
        return ids, mask

    def decode(self, ids: Any) -> str:
        """Text of token ids, special tokens and padding dropped, "##" pieces joined (for reports)."""
        return self.backend.decode([int(i) for i in ids if int(i) >= self.first_regular_id])


@functools.lru_cache(maxsize=4)
def load_tokenizer(vocab_path: str | None = None) -> WordPieceTokenizer:
    """The bert-base-uncased WordPiece tokenizer from the shipped vocab (lowercase, accents stripped)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    path = pathlib.Path(vocab_path) if vocab_path else VOCAB_PATH
    if not path.is_file():
        raise FileNotFoundError(f"WordPiece vocabulary {path} not found (expected one token per line)")
    vocab = path.read_text(encoding="utf-8").splitlines()
    backend = Tokenizer(models.WordPiece.from_file(str(path), unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    ids = {}
    for token in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"):
        ids[token] = backend.token_to_id(token)
        if ids[token] is None:
            raise ValueError(f"{path} has no {token}: not a BERT WordPiece vocabulary")
    is_special = [t.startswith("[") and t.endswith("]") for t in vocab]
    first_regular = next(i for i, special in enumerate(is_special) if not special)
    if any(is_special[first_regular:]):
        raise ValueError(f"{path}: special tokens must come first so random tokens are one id range")
    return WordPieceTokenizer(backend, ids["[PAD]"], ids["[CLS]"], ids["[SEP]"], ids["[MASK]"],
                              first_regular, len(vocab))


def _overlaps(word_start: np.ndarray, word_end: np.ndarray, tok_start: np.ndarray, tok_end: np.ndarray) -> np.ndarray:
    """[words, tokens] bool: the half-open character spans intersect."""
    return (tok_start[None, :] < word_end[:, None]) & (tok_end[None, :] > word_start[:, None])


def _check_tags(tags: Mapping[str, Any]) -> dict[str, np.ndarray]:
    missing = [k for k in ("word_start", "word_end", "candidate", "stop") if k not in tags]
    if missing:
        raise ValueError(f"tags lack {missing}; build them with text_tags.tag_captions")
    arrays = {k: np.asarray(tags[k]).reshape(-1) for k in ("word_start", "word_end", "candidate", "stop")}
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"tag arrays must have equal lengths (one entry per spaCy word), got {lengths}")
    return arrays


def choose_masked_words(
    tags: Mapping[str, Any], tok_start: np.ndarray, tok_end: np.ndarray, n_keep: int, rng: np.random.Generator,
    cfg: TextMaskingConfig,
) -> list[np.ndarray]:
    """Token indices (into the caption's tokens, no [CLS]) of each whole word chosen for masking.

    Candidate words: tags["candidate"] > 0 (modes "semantic", "semantic_dedup") or stop == 0
    ("random_whole_word"); a word cut (even partly) by truncation to the first `n_keep` tokens, or
    covering no token, is dropped; words covering the same token set are one word ("semantic" adds up
    their counts). "semantic" (official): k = max(1, round(mask_ratio * sum of the counts)); the
    candidate entries (word i repeated count_i times) are shuffled and walked, skipping a word whose
    tokens are already taken, until k words are taken. Other modes: k = max(1, round(mask_ratio *
    #words)) words drawn uniformly ("random_whole_word" with word_budget "tokens": k tokens, see
    `_take_within_token_budget`). Mode "none" or no candidate: [].
    """
    if cfg.mode == "none":
        return []
    arrays = _check_tags(tags)
    semantic = cfg.mode in ("semantic", "semantic_dedup")
    weight = arrays["candidate"] if semantic else (arrays["stop"] == 0).astype(np.int32)
    eligible = weight > 0
    overlap = _overlaps(arrays["word_start"][eligible].astype(np.int64),
                        arrays["word_end"][eligible].astype(np.int64), tok_start, tok_end)
    groups: dict[tuple[int, ...], int] = {}  # insertion-ordered: token-index tuple -> count
    for row, count in zip(overlap, weight[eligible]):
        token_indices = np.flatnonzero(row)
        if len(token_indices) and token_indices[-1] < n_keep:
            key = tuple(token_indices.tolist())
            groups[key] = groups.get(key, 0) + int(count)
    words = [np.asarray(g) for g in groups]
    if not words:
        return []
    if cfg.mode != "semantic":
        k = max(1, round(cfg.mask_ratio * len(words)))
        if cfg.mode == "random_whole_word" and cfg.word_budget == "tokens":
            return _take_within_token_budget(words, rng.permutation(len(words)), k)
        return [words[i] for i in rng.permutation(len(words))[:k]]
    counts = np.fromiter(groups.values(), np.int64, len(words))
    k = max(1, round(cfg.mask_ratio * int(counts.sum())))
    entries = rng.permutation(np.repeat(np.arange(len(words)), counts))
    chosen: list[np.ndarray] = []
    taken: set[int] = set()
    for i in entries:
        if len(chosen) == k:
            break
        tokens = words[i].tolist()
        if taken.isdisjoint(tokens):
            taken.update(tokens)
            chosen.append(words[i])
    return chosen


def _take_within_token_budget(words: list[np.ndarray], order: np.ndarray, budget: int) -> list[np.ndarray]:
    """Words in `order` while their tokens total <= budget (a word that would exceed it, or that shares a
    token with a taken word, is skipped); stops once the budget is reached."""
    chosen: list[np.ndarray] = []
    taken: set[int] = set()
    for i in order:
        if len(taken) >= budget:
            break
        tokens = words[i].tolist()
        if len(taken) + len(tokens) > budget or not taken.isdisjoint(tokens):
            continue
        taken.update(tokens)
        chosen.append(words[i])
    return chosen


def encode_and_mask(
    caption: str,
    tags: Mapping[str, Any],
    rng: np.random.Generator,
    cfg: TextMaskingConfig,
    tokenizer: WordPieceTokenizer | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes `caption` and masks whole words; returns int32 arrays of length cfg.max_length.

    text_ids: [CLS] tokens [SEP], truncated to max_length, padded with [PAD]=0; text_mask: 1 on real
    tokens; text_ids_masked: text_ids with masked tokens replaced; mlm_labels: the original id at masked
    positions, -100 elsewhere.

    The words to mask come from `choose_masked_words`; each of their tokens independently becomes
    [MASK] / a random regular token / itself with probabilities mask_prob / random_prob / rest.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"encode_and_mask needs a non-empty caption, got {caption!r}")
    tok = tokenizer or load_tokenizer()
    _check_tags(tags)
    ids, tok_start, tok_end = tok.tokenize(caption)
    n_keep = min(len(ids), cfg.max_length - 2)
    packed_ids, packed_mask = tok.pack([ids[:n_keep]], cfg.max_length)
    text_ids, text_mask = packed_ids[0], packed_mask[0]
    text_ids_masked = text_ids.copy()
    mlm_labels = np.full(cfg.max_length, IGNORE_LABEL, np.int32)

    chosen = choose_masked_words(tags, tok_start, tok_end, n_keep, rng, cfg) if len(ids) else []
    if chosen:
        positions = np.unique(np.concatenate(chosen)) + 1  # after [CLS]
        mlm_labels[positions] = text_ids[positions]
        u = rng.random(len(positions))
        to_mask = u < cfg.mask_prob
        to_random = (u >= cfg.mask_prob) & (u < cfg.mask_prob + cfg.random_prob)
        text_ids_masked[positions[to_mask]] = tok.mask_id
        low = 0 if cfg.random_ids == "any" else tok.first_regular_id
        text_ids_masked[positions[to_random]] = rng.integers(low, tok.vocab_size, int(to_random.sum()),
                                                             dtype=np.int64)
    return {"text_ids": text_ids, "text_mask": text_mask,
            "text_ids_masked": text_ids_masked, "mlm_labels": mlm_labels}


def seed_to_generator(seed: Any) -> np.random.Generator:
    """numpy Generator from an int64 seed: a scalar or a shape-(2,) pair (e.g. (global_seed, index)).

    The values are read as uint64 words of a `SeedSequence`, so negative seeds are fine; a scalar s
    and the 1-vector [s] give the same stream, different pairs give independent streams.
    """
    words = np.asarray(seed, np.int64).reshape(-1).view(np.uint64)
    if words.size == 0 or words.size > 2:
        raise ValueError(f"seed must be a scalar or have shape (2,), got shape {np.shape(seed)}")
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def tf_encode_and_mask(
    caption: Any,
    word_start: Any,
    word_end: Any,
    candidate: Any,
    stop: Any,
    seed: Any,
    cfg: TextMaskingConfig,
    tokenizer: WordPieceTokenizer | None = None,
) -> dict[str, Any]:
    """`encode_and_mask` for one (unbatched) example inside `tf.data.Dataset.map`.

    caption: scalar tf.string (UTF-8); word_start/word_end/candidate/stop: 1-D int tensors from
    `tag_captions`; seed: int64 scalar or shape (2,) tensor (see `seed_to_generator`), e.g.
    `tf.stack([global_seed, example_index])` or a per-epoch seed from `tf.data.Dataset.random`.
    Deterministic given the seed. Returns a dict of int32 tensors with static shape (max_length,).
    An empty caption raises (tf.errors.InvalidArgumentError wrapping ValueError).
    """
    import tensorflow as tf

    tok = tokenizer or load_tokenizer()

    def _numpy_fn(caption_bytes, ws, we, cand, st, seed_value):
        if isinstance(caption_bytes, np.ndarray):  # eager calls pass a 0-d object array
            caption_bytes = caption_bytes.item()
        text = caption_bytes.decode("utf-8") if isinstance(caption_bytes, bytes) else str(caption_bytes)
        out = encode_and_mask(
            text, {"word_start": ws, "word_end": we, "candidate": cand, "stop": st},
            seed_to_generator(seed_value), cfg, tok)
        return tuple(out[k] for k in OUTPUT_KEYS)

    outputs = tf.numpy_function(
        _numpy_fn,
        [caption, tf.cast(word_start, tf.int32), tf.cast(word_end, tf.int32), tf.cast(candidate, tf.int32),
         tf.cast(stop, tf.int32), tf.cast(seed, tf.int64)],
        [tf.int32] * len(OUTPUT_KEYS),
        stateful=False,
        name="encode_and_mask",
    )
    result = {}
    for key, tensor in zip(OUTPUT_KEYS, outputs):
        tensor.set_shape((cfg.max_length,))
        result[key] = tensor
    return result
