"""Whole-model tests: official-checkpoint import parity, the jit'd tiny pre-training forward, presets."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from clover_jax.convert.clover import import_official_clover, import_pretrained_parts, merge_params
from clover_jax.convert.common import CheckpointMismatchError, flatten
from clover_jax.models.clover import (
    PRETRAIN_OUTPUTS,
    Clover,
    abstract_params,
    clover_config,
    count_params,
    dummy_batch,
    init_params,
)


@pytest.fixture(scope="module")
def official(golden_dir):
    folder = golden_dir / "clover_official_tiny"
    return load_file(str(folder / "weights.safetensors")), dict(np.load(folder / "forward.npz"))


def _official_batch(g):
    return dict(
        video=jnp.asarray(g["video_bcthw"].transpose(0, 2, 3, 4, 1)),
        video_mask=jnp.asarray(g["video_mask_weight"][:, 0, 0]),
        text_ids=jnp.asarray(g["token_ids"], jnp.int32),
        text_ids_masked=jnp.asarray(g["token_ids_masked"], jnp.int32),
        text_mask=jnp.asarray(g["attention_mask"], jnp.int32),
    )


@pytest.mark.parametrize("h_v_input,golden_key", [("text_cls", "z_V_from_text_cls"),
                                                  ("video_token_mean", "z_V_from_video_token_mean")])
def test_official_checkpoint_reproduces_every_pretraining_output(official, h_v_input, golden_key):
    state_dict, g = official
    config = clover_config("official_tiny", h_v_input=h_v_input)
    params, report = import_official_clover(state_dict, config, abstract_params(config))
    assert not report.missing and not report.unexpected, report.summary()
    out = jax.jit(lambda p, b: Clover(config).apply({"params": p}, b))(params, _official_batch(g))
    want = dict(v=g["v"], t=g["t"], v_masked=g["v_masked"], t_masked=g["t_masked"], z_v=g[golden_key],
                z_t=g["z_T"], mlm_logits=g["mlm_logits"])
    errors = {k: float(np.abs(np.asarray(out[k]) - want[k]).max()) for k in PRETRAIN_OUTPUTS}
    print(f"official Clover import, h_v_input={h_v_input}: max abs errors {errors}")
    assert max(errors.values()) <= 1e-4, errors


def test_official_checkpoint_with_wrong_shape_names_key_and_shapes(official):
    state_dict, _ = official
    bad = dict(state_dict)
    bad["multimodal_backbone.fc_in.weight"] = np.zeros((64, 128), np.float32)
    config = clover_config("official_tiny")
    with pytest.raises(CheckpointMismatchError, match=r"multimodal_backbone\.fc_in\.weight.*\(64, 128\).*\(256, 64\)"):
        import_official_clover(bad, config, abstract_params(config))
    missing = {k: v for k, v in state_dict.items() if not k.startswith("mlm_ssl_T_head.")}
    with pytest.raises(CheckpointMismatchError, match="h_t/fc1"):
        import_official_clover(missing, config, abstract_params(config))


def test_tiny_pretraining_forward_under_jit_shapes_and_mask_token():
    config = clover_config("tiny")
    b, length = 2, 12
    batch = dummy_batch(config, batch_size=b, text_length=length)
    rng = jax.random.key(1)
    batch["video"] = jax.random.normal(rng, batch["video"].shape)
    hp, wp = config.token_grid
    batch["video_mask"] = jnp.zeros((b, hp, wp)).at[:, :4, :4].set(1.0)
    params = jax.jit(lambda r: nn.unbox(init_params(config, r)))(rng)
    out = jax.jit(lambda p, x: Clover(config).apply({"params": p}, x))(params, batch)
    assert set(out) == set(PRETRAIN_OUTPUTS)
    for name in PRETRAIN_OUTPUTS[:6]:
        assert out[name].shape == (b, config.embed_dim) and out[name].dtype == jnp.float32, name
        assert np.isfinite(np.asarray(out[name])).all(), name
    assert out["mlm_logits"].shape == (b, length, config.text.vocab_size)
    # Masking changes the masked embedding but not the full one.
    assert not np.allclose(out["v"], out["v_masked"])
    np.testing.assert_allclose(out["t"], out["t_masked"], atol=1e-6)  # ids_masked == ids here

    # Masked patch tokens equal the learnable mask token, the others are the plain patch embedding.
    def patch_tokens(p, video, mask):
        swin = Clover(config).bind({"params": p}).video_encoder
        return swin(video, mask, return_features=True)[1][0]

    tokens = jax.jit(patch_tokens)(params, batch["video"], batch["video_mask"])
    plain = jax.jit(patch_tokens)(params, batch["video"], jnp.zeros_like(batch["video_mask"]))
    token = np.asarray(params["video_encoder"]["mask_token"])
    np.testing.assert_allclose(np.asarray(tokens)[:, :, :4, :4], np.broadcast_to(token, tokens[:, :, :4, :4].shape),
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(tokens)[:, :, 4:], np.asarray(plain)[:, :, 4:])


def test_partial_import_from_public_weights_keeps_the_rest(golden_dir):
    """Swin3D (torchvision names) + HF BERT -> video encoder, text encoder and fusion layers."""
    config = clover_config("official_tiny", text_overrides=dict(vocab_size=30522))
    target = abstract_params(config)
    swin = load_file(str(golden_dir / "swin3d_tiny" / "weights.safetensors"))
    bert = load_file(str(golden_dir / "bert" / "tiny_random_weights.safetensors"))
    loaded, report = import_pretrained_parts(config, target, video_state_dict=swin, bert_state_dict=bert)
    flat = flatten(loaded)
    assert "video_encoder/layers_0/blocks_0/attn/qkv/kernel" in flat
    assert "text_encoder/encoder/layer_1/output/dense/kernel" in flat
    np.testing.assert_array_equal(flat["fusion/encoder/layer_0/attention/query/kernel"],
                                  flat["text_encoder/encoder/layer_0/attention/query/kernel"])
    assert "video_encoder/mask_token" in report.missing and "h_v/fc1/kernel" in report.missing
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
    merged = merge_params(fresh, loaded)
    assert count_params(merged) == count_params(target)


def test_presets_and_bad_values_fail_clearly():
    base = clover_config("base")
    counts = {name: count_params(abstract_params(clover_config(name))) for name in ("tiny",)}
    print("Clover parameter counts:", counts)
    assert base.video.embed_dim == 128 and base.text.num_layers == 12 and base.fusion_layers == 3
    assert base.video_token_shape == (4, 49)
    with pytest.raises(ValueError, match="valid"):
        clover_config("huge")
    with pytest.raises(ValueError, match="h_v_input"):
        clover_config("tiny", h_v_input="cls")
    with pytest.raises(ValueError, match="unknown CloverConfig fields"):
        clover_config("tiny", embed=3)
    assert dataclasses.replace(base, dtype="bfloat16").compute_dtype == jnp.bfloat16
