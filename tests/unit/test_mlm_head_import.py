"""BERT's MLM head imported from HF names: parity with HF BertForMaskedLM (shared/golden/bert_mlm)."""
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from clover_jax.convert.bert import convert_hf_bert, convert_hf_mlm_head
from clover_jax.convert.common import CheckpointMismatchError
from clover_jax.models.bert import BertConfig, BertModel
from clover_jax.models.heads import MLMHead

TOL = 1e-5


@pytest.fixture(scope="module")
def mlm(golden_dir):
    folder = golden_dir / "bert_mlm"
    config = BertConfig.from_hf_json(folder / "config.json")
    state = load_file(str(folder / "weights.safetensors"))
    return config, state, dict(np.load(folder / "outputs.npz"))


def _forward(config: BertConfig, bert_params, head_params, golden):
    """(last_hidden_state, transform output, logits) of our BertModel + MLMHead."""
    bert, head = BertModel(config, add_pooler=False), MLMHead(config.vocab_size, layer_norm_eps=config.layer_norm_eps)

    @jax.jit
    def run(bp, hp, ids, mask, types):
        hidden = bert.apply({"params": bp}, ids, mask, types)
        logits, state = head.apply({"params": hp}, hidden, capture_intermediates=True)
        return hidden, state["intermediates"]["LayerNorm"]["__call__"][0], logits

    return run(bert_params, head_params, golden["input_ids"], golden["attention_mask"], golden["token_type_ids"])


def _max_err(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs)))


def test_mlm_head_parity_with_hf_bert_for_masked_lm(mlm):
    config, state, golden = mlm
    bert_params, bert_report = convert_hf_bert(state, config, add_pooler=False)
    head_params, head_report = convert_hf_mlm_head(state, config)
    assert not bert_report.missing and not head_report.missing and not head_report.unexpected, head_report.summary()
    hidden, transform, logits = _forward(config, bert_params, head_params, golden)
    assert logits.shape == golden["logits"].shape == (3, 16, 30522)
    errs = {name: _max_err(ours, golden[name]) for name, ours in
            (("last_hidden_state", hidden), ("transform_output", transform), ("logits", logits))}
    print("bert_mlm golden, max |err|: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL, errs
    # The masked positions are what the MLM loss reads: our top-1 prediction there is HF's.
    masked = golden["masked_positions"]
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1)[masked], golden["logits"].argmax(-1)[masked])


def test_tied_decoder_and_legacy_names_give_the_same_head(mlm):
    """bert-base-uncased's own file: LayerNorm.gamma/beta names, no decoder weight/bias (tied)."""
    config, state, _ = mlm
    expected, _ = convert_hf_mlm_head(state, config)
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in state.items() if k not in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")}
    head, report = convert_hf_mlm_head(legacy, config)
    assert not report.unexpected, report.summary()
    assert jax.tree.all(jax.tree.map(np.array_equal, head, expected))
    np.testing.assert_array_equal(head["decoder"]["kernel"], state["bert.embeddings.word_embeddings.weight"].T)
    bert_legacy, _ = convert_hf_bert(legacy, config, add_pooler=False)
    bert_new, _ = convert_hf_bert(state, config, add_pooler=False)
    assert jax.tree.all(jax.tree.map(np.array_equal, bert_legacy, bert_new))
    # Only the tied copy of the bias: that one is taken.
    only_decoder_bias = {k: v for k, v in state.items() if k != "cls.predictions.bias"}
    head, _ = convert_hf_mlm_head(only_decoder_bias, config)
    np.testing.assert_array_equal(head["decoder"]["bias"], state["cls.predictions.decoder.bias"])


def test_checkpoint_without_head_fails_naming_it(mlm):
    config, state, _ = mlm
    bare = {k: v for k, v in state.items() if not k.startswith("cls.")}
    with pytest.raises(CheckpointMismatchError, match=r"lacks 5 parameters.*'decoder/bias', 'dense/bias'"):
        convert_hf_mlm_head(bare, config)
