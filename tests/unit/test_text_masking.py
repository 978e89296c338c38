"""Tests for spaCy semantic tags (text_tags) and WordPiece whole-word MLM masking (text_masking)."""
import collections
import csv
import itertools
import time

import numpy as np
import pytest

from data_pipelines.build import text_tags
from data_pipelines.input import text_masking as tm

MASKABLE_POS = {"NOUN", "PROPN", "VERB", "AUX", "ADV"}
# Common lowercase words that are single WordPiece tokens in bert-base-uncased.
SYNTHETIC_WORDS = ("dog cat man woman car ball tree house river road child table guitar phone horse "
                   "boat field kitchen street music").split()


@pytest.fixture(scope="module")
def tokenizer():
    return tm.load_tokenizer()


@pytest.fixture(scope="module")
def nlp():
    return text_tags.load_tagger()


@pytest.fixture(scope="module")
def jsfusion(real_data_dir, nlp):
    with open(real_data_dir / "msrvtt" / "MSRVTT_JSFUSION_test.csv", newline="", encoding="utf-8") as f:
        captions = [row["sentence"] for row in csv.DictReader(f)]
    start = time.perf_counter()
    tags = text_tags.tag_captions(captions, nlp, with_pos=True)
    print(f"\n[tagger] {len(captions)} captions tagged in {time.perf_counter() - start:.2f} s (nlp.pipe)")
    return captions, tags


def synthetic_tags(caption: str, candidate: bool = True) -> dict:
    """Whitespace-split word tags: every word a candidate (or none), none a stop word."""
    starts, ends, pos = [], [], 0
    for word in caption.split(" "):
        starts.append(pos)
        ends.append(pos + len(word))
        pos += len(word) + 1
    n = len(starts)
    return {"word_start": np.array(starts, np.int32), "word_end": np.array(ends, np.int32),
            "candidate": np.full(n, int(candidate), np.int32), "stop": np.zeros(n, np.int32)}


def masked_positions(out: dict) -> np.ndarray:
    return np.flatnonzero(out["mlm_labels"] != tm.IGNORE_LABEL)


def test_tokenizer_loads_shipped_vocab(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id) == (
        30522, 103, 101, 102, 0)
    assert tokenizer.first_regular_id == 999  # [PAD], [unused*], [UNK], [CLS], [SEP], [MASK] come first
    ids, start, end = tokenizer.tokenize("Hello World, snowboarding")
    assert ids.tolist() == [7592, 2088, 1010, 4586, 21172]  # lower-cased; snow ##boarding
    assert list(zip(start.tolist(), end.tolist())) == [(0, 5), (6, 11), (11, 12), (13, 17), (17, 25)]


def test_tags_offsets_candidates_and_stops(nlp):
    caption = "A man is quickly running, and the dog eats."
    (tags,) = text_tags.tag_captions([caption], nlp)
    assert set(tags) == set(text_tags.TAG_KEYS)
    assert all(v.dtype == np.int32 and v.shape == tags["word_start"].shape for v in tags.values())
    words = [caption[s:e] for s, e in zip(tags["word_start"], tags["word_end"])]
    assert words == ["A", "man", "is", "quickly", "running", ",", "and", "the", "dog", "eats", "."]
    candidates = {w: int(c) for w, c in zip(words, tags["candidate"]) if c}
    # nouns plus verb phrases: "quickly running" (ADV VERB; "is" precedes the ADV, outside the
    # pattern's order VERB? ADV* AUX* VERB+) and "eats"; "running" is in two matches (with and
    # without "quickly"), so it enters the candidate list twice
    assert candidates == {"man": 1, "quickly": 1, "running": 2, "dog": 1, "eats": 1}
    (aux,) = text_tags.tag_captions(["the dog is eating"], nlp)
    assert aux["candidate"].tolist() == [0, 1, 1, 2]  # AUX VERB: the auxiliary is a candidate
    (previous,) = text_tags.tag_captions(["the dog is eating"], nlp, rule="cased_caption")
    assert previous["candidate"].tolist() == [0, 1, 1, 1]  # the previous rule stores 0/1
    stops = {w for w, s in zip(words, tags["stop"]) if s}
    assert stops == {"A", "is", ",", "and", "the", "."}
    (empty,) = text_tags.tag_captions([""], nlp)
    assert all(len(v) == 0 for v in empty.values())


