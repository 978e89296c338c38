"""VideoQA: synthetic question generation, answer vocabulary, QA batches, QA losses, init_from, QA eval."""
import collections
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clover_jax import checkpoint as ckpt_lib
from clover_jax import partitioning, run_inputs, tasks
from clover_jax.evaluators import entries
from clover_jax.evaluators.qa_metrics import open_ended_accuracy
from clover_jax.models.clover import init_params
from clover_jax.run_setup import model_config_from
from configs import qa_synthetic
from data_pipelines.build import synthetic
from data_pipelines.build import synthetic_qa as sqa
from data_pipelines.input import qa_inputs, qa_tasks
from data_pipelines.input.device_transfer import numpy_batches

DEMO = synthetic.SyntheticConfig(num_train=1024, num_test=256, num_frames=8, size=64)  # the demo's clips
SMALL = dict(seed=5, num_train=8, num_test=4, num_frames=8, size=32)


def demo_attributes(split, n):
    return [synthetic.clip_spec(0, split, i, DEMO).attributes() for i in range(n)]


# ---------------------------------------------------------------- question generation (pure, no TF)


def test_open_questions_are_deterministic_and_never_name_their_answer():
    attrs = demo_attributes("train", 300)
    questions = sqa.open_ended_questions(attrs, seed=0)
    assert questions == sqa.open_ended_questions(attrs, seed=0)
    assert len(questions) == 4 * len(attrs)
    assert [q.kind for q in questions[:4]] == list(sqa.ATTRIBUTES)
    for q in questions:
        assert q.answer in sqa.ANSWERS
        assert q.answer not in q.question.replace("?", "").split(), q
        truth = attrs[q.clip_index]
        expected = synthetic.COUNT_WORDS[truth["count"]] if q.kind == "count" else truth[q.kind]
        assert q.answer == expected
    other = sqa.open_ended_questions(attrs, seed=1)
    assert [q.answer for q in other] == [q.answer for q in questions]
    assert sum(a.question != b.question for a, b in zip(questions, other)) > 100  # phrasing follows the seed


def test_answer_ranking_breaks_ties_alphabetically_whatever_the_file_order():
    answers = ["dog", "cat", "bird", "cat", "dog", "ant"]
    assert qa_tasks.rank_answers(answers) == ("cat", "dog", "ant", "bird")
    assert qa_tasks.rank_answers(list(reversed(answers)), top_k=3) == ("cat", "dog", "ant")


def test_answer_vocab_covers_every_answer_and_marks_the_rest_out_of_vocab():
    train = sqa.open_ended_questions(demo_attributes("train", 1024))
    vocab = qa_tasks.rank_answers([q.answer for q in train])
    assert sorted(vocab) == sorted(sqa.ANSWERS) and len(vocab) == 21
    counts = collections.Counter(q.answer for q in train)
    assert [counts[a] for a in vocab] == sorted(counts.values(), reverse=True)
    top5 = qa_tasks.rank_answers([q.answer for q in train], top_k=5)
    assert top5 == vocab[:5]
    test = sqa.open_ended_questions(demo_attributes("test", 256))
    index = sqa.answer_indices([q.answer for q in test], top5)
    oov = np.array([q.answer not in top5 for q in test])
    assert np.array_equal(index == -1, oov) and 0 < oov.sum() < len(test)
    assert all(top5[i] == q.answer for i, q in zip(index, test) if i >= 0)
    # Out-of-vocab answers count wrong even when the model's argmax lands on "class -1" (the last one).
    logits = np.zeros((len(test), 5))
    logits[:, -1] = 1.0
    result = open_ended_accuracy(logits, index)
    assert result["num"] == len(test) and result["num_out_of_vocab"] == oov.sum()
    assert result["accuracy"] == pytest.approx(100 * np.mean(index == 4))


