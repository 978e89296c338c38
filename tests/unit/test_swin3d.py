"""Swin3D encoder: golden parity (torchvision and official Clover names), param counts, masking, converter errors,
bf16."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from clover_jax.convert.common import CheckpointMismatchError, flatten, unflatten
from clover_jax.convert.swin3d import load_swin3d, official_plan, torchvision_plan
from clover_jax.models.swin3d import (
    SwinTransformer3D,
    abstract_params,
    relative_position_index,
    swin3d_config,
)

TOL = 1e-4
CLIPS = ("clip_8x224x224", "clip_6x96x128")
FEATURE_NAMES = ["patch_embed"] + [f"features_{k}" for k in range(7)]


def channels_last(x_bcthw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x_bcthw.transpose(0, 2, 3, 4, 1))


def max_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32)).max())


def random_params(config, seed: int) -> dict:
    """Random params in numpy from the abstract shapes (model.init would cost a compile): LN scales near 1."""
    rng = np.random.default_rng(seed)
    flat = flatten(abstract_params(config))
    return unflatten({
        path: (1.0 + 0.1 * rng.standard_normal(leaf.shape) if path.endswith("scale")
               else 0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)
        for path, leaf in flat.items()
    })


# ---------------------------------------------------------------------------------------------
# Session fixtures: each jitted function compiles once per input shape.


@pytest.fixture(scope="session")
def tv_state_dict(golden_dir):
    return load_file(str(golden_dir / "swin3d_tiny" / "weights.safetensors"))


@pytest.fixture(scope="session")
def tv_model_params(tv_state_dict):
    config = swin3d_config("tiny", use_mask_token=False)  # torchvision has no mask token
    params, report = load_swin3d(tv_state_dict, config, source="torchvision")
    return config, params, report


@pytest.fixture(scope="session")
def tv_forward(tv_model_params):
    config, _, _ = tv_model_params
    model = SwinTransformer3D(config)
    return jax.jit(lambda p, v: model.apply({"params": p}, v, return_features=True))


@pytest.fixture(scope="session")
def tv_outputs(golden_dir, tv_model_params, tv_forward):
    _, params, _ = tv_model_params
    results = {}
    for clip in CLIPS:
        ref = dict(np.load(golden_dir / "swin3d_tiny" / f"{clip}.npz"))
        out, feats = tv_forward(params, channels_last(ref["input_bcthw"]))
        results[clip] = (ref, np.asarray(out), [np.asarray(f) for f in feats])
    return results


@pytest.fixture(scope="session")
def official(golden_dir):
    state_dict = load_file(str(golden_dir / "clover_official_tiny" / "weights.safetensors"))
    ref = dict(np.load(golden_dir / "clover_official_tiny" / "forward.npz"))
    config = swin3d_config("tiny")
    params, report = load_swin3d(state_dict, config, source="official")
    model = SwinTransformer3D(config)
    forward = jax.jit(lambda p, v, m: model.apply({"params": p}, v, m, return_features=True))
    video = channels_last(ref["video_bcthw"])
    weight = ref["video_mask_weight"]  # (B, 1, T', Hp, Wp), the same in every frame
    np.testing.assert_array_equal(weight, np.broadcast_to(weight[:, :, :1], weight.shape))
    token_mask = weight[:, 0, 0]
    # An all-zero mask is exactly the unmasked path (x * 1 + token * 0), so one compile serves both.
    plain = forward(params, video, np.zeros_like(token_mask))
    masked = forward(params, video, token_mask)
    return dict(params=params, report=report, ref=ref, token_mask=token_mask, plain=plain, masked=masked,
                model=model, video=video)


# ---------------------------------------------------------------------------------------------
# 1. torchvision golden parity


@pytest.mark.parametrize("clip", CLIPS)
def test_torchvision_parity(tv_outputs, tv_state_dict, clip):
    ref, out, feats = tv_outputs[clip]
    assert len(feats) == len(FEATURE_NAMES)
    errors = {}
    for name, ours in zip(FEATURE_NAMES, feats):
        assert ours.shape == ref[name].shape, name
        errors[name] = max_err(ours, ref[name])
    pooled = out.mean(axis=(1, 2, 3))
    errors["pooled"] = max_err(pooled, ref["pooled"])
    logits = pooled @ tv_state_dict["head.weight"].T + tv_state_dict["head.bias"]
    errors["logits"] = max_err(logits, ref["logits"])
    print(f"\n{clip} max abs errors: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOL, errors


def test_torchvision_report_and_index(tv_model_params, tv_state_dict):
    config, _, report = tv_model_params
    assert report.missing == [] and report.unexpected == []  # head.* and index buffers are known-ignored
    assert len(report.loaded) == len([k for k in tv_state_dict if "relative_position_index" not in k
                                      and not k.startswith("head.")])
    np.testing.assert_array_equal(
        relative_position_index(config.window_size), tv_state_dict["features.0.0.attn.relative_position_index"]
    )


# ---------------------------------------------------------------------------------------------
# 2. Official (Clover) names parity, with and without the video block mask


def test_official_parity(official):
    ref = official["ref"]
    err_plain = max_err(official["plain"][0], channels_last(ref["backbone_out"]))
    err_masked = max_err(official["masked"][0], channels_last(ref["backbone_out_masked"]))
    print(f"\nofficial backbone_out max abs error {err_plain:.2e}, backbone_out_masked {err_masked:.2e}")
    assert err_plain <= TOL and err_masked <= TOL
    # The mask changes the output well beyond the tolerance, so the masked check is not vacuous.
    assert max_err(official["plain"][0], official["masked"][0]) > 100 * TOL
    report = official["report"]
    assert report.missing == []
    assert "mask_token" in report.loaded
    assert not [k for k in report.unexpected if k.startswith("backbone.")]  # the rest are other modules


# ---------------------------------------------------------------------------------------------
# 3. Parameter counts match torchvision's swin3d_t / s / b (no head, no mask token)


@pytest.mark.parametrize(
    "name,expected", [("T", 27_850_470), ("S", 49_509_078), ("B", 87_638_984)]
)
def test_param_counts(name, expected):
    model = SwinTransformer3D(swin3d_config(name, use_mask_token=False))
    video = jax.ShapeDtypeStruct((1, 2, 4, 4, 3), jnp.float32)
    shapes = jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v), video)["params"]
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    print(f"\nswin3d {name}: {count:,} parameters")
    assert count == expected


# ---------------------------------------------------------------------------------------------
# 4. Mask-token substitution at patch-token resolution


def test_mask_token_substitution(official):
    token_mask = official["token_mask"].astype(bool)  # (B, Hp, Wp)
    plain_tokens = np.asarray(official["plain"][1][0])  # patch_embed, (B, T', Hp, Wp, C)
    masked_tokens = np.asarray(official["masked"][1][0])
    mask_token = np.asarray(official["params"]["mask_token"])
    where = np.broadcast_to(token_mask[:, None], masked_tokens.shape[:4])
    assert where.any() and (~where).any()
    np.testing.assert_array_equal(masked_tokens[where], np.broadcast_to(mask_token, masked_tokens[where].shape))
    np.testing.assert_array_equal(masked_tokens[~where], plain_tokens[~where])


def test_input_validation(official):
    model, params, video = official["model"], official["params"], official["video"]
    with pytest.raises(ValueError, match=r"token_mask must be \(B, Hp, Wp\) = \(2, 56, 56\)"):
        model.apply({"params": params}, video, np.zeros((2, 7, 7), np.float32))
    with pytest.raises(ValueError, match="channels-last"):
        model.apply({"params": params}, video.transpose(0, 4, 1, 2, 3))
    no_token = SwinTransformer3D(swin3d_config("tiny", use_mask_token=False))
    with pytest.raises(ValueError, match="use_mask_token=False"):
        no_token.apply({"params": params}, video, official["token_mask"])


def test_config_lookup_errors():
    with pytest.raises(ValueError, match=r"valid names: \['B', 'S', 'T', 'tiny'\]"):
        swin3d_config("L")
    with pytest.raises(ValueError, match="not divisible"):
        swin3d_config("tiny", num_heads=(3, 2, 4, 8))
    assert swin3d_config("B", drop_path_rate=0.3).drop_path_rate == 0.3


# ---------------------------------------------------------------------------------------------
# 5. Converter errors: wrong shape, missing and unexpected keys


def test_wrong_shape_names_key_and_shapes(tv_state_dict):
    config = swin3d_config("tiny", use_mask_token=False)
    bad = dict(tv_state_dict)
    key = "features.2.1.attn.qkv.weight"
    bad[key] = np.zeros((191, 64), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        load_swin3d(bad, config)
    message = str(info.value)
    assert key in message and "(191, 64)" in message and "(64, 192)" in message


def test_missing_and_unexpected_reported(tv_state_dict):
    config = swin3d_config("tiny", use_mask_token=False)
    partial = {k: v for k, v in tv_state_dict.items() if k != "norm.weight"}
    partial["features.7.extra.weight"] = np.zeros((3,), np.float32)
    _, report = load_swin3d(partial, config, strict=False)
    assert report.missing == ["norm/scale"]
    assert report.unexpected == ["features.7.extra.weight"]
    with pytest.raises(CheckpointMismatchError, match="norm/scale"):
        load_swin3d(partial, config)
    # A torchvision checkpoint has no mask token: non-strict loading leaves it to the caller's init.
    _, report = load_swin3d(tv_state_dict, swin3d_config("tiny"), strict=False)
    assert report.missing == ["mask_token"]


def test_unknown_source_rejected(tv_state_dict):
    with pytest.raises(ValueError, match="torchvision"):
        load_swin3d(tv_state_dict, swin3d_config("tiny"), source="timm")


# ---------------------------------------------------------------------------------------------
# 6. bf16 compute stays close to float32 (small clip, golden weights)


def test_bf16_close_to_f32(tv_model_params, tv_outputs):
    config, params, _ = tv_model_params
    ref, out_f32, _ = tv_outputs["clip_6x96x128"]
    model = SwinTransformer3D(config, dtype=jnp.bfloat16)
    out_bf16 = jax.jit(lambda p, v: model.apply({"params": p}, v))(params, channels_last(ref["input_bcthw"]))
    assert out_bf16.dtype == jnp.bfloat16
    out_bf16 = np.asarray(out_bf16, np.float32)
    assert np.isfinite(out_bf16).all()
    err = max_err(out_bf16, out_f32)
    rel = float(np.linalg.norm(out_bf16 - out_f32) / np.linalg.norm(out_f32))
    print(f"\nbf16 vs f32: max abs {err:.3f} (|f32| max {np.abs(out_f32).max():.2f}), relative L2 {rel:.4f}")
    assert rel < 0.05
    assert err < 0.1 * np.abs(out_f32).max()


# ---------------------------------------------------------------------------------------------
# Training-mode features: drop path uses the 'dropout' rng; remat does not change the gradients.


def test_drop_path_and_remat():
    # One stage of two blocks (unshifted + shifted windows) keeps the two gradient compiles cheap.
    config = swin3d_config("tiny", depths=(2,), num_heads=(1,), drop_path_rate=0.5)
    rng = np.random.default_rng(1)
    video = rng.standard_normal((4, 4, 32, 32, 3)).astype(np.float32)
    readout = rng.standard_normal(config.out_dim).astype(np.float32)
    plain, remat = SwinTransformer3D(config), SwinTransformer3D(config, remat=True)
    params = random_params(config, seed=0)

    def loss(p, model, key):  # a fixed random readout: sum(out**2) is ~constant after the final LayerNorm
        out = model.apply({"params": p}, video, deterministic=False, rngs={"dropout": key})
        return jnp.sum(out @ readout)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (loss_a, g_plain), (loss_remat, g_remat) = grad(params, plain, jax.random.PRNGKey(3)), grad(
        params, remat, jax.random.PRNGKey(3)
    )
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):  # equal up to f32 reassociation
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * (1 + np.abs(a).max()))
    assert abs(float(loss_a) - float(loss_remat)) < 1e-4
    loss_b, _ = grad(params, plain, jax.random.PRNGKey(4))
    assert float(loss_a) != float(loss_b)  # drop path is active and follows the 'dropout' key
    with pytest.raises(Exception, match="dropout"):  # traced abstractly: no compile
        jax.eval_shape(lambda p: plain.apply({"params": p}, video, deterministic=False), params)


def test_plan_root_and_boxed_target(tv_state_dict):
    config = swin3d_config("tiny")
    plan = official_plan(config, prefix="backbone.", root="video_encoder")
    assert plan["video_encoder/mask_token"][0] == "backbone.mask_token"
    assert all(dst.startswith("video_encoder/") for dst in plan)
    assert torchvision_plan(config)["layers_1/downsample/reduction/kernel"][0] == "features.3.reduction.weight"
    # A boxed (logically partitioned) eval_shape tree is accepted as the shape target.
    model = SwinTransformer3D(swin3d_config("tiny", use_mask_token=False))
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 2, 4, 4, 3), jnp.float32))
    params, report = load_swin3d(tv_state_dict, model.config, target=boxed["params"])
    assert report.missing == [] and params["layers_0"]["blocks_1"]["attn"]["qkv"]["kernel"].shape == (32, 96)