def test_semantic_masking_on_real_msrvtt_captions(jsfusion, tokenizer):
    captions, tags = jsfusion
    assert len(captions) == 1000
    cfg = tm.TextMaskingConfig()
    with_mask = 0
    pos_counts = collections.Counter()
    for i, (caption, tag) in enumerate(zip(captions, tags)):
        out = tm.encode_and_mask(caption, tag, np.random.default_rng(i), cfg, tokenizer)
        positions = masked_positions(out)
        with_mask += len(positions) > 0
        _, tok_start, tok_end = tokenizer.tokenize(caption)
        masked_tokens = positions - 1  # position 0 is [CLS]
        hit = ((tok_start[masked_tokens][None, :] < tag["word_end"][:, None])
               & (tok_end[masked_tokens][None, :] > tag["word_start"][:, None])).any(axis=1)
        for pos_id in tag["pos"][hit]:
            pos_counts[nlp_pos_name(pos_id)] += 1
    caption_rate = with_mask / len(captions)
    masked_words = sum(pos_counts.values())
    pos_rate = sum(pos_counts[p] for p in MASKABLE_POS) / masked_words
    print(f"\n[semantic masking, MSRVTT 1k-A] captions with >=1 masked whole word: {100 * caption_rate:.1f}% "
          f"| masked words NOUN/PROPN/VERB/AUX/ADV: {100 * pos_rate:.1f}% of {masked_words} "
          f"| POS counts {dict(pos_counts.most_common())}")
    assert caption_rate >= 0.95
    assert pos_rate >= 0.90


def nlp_pos_name(pos_id: int) -> str:
    import spacy.symbols

    return spacy.symbols.NAMES[int(pos_id)]


def test_random_whole_word_mode_masks_only_non_stop_words(jsfusion, tokenizer):
    captions, tags = jsfusion
    cfg = tm.TextMaskingConfig(mode="random_whole_word")
    for i, (caption, tag) in enumerate(zip(captions[:200], tags[:200])):
        out = tm.encode_and_mask(caption, tag, np.random.default_rng(i), cfg, tokenizer)
        _, tok_start, tok_end = tokenizer.tokenize(caption)
        masked = masked_positions(out) - 1
        non_stop = tag["stop"] == 0
        covered = ((tok_start[masked][None, :] < tag["word_end"][non_stop][:, None])
                   & (tok_end[masked][None, :] > tag["word_start"][non_stop][:, None])).any(axis=0)
        assert covered.all(), caption
        if non_stop.any():
            assert len(masked) > 0, caption


def test_labels_and_80_10_10_split(tokenizer):
    rng = np.random.default_rng(1234)
    cfg = tm.TextMaskingConfig()
    outcomes = collections.Counter()
    captions = 0
    while sum(outcomes.values()) < 10_000:
        n_words = int(rng.integers(3, 21))
        caption = " ".join(rng.choice(SYNTHETIC_WORDS, n_words))
        out = tm.encode_and_mask(caption, synthetic_tags(caption), rng, cfg, tokenizer)
        captions += 1
        positions = masked_positions(out)
        assert len(positions) == max(1, round(0.3 * n_words))  # one token per synthetic word
        unmasked = np.setdiff1d(np.arange(cfg.max_length), positions)
        assert (out["mlm_labels"][unmasked] == -100).all()
        assert (out["text_ids_masked"][unmasked] == out["text_ids"][unmasked]).all()
        assert (out["mlm_labels"][positions] == out["text_ids"][positions]).all()
        assert (out["text_mask"][positions] == 1).all() and positions.min() >= 1
        for p in positions:
            new, old = out["text_ids_masked"][p], out["text_ids"][p]
            if new == tokenizer.mask_id:
                outcomes["mask"] += 1
            elif new == old:
                outcomes["kept"] += 1
            else:
                assert tokenizer.first_regular_id <= new < tokenizer.vocab_size
                outcomes["random"] += 1
    total = sum(outcomes.values())
    fractions = {k: outcomes[k] / total for k in ("mask", "random", "kept")}
    print(f"\n[80/10/10] over {total} masked tokens in {captions} captions: "
          + ", ".join(f"{k} {100 * v:.2f}%" for k, v in fractions.items()))
    assert abs(fractions["mask"] - 0.8) < 0.02
    assert abs(fractions["random"] - 0.1) < 0.02
    assert abs(fractions["kept"] - 0.1) < 0.02