def test_multiple_choice_items_have_one_true_option_and_text_alone_is_at_chance():
    attrs = demo_attributes("train", 600)
    items = sqa.multiple_choice_questions(attrs, seed=0, per_clip=2)
    assert items == sqa.multiple_choice_questions(attrs, seed=0, per_clip=2)
    assert len(items) == 1200
    captions_of = {i: None for i in range(len(attrs))}
    for q in items:
        assert len(q.options) == sqa.NUM_OPTIONS == len(set(q.options))
        truth = synthetic.ClipSpec(**attrs[q.clip_index], positions=(), scale=0.0, caption_templates=tuple(range(5)))
        captions_of[q.clip_index] = set(synthetic.captions_for(truth))
        assert q.options[q.answer_index] in captions_of[q.clip_index]
        assert sum(o in captions_of[q.clip_index] for o in q.options) == 1
    positions = collections.Counter(q.answer_index for q in items)
    assert min(positions.values()) > 0.15 * len(items)
    # "The option sharing most words with the others" (a text-only shortcut) must stay near 1/5.
    def most_central(options):
        words = [collections.Counter(o.split()) for o in options]
        overlap = [sum(sum((w & v).values()) for j, v in enumerate(words) if j != i) for i, w in enumerate(words)]
        return int(np.argmax(overlap))
    shortcut = np.mean([most_central(q.options) == q.answer_index for q in items])
    assert 0.1 < shortcut < 0.3


def test_mc_text_formats_and_texts_that_do_not_fit_fail_loudly():
    q = sqa.multiple_choice_questions(demo_attributes("test", 1))[0]
    full = sqa.mc_option_text(q.question, q.options, q.options[2], "full")
    assert full.startswith(q.question + " Options: ") and full.endswith(" Answer: " + q.options[2])
    assert all(o in full for o in q.options)
    assert sqa.mc_option_text(q.question, q.options, q.options[2], "caption") == q.options[2]
    with pytest.raises(ValueError, match="format"):
        sqa.mc_option_text(q.question, q.options, q.options[0], "long")
    ids, mask = sqa.encode_texts([full, q.options[0]], 96)
    assert ids.shape == mask.shape == (2, 96) and ids[0, 0] == 101 and mask[1].sum() < mask[0].sum()
    assert ids[0, mask[0].sum() - 1] == 102  # [SEP] ends every text
    with pytest.raises(ValueError, match="text_length=16"):
        sqa.encode_texts([full], 16)


# ---------------------------------------------------------------- data, batches, losses, eval (tiny)


@functools.lru_cache(maxsize=None)
def jitted_init(model_config):
    """One compiled init per model config (the tests re-init with other keys without recompiling)."""
    return jax.jit(lambda r: nn.unbox(init_params(model_config, r)))


def small_config(variant, cache_dir, **overrides):
    c = qa_synthetic.get_config(f"{variant},tiny")
    c.data.cache_dir = str(cache_dir)
    c.data.synthetic.update(**SMALL)
    c.data.update(image_size=28, num_frames=4, batch_size=4)
    c.eval.update(image_size=28, num_frames=4, batch_size=3)
    for key, value in overrides.items():
        c.model.overrides[key] = value
    return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    cache = tmp_path_factory.mktemp("qa_cache")
    run_inputs.resolve_dataset("synthetic", small_config("open", cache).data)  # build once
    return cache


@pytest.fixture(scope="module")
def batch_sharding():
    mesh = partitioning.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    return partitioning.batch_sharding(mesh)


@pytest.fixture(scope="module")
def open_run(cache):
    # A 6-answer vocabulary, so some answers are out of vocabulary in training and in the test.
    config = small_config("open", cache, num_answers=6)
    model_config = model_config_from(config)
    params = jitted_init(model_config)(jax.random.key(0))
    items, info = run_inputs.qa_items(config, "train", model_config.num_answers)
    return config, model_config, params, items, info


def first_batches(cfg, items, n, start_step=0):
    iterator = numpy_batches(qa_inputs.make_qa_train_dataset(cfg, items, start_step))
    return [next(iterator) for _ in range(n)]


