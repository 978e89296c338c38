"""Checkpoint I/O without PyTorch and the conversion CLI (official Clover -> orbax params)."""
import json

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clover_jax.convert.__main__ import main
from clover_jax.convert.checkpoint_io import load_state_dict
from clover_jax.convert.common import flatten

SAMPLE = __import__("pathlib").Path(__file__).parents[1] / "data" / "torch_save_sample.pth"


def test_torch_save_zip_is_read_without_torch():
    """tests/data/torch_save_sample.pth was written by torch 2.13 `torch.save` (mmcv-style dict)."""
    sd = load_state_dict(SAMPLE)
    assert sorted(sd) == ["a.weight", "b.weight", "c.bias", "d.half", "e.bf16", "f.index", "g.scalar"]
    np.testing.assert_array_equal(sd["a.weight"], np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    np.testing.assert_array_equal(sd["b.weight"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    np.testing.assert_array_equal(sd["c.bias"], np.linspace(-1, 1, 5))
    assert sd["d.half"].dtype == np.float16 and sd["e.bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(sd["e.bf16"].astype(np.float32), np.arange(6) / 2)
    np.testing.assert_array_equal(sd["f.index"], np.arange(7))
    assert sd["g.scalar"] == 3.5


def test_bad_checkpoint_files_fail_clearly(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="legacy"):
        load_state_dict(junk)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "absent.pth")


def test_cli_converts_official_checkpoint_to_orbax(golden_dir, tmp_path, capsys):
    ckpt = golden_dir / "clover_official_tiny" / "weights.safetensors"
    out = tmp_path / "converted"
    assert main(["--source", "official_clover", "--checkpoint", str(ckpt), "--model", "official_tiny",
                 "--out", str(out)]) == 0
    record = json.loads((out / "conversion.json").read_text())
    assert record["fresh"] == [] and record["unused_checkpoint_keys"] == []
    restored = flatten(ocp.StandardCheckpointer().restore(out / "params"))
    from safetensors.numpy import load_file

    official = load_file(str(ckpt))
    np.testing.assert_array_equal(restored["fusion/encoder/layer_0/attention/query/kernel"],
                                  official["multimodal_backbone.bert_encoder.layer.0.attention.self.query.weight"].T)
    assert len(restored) == len(record["loaded"])
    # A checkpoint for another size fails with a one-line error naming the key.
    assert main(["--source", "official_clover", "--checkpoint", str(ckpt), "--model", "tiny",
                 "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint key" in capsys.readouterr().err


def _hf_folder(folder, weights, config):
    """A HF model folder (config.json + model.safetensors) linking to golden files."""
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(weights)
    (folder / "config.json").symlink_to(config)
    return folder


def test_cli_hf_bert_carries_the_mlm_head_into_init_from(golden_dir, tmp_path, capsys):
    """`--source hf_bert` on a BertForMaskedLM file fills mlm_head; `init_from` (the pre-training recipes'
    start from bert-base-uncased) loads it with the encoders. A BERT without `cls.*` says so in one line."""
    import jax
    from safetensors.numpy import load_file

    from clover_jax.checkpoint import params_from_init
    from clover_jax.models.clover import abstract_params, clover_config

    src = golden_dir / "bert_mlm"
    folder = _hf_folder(tmp_path / "bert_mlm", src / "weights.safetensors", src / "config.json")
    out = tmp_path / "init"
    assert main(["--source", "hf_bert", "--checkpoint", str(folder), "--model", "tiny", "--out", str(out)]) == 0
    assert "cls.predictions" not in capsys.readouterr().out
    record = json.loads((out / "conversion.json").read_text())
    assert not [p for p in record["fresh"] if p.startswith("mlm_head/")]
    hf = load_file(str(src / "weights.safetensors"))
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(clover_config("tiny")))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params, loaded = params_from_init(out, fresh, jax.tree.map(lambda _: device, fresh))
    assert {k.split("/")[0] for k in loaded} == {"text_encoder", "fusion", "mlm_head"}
    flat = flatten(params)
    np.testing.assert_array_equal(flat["mlm_head/decoder/kernel"], hf["cls.predictions.decoder.weight"].T)
    np.testing.assert_array_equal(flat["mlm_head/decoder/bias"], hf["cls.predictions.bias"])
    np.testing.assert_array_equal(flat["mlm_head/dense/kernel"], hf["cls.predictions.transform.dense.weight"].T)
    np.testing.assert_array_equal(flat["mlm_head/LayerNorm/scale"], hf["cls.predictions.transform.LayerNorm.weight"])

    bare = _hf_folder(tmp_path / "bare", golden_dir / "bert" / "tiny_random_weights.safetensors",
                      golden_dir / "bert" / "tiny_random_config.json")
    assert main(["--source", "hf_bert", "--checkpoint", str(bare), "--model", "tiny",
                 "--out", str(tmp_path / "bare_init")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("no cls.predictions.* (BERT's MLM head)") == 1, printed
    fresh_paths = json.loads((tmp_path / "bare_init" / "conversion.json").read_text())["fresh"]
    assert {"mlm_head/decoder/kernel", "mlm_head/dense/kernel"} <= set(fresh_paths)