def test_whole_words_are_masked_together(tokenizer):
    caption = "snowboarding skateboarding"  # snow ##boarding, skate ##boarding
    cfg = tm.TextMaskingConfig(mask_ratio=0.5)
    seen = set()
    for seed in range(20):
        out = tm.encode_and_mask(caption, synthetic_tags(caption), np.random.default_rng(seed), cfg, tokenizer)
        seen.add(tuple(masked_positions(out).tolist()))
    assert seen == {(1, 2), (3, 4)}


def test_seed_determinism(tokenizer):
    caption = " ".join(SYNTHETIC_WORDS)
    tags = synthetic_tags(caption)
    cfg = tm.TextMaskingConfig()

    def run(seed):
        out = tm.encode_and_mask(caption, tags, np.random.default_rng(seed), cfg, tokenizer)
        return out["text_ids_masked"], out["mlm_labels"]

    a, b, c = run(7), run(7), run(8)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all((x == y).all() for x, y in zip(a, c))


def test_truncation_and_padding(tokenizer):
    cfg = tm.TextMaskingConfig(max_length=10, mask_ratio=1.0, mask_prob=1.0, random_prob=0.0)
    # 7 single-token words, then "snowboarding" = snow ##boarding at token slots 8-9: cut by truncation
    caption = "dog cat man woman car ball tree snowboarding river"
    out = tm.encode_and_mask(caption, synthetic_tags(caption), np.random.default_rng(0), cfg, tokenizer)
    ids, _, _ = tokenizer.tokenize(caption)
    assert out["text_ids"][0] == 101 and out["text_ids"][9] == 102
    assert (out["text_ids"][1:9] == ids[:8]).all()
    assert (out["text_mask"] == 1).all()
    # every whole word that survived truncation is masked; the cut word "snowboarding" (slot 8) is not
    assert masked_positions(out).tolist() == list(range(1, 8))
    assert out["text_ids_masked"][8] == out["text_ids"][8]

    short = tm.encode_and_mask("a dog", synthetic_tags("a dog"), np.random.default_rng(0), cfg, tokenizer)
    assert short["text_ids"].tolist() == [101, 1037, 3899, 102] + [0] * 6
    assert short["text_mask"].tolist() == [1] * 4 + [0] * 6
    assert all(v.dtype == np.int32 and v.shape == (10,) for v in short.values())


def test_no_candidates_none_mode_and_errors(tokenizer):
    caption = "dog cat"
    no_cand = tm.encode_and_mask(caption, synthetic_tags(caption, candidate=False), np.random.default_rng(0),
                                 tm.TextMaskingConfig(), tokenizer)
    assert (no_cand["mlm_labels"] == -100).all() and (no_cand["text_ids_masked"] == no_cand["text_ids"]).all()
    none = tm.encode_and_mask(caption, synthetic_tags(caption), np.random.default_rng(0),
                              tm.TextMaskingConfig(mode="none"), tokenizer)
    assert (none["mlm_labels"] == -100).all()
    with pytest.raises(ValueError, match="non-empty caption"):
        tm.encode_and_mask("   ", synthetic_tags("x"), np.random.default_rng(0), tm.TextMaskingConfig(), tokenizer)
    bad_tags = dict(synthetic_tags(caption), stop=np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="equal lengths"):
        tm.encode_and_mask(caption, bad_tags, np.random.default_rng(0), tm.TextMaskingConfig(), tokenizer)
    with pytest.raises(ValueError, match="mode"):
        tm.TextMaskingConfig(mode="span")
    with pytest.raises(ValueError, match="mask_prob"):
        tm.TextMaskingConfig(mask_prob=0.9, random_prob=0.2)


