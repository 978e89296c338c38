"""Fusion encoder and heads against the official Clover modules (golden clover_official_tiny, official names)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from clover_jax.convert import bert as conv
from clover_jax.convert.common import assemble
from clover_jax.models.bert import BertModel, bert_config
from clover_jax.models.fusion import FusionEncoder
from clover_jax.models.heads import (
    FusedTextHead,
    FusedVideoHead,
    MLMHead,
    MultipleChoiceHead,
    OpenEndedQAHead,
    TextProjector,
    VideoProjector,
)

TOL = 1e-4
TEXT = bert_config("tiny", vocab_size=1000)  # official tiny: hidden 64, 2 layers, 4 heads, 64 positions
FUSION = bert_config("tiny", vocab_size=1000, num_layers=1)
VIDEO_DIM, EMBED = 256, 64


def build_modules(dtype=jnp.float32) -> dict[str, nn.Module]:
    """Our modules under the names a whole-Clover model will give them."""
    kw = dict(dtype=dtype)
    return {
        "text_encoder": BertModel(TEXT, **kw),
        "fusion": FusionEncoder(FUSION, video_dim=VIDEO_DIM, **kw),
        "video_proj": VideoProjector(EMBED, **kw),
        "text_proj": TextProjector(EMBED, **kw),
        "h_v_text_cls": FusedVideoHead(EMBED, input_kind="text_cls", **kw),
        "h_v_video_mean": FusedVideoHead(EMBED, input_kind="video_token_mean", **kw),
        "h_t": FusedTextHead(EMBED, **kw),
        "mlm_head": MLMHead(TEXT.vocab_size, **kw),
    }


def abstract_params(modules: dict[str, nn.Module]) -> dict:
    rng = jax.random.key(0)
    ids, video = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4, 7, 7, VIDEO_DIM))
    states, vec = jnp.zeros((1, 4, TEXT.hidden_size)), jnp.zeros((1, TEXT.hidden_size))
    args = {
        "text_encoder": (ids, ids), "fusion": (video, states, ids), "video_proj": (video,),
        "text_proj": (states,), "h_v_text_cls": (vec,), "h_v_video_mean": (states,), "h_t": (vec,),
        "mlm_head": (states,),
    }
    return {name: nn.unbox(jax.eval_shape(m.init, rng, *args[name]))["params"] for name, m in modules.items()}


def clover_plan() -> conv.Plan:
    plan: conv.Plan = {}
    plan.update(conv.clover_text_encoder_plan(TEXT, "text_encoder"))
    plan.update(conv.clover_fusion_plan(FUSION, VIDEO_DIM, "fusion"))
    plan.update(conv.clover_video_projector_plan("video_proj"))
    plan.update(conv.clover_text_projector_plan("text_proj"))
    plan.update(conv.clover_fused_video_head_plan("h_v_text_cls"))
    plan.update(conv.clover_fused_video_head_plan("h_v_video_mean"))
    plan.update(conv.clover_fused_text_head_plan("h_t"))
    plan.update(conv.clover_mlm_head_plan("mlm_head"))
    return plan


def forward(modules, params, g):
    """Each module on the golden inputs of its step (so errors do not compound)."""
    run = lambda name, *a: modules[name].apply({"params": params[name]}, *a)  # noqa: E731
    to_cl = lambda x: jnp.transpose(x, (0, 2, 3, 4, 1))  # noqa: E731  (B,C,T,H,W) -> (B,T,H,W,C)
    mask = g["attention_mask"]
    out = {
        "text_states": run("text_encoder", g["token_ids"], mask),
        "text_states_masked": run("text_encoder", g["token_ids_masked"], mask),
        "v": run("video_proj", to_cl(g["backbone_out"])),
        "v_masked": run("video_proj", to_cl(g["backbone_out_masked"])),
        "t": run("text_proj", g["text_states"]),
        "t_masked": run("text_proj", g["text_states_masked"]),
    }
    video_m, text_m = run("fusion", to_cl(g["backbone_out_masked"]), g["text_states"], mask)
    _, text_tm = run("fusion", to_cl(g["backbone_out"]), g["text_states_masked"], mask)
    out["fusion_masked_video_full_text_video_states"] = video_m
    out["fusion_masked_video_full_text_text_states"] = text_m
    out["fusion_full_video_masked_text_text_states"] = text_tm
    fused_m_text = g["fusion_masked_video_full_text_text_states"]
    out["z_V_from_text_cls"] = run("h_v_text_cls", fused_m_text[:, 0])
    out["z_V_from_video_token_mean"] = run("h_v_video_mean", g["fusion_masked_video_full_text_video_states"])
    out["z_T"] = run("h_t", g["fusion_full_video_masked_text_text_states"][:, 0])
    out["mlm_logits"] = run("mlm_head", g["fusion_full_video_masked_text_text_states"])
    return out


@pytest.fixture(scope="module")
def golden(golden_dir):
    folder = golden_dir / "clover_official_tiny"
    return load_file(str(folder / "weights.safetensors")), dict(np.load(folder / "forward.npz"))


@pytest.fixture(scope="module")
def converted(golden):
    state, _ = golden
    modules = build_modules()
    params, report = assemble(state, clover_plan(), abstract_params(modules),
                              ignore_unexpected=conv.CLOVER_FUSION_UNUSED)
    return modules, params, report


@pytest.fixture(scope="module")
def outputs(golden, converted):
    modules, params, _ = converted
    g = {k: jnp.asarray(v) for k, v in golden[1].items()}
    return jax.device_get(jax.jit(functools.partial(forward, modules))(params, g))


def test_official_names_fully_consumed(converted):
    _, _, report = converted
    assert not report.missing
    # Left over: the Swin backbone (another converter's job) and the text pooler our encoder omits.
    leftovers = {k for k in report.unexpected if not k.startswith("backbone.")}
    assert leftovers == {"text_backbone.bert.pooler.dense.weight", "text_backbone.bert.pooler.dense.bias"}


@pytest.mark.parametrize("key", [
    "text_states", "text_states_masked", "v", "t", "v_masked", "t_masked",
    "fusion_masked_video_full_text_text_states", "fusion_masked_video_full_text_video_states",
    "fusion_full_video_masked_text_text_states", "z_T", "mlm_logits",
    "z_V_from_text_cls", "z_V_from_video_token_mean",
])
def test_matches_official(outputs, golden, key):
    want = golden[1][key]
    got = np.asarray(outputs[key])
    assert got.shape == want.shape, (key, got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    print(f"{key}: max |err| {err:.2e} (max |value| {np.max(np.abs(want)):.2f})")
    assert err <= TOL


def _eps_errors(name, params, g):
    """Max |err| of one LayerNorm-bearing module against the golden, as a function of its LN eps."""
    cl = lambda x: np.transpose(x, (0, 2, 3, 4, 1))  # noqa: E731
    fused_m, fused_t = g["fusion_masked_video_full_text_text_states"], g["fusion_full_video_masked_text_text_states"]
    cases = {
        "video_proj": (lambda e: VideoProjector(EMBED, layer_norm_eps=e), (cl(g["backbone_out"]),), "v"),
        "h_v_text_cls": (lambda e: FusedVideoHead(EMBED, layer_norm_eps=e), (fused_m[:, 0],), "z_V_from_text_cls"),
        "mlm_head": (lambda e: MLMHead(TEXT.vocab_size, layer_norm_eps=e), (fused_t,), "mlm_logits"),
        "fusion": (lambda e: FusionEncoder(FUSION, VIDEO_DIM, video_norm_eps=e),
                   (cl(g["backbone_out_masked"]), g["text_states"], g["attention_mask"]),
                   "fusion_masked_video_full_text_video_states"),
    }
    make, args, key = cases[name]

    def err(eps):
        out = make(eps).apply({"params": params[name]}, *args)
        out = out[0] if isinstance(out, tuple) else out
        return float(np.max(np.abs(np.asarray(out) - g[key])))

    return err


@pytest.mark.parametrize("name, ours, other, min_ratio", [
    ("video_proj", 1e-5, 1e-12, 10.0),   # torch nn.LayerNorm default
    ("h_v_text_cls", 1e-5, 1e-12, 10.0),
    ("mlm_head", 1e-12, 1e-5, 10.0),     # copied BERT transform
    # Fusion video-token LN: the tokens' variance is ~1, so eps shows only weakly here; the
    # official source (plain nn.LayerNorm) decides, and the golden agrees.
    ("fusion", 1e-5, 1e-12, 2.0),
])
def test_layer_norm_eps_matches_official(converted, golden, name, ours, other, min_ratio):
    _, params, _ = converted
    err = _eps_errors(name, params, golden[1])
    err_ours, err_other = err(ours), err(other)
    print(f"{name}: LN eps {ours:g} -> {err_ours:.2e}, eps {other:g} -> {err_other:.2e}")
    assert err_ours <= TOL and err_other >= min_ratio * err_ours


def test_fusion_rejects_bad_video_shapes(converted, golden):
    modules, params, _ = converted
    fusion, g = modules["fusion"], golden[1]
    text, mask = g["text_states"], g["attention_mask"]
    with pytest.raises(ValueError, match="5 temporal tokens but max_temporal_tokens is 4"):
        fusion.apply({"params": params["fusion"]}, np.zeros((2, 5, 7, 7, VIDEO_DIM), np.float32), text, mask)
    with pytest.raises(ValueError, match="6x7=42 spatial tokens .* spatial_tokens is 49"):
        fusion.apply({"params": params["fusion"]}, np.zeros((2, 4, 6, 7, VIDEO_DIM), np.float32), text, mask)
    with pytest.raises(ValueError, match="channels-last"):
        fusion.apply({"params": params["fusion"]}, g["backbone_out"][:, :, 0], text, mask)


def test_fewer_temporal_tokens_use_sliced_positions(converted, golden):
    modules, params, _ = converted
    g = golden[1]
    video = np.transpose(g["backbone_out"], (0, 2, 3, 4, 1))[:, :2]
    video_states, text_states = jax.eval_shape(
        modules["fusion"].apply, {"params": params["fusion"]}, video, g["text_states"], g["attention_mask"])
    assert video_states.shape == (2, 2 * 49, FUSION.hidden_size) and text_states.shape == g["text_states"].shape


def test_bfloat16_forward_close(converted, golden, outputs):
    _, params, _ = converted
    g = {k: jnp.asarray(v) for k, v in golden[1].items()}
    out16 = jax.jit(functools.partial(forward, build_modules(jnp.bfloat16)))(params, g)
    for key in ("text_states", "v", "fusion_full_video_masked_text_text_states", "z_T", "mlm_logits"):
        assert out16[key].dtype == jnp.bfloat16, key
        err = float(np.max(np.abs(np.asarray(out16[key], np.float32) - golden[1][key])))
        scale = float(np.max(np.abs(golden[1][key])))
        print(f"bf16 {key}: max |err| {err:.3f} (max |value| {scale:.2f})")
        assert np.isfinite(err) and err <= 0.05 * max(scale, 1.0)


def test_heads_init_xavier_zero_bias_and_qa_shapes():
    rng = jax.random.key(0)
    x = jnp.ones((3, 64))
    oe = OpenEndedQAHead(num_answers=10)
    p = jax.jit(oe.init)(rng, x)
    assert nn.get_partition_spec(p)["params"]["fc2"]["kernel"] == jax.sharding.PartitionSpec("mlp", "classes")
    params = nn.unbox(p)["params"]
    assert jax.eval_shape(lambda p: oe.apply({"params": p}, x), params).shape == (3, 10)
    assert not np.any(np.asarray(params["fc1"]["bias"]))
    limit = np.sqrt(6.0 / (64 + 32))  # Xavier-uniform bound for a 64 -> 32 kernel
    k = np.asarray(params["fc1"]["kernel"])
    assert np.abs(k).max() <= limit and np.abs(k).max() > 0.8 * limit
    mc = MultipleChoiceHead()
    mc_params = jax.jit(mc.init)(rng, x)
    scores = jax.eval_shape(lambda p: mc.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(1)}),
                            mc_params)
    assert scores.shape == (3,)
    assert nn.unbox(mc_params)["params"]["fc1"]["kernel"].shape == (64, 256)
    with pytest.raises(ValueError, match="input_kind"):
        FusedVideoHead(64, input_kind="cls").init(rng, x)


def test_fusion_cls_token_of_the_official_fill_in_the_blank_recipe(converted, golden):
    """use_text_cls=False (official LSMDC-FiB): a learned all_cls_token between video and text, converted from
    its (1, 1, H) official tensor, attended by the text, and cut from both returned sequences."""
    from configs import finetune_qa

    state, g = golden
    hidden = FUSION.hidden_size
    token = np.random.default_rng(0).normal(0, 0.02, (1, 1, hidden)).astype(np.float32)
    module = FusionEncoder(FUSION, video_dim=VIDEO_DIM, cls_token=True)
    video = np.transpose(g["backbone_out"], (0, 2, 3, 4, 1))
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), video, g["text_states"], g["attention_mask"]))
    fusion_state = {k: v for k, v in state.items() if k.startswith(conv.CLOVER_FUSION_SRC)}
    params, _ = assemble({**fusion_state, f"{conv.CLOVER_FUSION_SRC}all_cls_token": token},
                         conv.clover_fusion_plan(FUSION, VIDEO_DIM, "fusion", cls_token=True),
                         {"fusion": shapes["params"]}, ignore_unexpected=conv.CLOVER_FUSION_UNUSED)
    np.testing.assert_array_equal(params["fusion"]["all_cls_token"], token.reshape(hidden))
    apply = jax.jit(lambda p: module.apply({"params": p}, video, g["text_states"], g["attention_mask"]))
    video_states, text_states = apply(params["fusion"])
    assert video_states.shape == (2, 4 * 49, hidden) and text_states.shape == g["text_states"].shape
    _, moved = apply({**params["fusion"], "all_cls_token": params["fusion"]["all_cls_token"] + 1.0})
    assert float(jnp.abs(moved - text_states).max()) > 1e-3  # the text attends to it
    modules, plain_params, _ = converted
    _, without = modules["fusion"].apply({"params": plain_params["fusion"]}, video, g["text_states"],
                                         g["attention_mask"])
    assert float(jnp.abs(without - text_states).max()) > 1e-3
    fib = finetune_qa.get_config("lsmdc_fib,tiny").model.overrides
    assert fib["fusion_cls_token"] is True
    assert "fusion_cls_token" not in finetune_qa.get_config("lsmdc_mc,tiny").model.overrides