def test_clip_attributes_come_from_the_built_clips(cache):
    folder = run_inputs.resolve_dataset("synthetic", small_config("open", cache).data)
    attrs = sqa.clip_attributes(folder, "test")
    cfg = synthetic.SyntheticConfig(**SMALL)
    assert len(attrs) == 4
    for a in attrs:
        index = int(a["video_id"].rsplit("_", 1)[1])
        assert {k: a[k] for k in sqa.ATTRIBUTES} == synthetic.clip_spec(5, "test", index, cfg).attributes()


def test_open_ended_batches_shapes_labels_and_exact_resume(open_run):
    config, _, _, items, info = open_run
    assert len(items) == 4 * 8 and items.text_ids.shape == (32, 16) and not items.multiple_choice
    assert info["vocab"] == qa_tasks.rank_answers(info["train_answers"], 6)
    assert np.array_equal(items.answer_index, sqa.answer_indices(info["answers"], info["vocab"]))
    assert (items.answer_index == -1).any()
    cfg = run_inputs.train_input(config.data, run_inputs.resolve_dataset("synthetic", config.data))
    b0, b1 = first_batches(cfg, items, 2)
    assert set(b0) == {"video", "text_ids", "text_mask", "answer_index", "valid", "clip_index", "item_index"}
    assert b0["video"].shape == (4, 4, 28, 28, 3) and b0["text_ids"].shape == (4, 16)
    assert np.array_equal(b0["text_ids"], items.text_ids[b0["item_index"]])
    assert np.array_equal(b0["answer_index"], items.answer_index[b0["item_index"]])
    assert np.array_equal(b0["clip_index"], items.clip_index[b0["item_index"]])
    (resumed,) = first_batches(cfg, items, 1, start_step=1)
    for key in b1:
        np.testing.assert_array_equal(resumed[key], b1[key])


def test_multiple_choice_batches_and_padded_eval(cache):
    config = small_config("mc", cache)
    items, info = run_inputs.qa_items(config, "test")
    assert items.multiple_choice and items.text_ids.shape == (4, 5, 16) and len(info["answers"]) == 4
    cfg = run_inputs.eval_input(config.eval, config.data, run_inputs.resolve_dataset("synthetic", config.data))
    data = qa_inputs.make_qa_eval_dataset(cfg, items)
    batches = list(data)
    assert data.num_batches == len(batches) == 2  # 4 items in batches of 3: two padding rows
    valid = np.concatenate([b["valid"] for b in batches])
    seen = np.concatenate([b["item_index"] for b in batches])[valid]
    assert valid.sum() == 4 and sorted(seen) == [0, 1, 2, 3]
    assert batches[0]["option_ids"].shape == (3, 5, 16) and batches[0]["video"].shape == (3, 4, 28, 28, 3)
    assert np.array_equal(batches[0]["answer_index"], items.answer_index[:3])