def test_tf_wrapper_in_dataset_map(tokenizer):
    tf = pytest.importorskip("tensorflow")
    captions = ["a man is riding a horse", "two dogs play in the snow with a ball", "skateboarding tricks"]
    tags = [synthetic_tags(c) for c in captions]
    cfg = tm.TextMaskingConfig(max_length=8)
    ds = tf.data.Dataset.from_tensor_slices({
        "caption": captions,
        **{k: tf.ragged.constant([t[k] for t in tags], dtype=tf.int32) for k in text_tags.TAG_KEYS},
        "index": tf.range(len(captions), dtype=tf.int64),
    })

    def encode(ex):
        seed = tf.stack([tf.constant(5, tf.int64), ex["index"]])
        return tm.tf_encode_and_mask(ex["caption"], ex["word_start"], ex["word_end"], ex["candidate"],
                                     ex["stop"], seed, cfg)

    mapped = ds.map(encode, num_parallel_calls=2)
    for key in tm.OUTPUT_KEYS:
        assert mapped.element_spec[key].shape == (8,) and mapped.element_spec[key].dtype == tf.int32
    first = [{k: v.numpy() for k, v in ex.items()} for ex in mapped]
    second = [{k: v.numpy() for k, v in ex.items()} for ex in mapped]
    for i, (a, b) in enumerate(zip(first, second)):
        expected = tm.encode_and_mask(captions[i], tags[i], tm.seed_to_generator(np.array([5, i])), cfg, tokenizer)
        for key in tm.OUTPUT_KEYS:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], expected[key])
    scalar = tm.tf_encode_and_mask(tf.constant(captions[0]), *(tf.constant(tags[0][k]) for k in text_tags.TAG_KEYS),
                                   tf.constant(3, tf.int64), cfg)
    np.testing.assert_array_equal(
        scalar["mlm_labels"].numpy(),
        tm.encode_and_mask(captions[0], tags[0], tm.seed_to_generator(3), cfg, tokenizer)["mlm_labels"])


# ----------------------------------------------------------------------------- the official rule


def official_candidate_entries(caption: str, nlp, tokenizer, max_length: int = 30) -> tuple[list[str], list[int]]:
    """Words and candidate list (word indices, repeats kept) built step by step as the official masker does
    (LeeYN-43/Clover loading.py, BertTokenizer with scene_graph_mask_obj_verb): the WordPiece words of the
    truncated caption re-joined with spaces, spaCy over that text, its spaCy-token -> word alignment (a split
    word takes the POS of its last piece), NOUN/PROPN words once, then every token of every verb-phrase match."""
    pieces = tokenizer.backend.encode(caption, add_special_tokens=False).tokens[:max_length - 2]
    words: list[str] = []
    for piece in pieces:
        if piece.startswith("##") and words:
            words[-1] += piece.replace("#", "")
        else:
            words.append(piece.replace("#", ""))
    doc = nlp(" ".join(words))
    word_pos, word_of = [t.pos_ for t in doc], {}
    if len(doc) != len(words):
        word_pos, partial, w = [], "", 0
        for t in doc:
            word_of[t.i] = w
            if t.text == words[w] or partial + t.text == words[w]:
                word_pos.append(t.pos_)
                partial, w = "", w + 1
            else:
                partial += t.text
    entries = [w for w, pos in enumerate(word_pos) if pos in ("NOUN", "PROPN")]
    for _, start, end in nlp._clover_verb_matcher(doc):
        entries += [word_of.get(i, i) for i in range(start, end)]
    return words, entries


def candidate_counts(caption: str, tags: dict) -> dict[str, int]:
    return {caption[s:e].lower(): int(c) for s, e, c in zip(tags["word_start"], tags["word_end"], tags["candidate"])
            if c}


def chosen_count(caption: str, tags: dict, mode: str, tokenizer, seed: int = 0) -> int:
    """How many whole words the masker picks (deterministic: min(k, distinct candidate words))."""
    ids, tok_start, tok_end = tokenizer.tokenize(caption)
    cfg = tm.TextMaskingConfig(mode=mode)
    return len(tm.choose_masked_words(tags, tok_start, tok_end, min(len(ids), cfg.max_length - 2),
                                      np.random.default_rng(seed), cfg))


