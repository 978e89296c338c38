"""The paper's ablations: config words, the loss terms each turns on and off, their values, and the forward
that computes only what the active terms read. Two small compiles (init, the forwards); the losses run eagerly."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.special import log_softmax

from clover_jax import losses, tasks
from clover_jax.defaults import TERM_NAMES
from clover_jax.models import clover
from clover_jax.run_setup import load_config_file
from configs import pretrain

ALL = set(TERM_NAMES)
# word -> the terms its loss computes (README: the ablation table)
EXPECTED_TERMS = {
    "": ALL,
    "no_tma": {"mlm", "nce_video_anchor"},
    "pairwise": {"mlm", "nce_video_anchor", "rank_video_anchor", "rank_text_anchor"},
    "no_masked": {"mlm", "nce_video_anchor", "nce_text_anchor"},
    "no_ranking": {"mlm", "nce_video_anchor", "nce_text_anchor"},
    "no_mlm": ALL - {"mlm"},
    "no_video_mask": ALL - {"rank_text_anchor"},
    "random_mask": ALL,
}
EXPECTED_EMBEDDINGS = {
    "": set(losses.EMBEDDING_KEYS),
    "no_tma": {"v", "t"},
    "pairwise": {"v", "t", "v_masked", "t_masked"},
    "no_masked": {"v", "t", "z_v", "z_t"},
    "no_ranking": set(losses.EMBEDDING_KEYS),
    "no_mlm": set(losses.EMBEDDING_KEYS),
    "no_video_mask": {"v", "t", "t_masked", "z_v", "z_t"},
    "random_mask": set(losses.EMBEDDING_KEYS),
}
TAU, MARGIN, B, D = 0.05, 5.0, 6, 8


def _config(word: str, recipe: str = "tiny"):
    return pretrain.get_config(",".join(x for x in (recipe, word) if x))


@pytest.fixture(scope="module")
def embeddings() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {k: rng.normal(size=(B, D)) for k in losses.EMBEDDING_KEYS}
    out["t_masked"] = out["t"] + 0.3 * rng.normal(size=(B, D))  # some ranking hinges active, some not
    out["v_masked"] = out["v"] + 0.3 * rng.normal(size=(B, D))
    return {k: x.astype(np.float32) for k, x in out.items()}


def test_every_word_parses_and_sets_its_keys():
    assert set(EXPECTED_TERMS) - {""} == set(pretrain.ABLATIONS)
    for word, keys in pretrain.ABLATIONS.items():
        for recipe in ("tiny", "base", "base,official"):
            c = _config(word, recipe)
            for key, value in keys.items():
                section, name = key.split(".")
                assert c[section][name] == value, (word, recipe, key)
    c = pretrain.get_config("tiny,no_ranking,random_mask,no_mlm")
    assert (c.loss.ranking, c.loss.mlm, c.data.text_masking, c.total_steps) == (False, False, "random_whole_word", 6)
    with pytest.raises(ValueError, match="no_tma"):  # an unknown word lists the ablations among the valid ones
        pretrain.get_config("tiny,no_tmaa")
    config = load_config_file("configs/pretrain.py:base,no_tma,no_video_mask")  # as the CLI loads it
    config.lock()
    assert (config.loss.alignment, config.loss.video_masking, config.data.mask_cells) == ("pairwise", False, 0)


@pytest.mark.parametrize("key, value, valid", [
    ("alignment", "bimodal", "'tri_modal', 'pairwise'"),
    ("ranking", "yes", "True, False"),
    ("masked_candidates", 1, "True, False"),
])
def test_bad_switch_fails_at_start_naming_key_and_values(key, value, valid):
    cfg = {**pretrain.get_config("tiny").loss.to_dict(), key: value}  # a dict: ConfigDict would refuse the type
    with pytest.raises(ValueError) as err:
        tasks.pretrain_objective(clover.clover_config("tiny"), cfg, 1)  # builds, traces nothing
    assert str(err.value) == f"loss.{key}={value!r}; valid: {valid}"


@pytest.mark.parametrize("word", EXPECTED_TERMS)
def test_each_variant_reports_exactly_its_terms(word, embeddings):
    cfg = _config(word).loss
    assert set(losses.active_terms(cfg)) == EXPECTED_TERMS[word]
    assert set(losses.required_embeddings(cfg)) == EXPECTED_EMBEDDINGS[word]
    rng = np.random.default_rng(1)
    outputs = {k: embeddings[k] for k in EXPECTED_EMBEDDINGS[word]}  # the others must not be read
    outputs["mlm_logits"] = rng.normal(size=(B, 5, 11)).astype(np.float32)
    labels = np.where(rng.random((B, 5)) < 0.4, rng.integers(0, 11, (B, 5)), -100)
    total, metrics = losses.pretrain_objective(outputs, labels, cfg)
    term_keys = set(metrics) & ALL
    assert term_keys == EXPECTED_TERMS[word]
    assert float(metrics["total"]) == pytest.approx(sum(float(metrics[k]) for k in term_keys), rel=1e-6)
    assert float(total) == pytest.approx(float(metrics["total"]), rel=1e-6)


def _np_logits(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a.astype(np.float64) @ b.T.astype(np.float64)) / TAU


def _np_rank(anchor, full, masked):
    gap = np.diagonal(_np_logits(anchor, full)) - np.diagonal(_np_logits(anchor, masked))
    return np.mean(np.maximum(0.0, MARGIN - gap))


def test_pairwise_is_video_text_infonce_plus_ranking(embeddings):
    e = embeddings
    s = _np_logits(e["v"], e["t"])
    infonce = -np.mean(np.diagonal(log_softmax(s, axis=1))) - np.mean(np.diagonal(log_softmax(s, axis=0)))
    rank_v, rank_t = _np_rank(e["v"], e["t"], e["t_masked"]), _np_rank(e["t"], e["v"], e["v_masked"])
    assert 0 < rank_v < MARGIN and 0 < rank_t < MARGIN  # the hinges are active

    total, terms = losses.pretrain_contrastive(e, _config("pairwise").loss)
    assert float(terms["nce_video_anchor"]) == pytest.approx(infonce, rel=1e-5)
    assert float(terms["rank_video_anchor"]) == pytest.approx(rank_v, rel=1e-5)
    assert float(terms["rank_text_anchor"]) == pytest.approx(rank_t, rel=1e-5)
    assert float(total) == pytest.approx(infonce + rank_v + rank_t, rel=1e-5)
    total, terms = losses.pretrain_contrastive(e, _config("no_tma").loss)
    assert set(terms) == {"nce_video_anchor"} and float(total) == pytest.approx(infonce, rel=1e-5)


def _np_exclusive_nce(sims):
    """The reference's exclusive NCE for K candidate sets, written out in numpy."""
    k, n = len(sims), sims[0].shape[0]
    a2c = 0.0
    for p in range(k):
        row = np.concatenate([s if q == p else np.where(np.eye(n, dtype=bool), -1e4, s) for q, s in enumerate(sims)], 1)
        a2c -= np.mean(log_softmax(row, axis=1)[np.arange(n), p * n + np.arange(n)])
    return a2c - np.mean([np.mean(np.diagonal(log_softmax(s, axis=0))) for s in sims])


