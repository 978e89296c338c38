"""Checkpoint I/O without PyTorch and the conversion CLI (official Clover -> orbax params)."""
import json

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clover_jax.convert.__main__ import main
from clover_jax.convert.checkpoint_io import load_state_dict
from clover_jax.convert.common import flatten

SAMPLE = __import__("pathlib").Path(__file__).parent / "data" / "torch_save_sample.pth"


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