def test_classification_loss_leaves_out_of_vocab_rows_out_of_the_loss_but_counts_them_wrong():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    labels = jnp.array([0, 2, -1, -1])
    loss, metrics = tasks._classification_loss(logits, labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:2], labels[:2])
    assert float(loss) == pytest.approx(float(ce.mean()), rel=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(25.0)


def _descends(loss_fn, params, batch, steps=3, lr=3e-3):
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    tx = optax.adam(lr)
    opt_state = tx.init(params)
    rng = jax.random.key(1)
    losses, first_grads = [], None
    for _ in range(steps):
        (loss, metrics), grads = grad_fn(params, batch, rng)
        first_grads = grads if first_grads is None else first_grads
        losses.append(float(loss))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return losses, metrics, first_grads


def test_open_ended_loss_trains_the_head_and_the_backbone(open_run):
    config, model_config, params, items, _ = open_run
    cfg = run_inputs.train_input(config.data, run_inputs.resolve_dataset("synthetic", config.data))
    (batch,) = first_batches(cfg, items, 1)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    losses, metrics, grads = _descends(tasks.qa_open_ended_loss_fn(model_config, config.loss, 1), params, batch)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert 0.0 <= float(metrics["accuracy"]) <= 100.0
    for module in ("qa_head", "text_encoder", "video_encoder", "fusion"):
        assert float(optax.global_norm(grads[module])) > 0, module
    assert float(optax.global_norm(grads["mlm_head"])) == 0.0  # the pre-training heads are unused


def test_multiple_choice_loss_descends(cache):
    config = small_config("mc", cache)
    model_config = model_config_from(config)
    assert model_config.multiple_choice and model_config.num_answers == 0
    params = jitted_init(model_config)(jax.random.key(0))
    items, _ = run_inputs.qa_items(config, "train")
    cfg = run_inputs.train_input(config.data, run_inputs.resolve_dataset("synthetic", config.data))
    (batch,) = first_batches(cfg, items, 1)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    assert batch["option_ids"].shape == (4, 5, 16)
    losses, metrics, grads = _descends(tasks.qa_multiple_choice_loss_fn(model_config, config.loss, 1), params,
                                       batch, steps=2)
    assert losses[0] == pytest.approx(np.log(5), abs=0.3) and losses[-1] < losses[0]  # fresh head: options alike
    assert float(metrics["accuracy"]) in (0.0, 25.0, 50.0, 75.0, 100.0)
    assert float(optax.global_norm(grads["mc_head"])) > 0


def test_init_from_a_checkpoint_without_the_qa_head_keeps_the_head_fresh(open_run, tmp_path):
    _, model_config, params, _, _ = open_run
    pretrained = {k: v for k, v in params.items() if k != "qa_head"}
    manager = ckpt_lib.make_manager(tmp_path, save_every=1, keep=1, async_save=False)
    ckpt_lib.save(manager, 7, {"params": pretrained}, {"step": 7}, force=True)
    manager.wait_until_finished()
    fresh = jitted_init(model_config)(jax.random.key(3))
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), fresh)
    loaded_params, loaded = ckpt_lib.params_from_init(tmp_path, fresh, shardings)
    assert loaded == sorted(ckpt_lib.flatten(pretrained)) and not any(k.startswith("qa_head") for k in loaded)
    jax.tree.map(np.testing.assert_array_equal, loaded_params["qa_head"], fresh["qa_head"])
    jax.tree.map(np.testing.assert_array_equal, loaded_params["text_encoder"], params["text_encoder"])


def test_eval_scores_every_question_and_counts_out_of_vocab_wrong(open_run, batch_sharding, tmp_path):
    config, model_config, params, _, _ = open_run
    metrics = entries.make_evaluators(config, model_config, batch_sharding, tmp_path, ["qa"])["qa"].run(params, 3)
    items, info = run_inputs.qa_items(config, "test", model_config.num_answers)
    assert metrics["num"] == len(items) == 16
    assert metrics["num_out_of_vocab"] == int((items.answer_index == -1).sum()) > 0
    assert metrics["accuracy"] <= 100.0 * (16 - metrics["num_out_of_vocab"]) / 16
    assert set(metrics["accuracy_by_kind"]) == set(sqa.ATTRIBUTES)
    majority = collections.Counter(info["train_answers"]).most_common(1)[0][0]
    assert metrics["majority_baseline"] == pytest.approx(100 * np.mean([a == majority for a in info["answers"]]))
    saved = json.loads((tmp_path / "qa_step3.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"] and saved["vocab_size"] == 6


def test_two_qa_evaluators_of_one_config_score_their_own_split(open_run, batch_sharding, tmp_path):
    """qa (the test questions) and qa_train (the training questions) share one model pass set-up."""
    config, model_config, params, items, _ = open_run
    evaluators = entries.make_evaluators(config, model_config, batch_sharding, tmp_path, ["qa", "qa_train"])
    test, train = evaluators["qa"].run(params, 3), evaluators["qa_train"].run(params, 3)
    assert (test["split"], test["num"]) == ("test", 16) and (train["split"], train["num"]) == ("train", len(items))
    assert entries.scalars("qa_train", train)["qa_train/accuracy"] == train["accuracy"]
    assert json.loads((tmp_path / "qa_train_step3.json").read_text())["num"] == len(items) == 32