def test_tri_modal_variants_against_numpy(embeddings):
    e = embeddings
    cases = {  # word -> {term: candidate keys}
        "": {"nce_video_anchor": ("t", "t_masked", "z_v"), "nce_text_anchor": ("v", "v_masked", "z_t")},
        "no_masked": {"nce_video_anchor": ("t", "z_v"), "nce_text_anchor": ("v", "z_t")},
        "no_video_mask": {"nce_video_anchor": ("t", "t_masked", "z_v"), "nce_text_anchor": ("v", "z_t")},
    }
    anchors = {"nce_video_anchor": "v", "nce_text_anchor": "t"}
    for word, calls in cases.items():
        _, terms = losses.pretrain_contrastive(e, _config(word).loss)
        for term, keys in calls.items():
            want = _np_exclusive_nce([_np_logits(e[anchors[term]], e[k]) for k in keys])
            assert float(terms[term]) == pytest.approx(want, rel=1e-5), (word, term)
    _, terms = losses.pretrain_contrastive(e, _config("").loss)  # the default is still the reference's call
    nce, rank = losses.tri_modal_exclusive_nce(e["t"], e["v"], e["v_masked"], e["z_t"])
    assert (float(terms["nce_text_anchor"]), float(terms["rank_text_anchor"])) == (float(nce), float(rank))


def _batch(model: clover.CloverConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    hp, wp = model.token_grid
    video_mask = np.zeros((2, hp, wp), np.float32)
    video_mask[:, 2:8, 4:12] = 1.0
    ids = rng.integers(200, 1000, size=(2, 8)).astype(np.int32)
    ids[:, 0] = 101
    masked = np.where(np.arange(8) == 3, 103, ids).astype(np.int32)
    return dict(video=rng.normal(size=(2, model.num_frames, model.image_size, model.image_size, 3)).astype(np.float32),
                video_mask=video_mask, text_ids=ids, text_ids_masked=masked, text_mask=np.ones((2, 8), np.int32),
                mlm_labels=np.where(np.arange(8) == 3, ids, -100).astype(np.int32))


def test_ablated_forward_computes_only_what_is_read_and_matches_the_full_forward():
    # One layer per stage keeps the compile short; every branch of `tasks.pretrain_forward` runs: the masked
    # Swin pass alone (pairwise), the MLM fusion alone (no_tma), both fusions on unmasked video (no_video_mask).
    model = clover.clover_config("tiny", video_overrides=dict(depths=(1, 1, 1, 1)),
                                 text_overrides=dict(num_layers=1, vocab_size=1000))
    batch = _batch(model)
    unmasked = {**batch, "video_mask": np.zeros_like(batch["video_mask"])}
    params = jax.jit(lambda b: clover.Clover(model).init(jax.random.key(0), b)["params"])(batch)
    words = ("no_tma", "pairwise", "no_video_mask")
    embeds = {w: tasks.pretrain_objective(model, _config(w).loss, 1, deterministic=True).embed for w in words}

    @jax.jit
    def run(params, batch, unmasked):
        full = clover.Clover(model).apply({"params": params}, batch)
        full_unmasked = clover.Clover(model).apply({"params": params}, unmasked)
        ablated = {w: embeds[w](params, unmasked if w == "no_video_mask" else batch, jax.random.key(1))
                   for w in words}
        return full, full_unmasked, ablated

    full, full_unmasked, ablated = run(params, batch, unmasked)
    for word, (outputs, mlm_sum) in ablated.items():
        assert set(outputs) == EXPECTED_EMBEDDINGS[word], word
        want = full_unmasked if word == "no_video_mask" else full  # no_video_mask: z_V = h_V(Fuse(V, T))
        for key, value in outputs.items():
            np.testing.assert_allclose(value, want[key], rtol=1e-5, atol=1e-5, err_msg=f"{word} {key}")
        want_mlm, _ = losses.focal_mlm_sum(want["mlm_logits"], batch["mlm_labels"])
        np.testing.assert_allclose(mlm_sum, want_mlm, rtol=1e-5, err_msg=word)
    assert not np.allclose(full["z_v"], full_unmasked["z_v"], atol=1e-4)  # the mask mattered: the check has teeth