def test_official_rule_on_real_msrvtt_captions(jsfusion, nlp, tokenizer):
    captions, tags = jsfusion
    # Hand-checked from spaCy (en_core_web_sm 3.8) on the lower-cased words:
    # "is connecting" (AUX VERB) and "connecting" both match VERB? ADV* AUX* VERB+, so "connecting" enters
    # twice: 5 entries -> k = round(1.5) = 2 words, where the previous rule's 4 distinct words give round(1.2) = 1.
    assert captions[0] == "a person is connecting something to system"
    assert candidate_counts(captions[0], tags[0]) == {"person": 1, "is": 1, "connecting": 2, "system": 1}
    assert chosen_count(captions[0], tags[0], "semantic", tokenizer) == 2
    assert chosen_count(captions[0], tags[0], "semantic_dedup", tokenizer) == 1
    # "are being lit", "being lit", "lit" and "exploding" all match: 10 entries -> k = 3 (previous: 7 -> 2).
    assert captions[9] == "fireworks are being lit and exploding in a night sky"
    assert candidate_counts(captions[9], tags[9]) == {
        "fireworks": 1, "are": 1, "being": 2, "lit": 3, "exploding": 1, "night": 1, "sky": 1}
    assert chosen_count(captions[9], tags[9], "semantic", tokenizer) == 3
    assert chosen_count(captions[9], tags[9], "semantic_dedup", tokenizer) == 2
    # Cased text: the 1k-A captions are all lower case; written in sentence case (as WebVid/CC3M captions
    # are), spaCy reads "Boy" as INTJ, so the previous rule (tags of the cased caption) loses it, while the
    # official rule tags the lower-cased words and keeps "boy" a noun.
    assert captions[61] == "boy band performs for a crowd"
    cased = "Boy band performs for a crowd"
    official, previous = (text_tags.tag_captions([cased], nlp, rule=r)[0] for r in ("wordpiece_lower", "cased_caption"))
    assert candidate_counts(cased, official) == candidate_counts(captions[61], tags[61]) == {
        "boy": 1, "band": 1, "performs": 1, "crowd": 1}
    assert candidate_counts(cased, previous) == {"band": 1, "performs": 1, "crowd": 1}


def test_stored_tags_match_the_official_procedure_on_all_1k_a_captions(jsfusion, nlp, tokenizer):
    captions, tags = jsfusion
    differ_from_distinct = 0
    for caption, tag in zip(captions, tags):
        words, entries = official_candidate_entries(caption, nlp, tokenizer)
        ours = collections.Counter({w: int(c) for w, c in enumerate(tag["candidate"][:len(words)]) if c})
        assert ours == collections.Counter(entries), caption
        k = max(1, int(round(len(entries) * 0.3))) if entries else 0
        assert chosen_count(caption, tag, "semantic", tokenizer) == min(k, len(set(entries))), caption
        differ_from_distinct += k != max(1, round(0.3 * len(set(entries))))
    print(f"\n[official rule] k differs from the distinct-word k on {differ_from_distinct} of {len(captions)} captions")
    assert differ_from_distinct > 100


def test_official_pick_favours_repeated_candidates(tokenizer):
    """Shuffling the entries and taking the first k distinct words: a word listed twice is picked more often."""
    caption = "a person is connecting something to system"
    words = ["person", "is", "connecting", "system"]
    starts = [caption.index(w) for w in words]
    tags = {"word_start": np.array(starts, np.int32), "word_end": np.array([s + len(w) for s, w in zip(starts, words)],
                                                                          np.int32),
            "candidate": np.array([1, 1, 2, 1], np.int32), "stop": np.zeros(4, np.int32)}
    entries = [0, 1, 2, 2, 3]  # k = round(0.3 * 5) = 2
    exact = collections.Counter()
    orders = list(itertools.permutations(entries))
    for order in orders:
        exact.update(list(dict.fromkeys(order))[:2])
    ids, tok_start, tok_end = tokenizer.tokenize(caption)
    cfg = tm.TextMaskingConfig()
    seen = collections.Counter()
    trials = 3000
    for seed in range(trials):
        chosen = tm.choose_masked_words(tags, tok_start, tok_end, len(ids), np.random.default_rng(seed), cfg)
        assert len(chosen) == 2
        seen.update(words.index(caption[tok_start[c[0]]:tok_end[c[-1]]]) for c in chosen)
    for w in range(4):
        assert abs(seen[w] / trials - exact[w] / len(orders)) < 0.03, (words[w], seen[w] / trials)
    assert exact[2] / len(orders) == pytest.approx(0.7)  # "connecting": 0.7, each other word 0.433...
