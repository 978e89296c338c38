"""Window-attention implementations (`kernels/attention.py`, `kernels/cpu/window_attention.py`): each equals the
plain einsum math of `models/window_attention.py` in values and gradients, alone and inside a Swin3D stage, when
the execution policy names it; the multi-mask patch embedding equals separate masked passes."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clover_jax.kernels import ops
from clover_jax.kernels.cpu import window_attention as chunked
from clover_jax.kernels.execution import PLATFORM_KERNELS, policy_for, use
from clover_jax.models.swin3d import SwinTransformer3D, shift_attention_mask, swin3d_config
from tests.unit.test_swin3d import random_params

VARIANTS = [name for name in ops.WINDOW_ATTENTION if name != "einsum"]


def _policy(name: str, devices: int = 8, **cpu):
    """A CPU policy (the suite's 8 devices) whose window attention is `name`, with CPU sizes `cpu`."""
    return policy_for("cpu", devices, {"window_attention": name, "cpu": cpu})


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    b, nw, h, n, d = 2, 8, 2, 98, 16
    qkv = jnp.asarray(rng.standard_normal((b, nw, n, 3, h, d)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((b, nw, n, h, d)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((h, n, n)), jnp.float32)
    mask = shift_attention_mask((4, 14, 14), (2, 7, 7), (1, 3, 3))  # 8 windows of 98 tokens, 4 regions
    return qkv, g, bias, mask


def _value_and_grads(name, qkv, g, bias, mask, policy=None):
    def loss(qkv, bias):
        return jnp.sum(ops.window_attention(qkv, bias, mask, 0.25) * g)
    with use(policy or _policy(name)):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(qkv, bias)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_equals_reference(inputs, name, with_mask):
    qkv, g, bias, mask = inputs
    mask = mask if with_mask else None
    ref_value, ref_grads = _value_and_grads("einsum", qkv, g, bias, mask)
    value, grads = _value_and_grads(name, qkv, g, bias, mask)
    errors = [_rel_err(value, ref_value)] + [_rel_err(a[..., i, :, :], r[..., i, :, :])
                                             for a, r in [(grads[0], ref_grads[0])] for i in range(3)]
    errors.append(_rel_err(grads[1], ref_grads[1]))
    print(f"\n{name} mask={with_mask}: relative errors value,dq,dk,dv,dbias = {['%.1e' % e for e in errors]}")
    assert max(errors) < 1e-5, errors
    assert float(jnp.abs(ref_grads[1]).max()) > 0  # the bias gradient is really exercised


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "loop"])
@pytest.mark.parametrize("chunk_rows", [1, 4])
def test_chunked_with_several_chunks_per_clip(inputs, chunk_rows, unroll):
    """Small chunks (the config's kernels.cpu sizes): 8 or 2 chunks per clip, so the shift-mask rows are sliced at
    nonzero offsets; the chunks unrolled into independent ops (16 or 4 of them) and run as a loop."""
    qkv, g, bias, mask = inputs
    policy = _policy("chunked", chunk_rows=chunk_rows, max_unrolled_chunks=16 if unroll else 0, min_unrolled_scores=0)
    windows = max(1, chunk_rows // bias.shape[0])
    assert chunked.unrolled(qkv.shape[0] * mask.shape[0] // windows, windows * bias.shape[0], qkv.shape[2],
                            policy) == unroll
    assert chunked.chunk_windows(mask.shape[0], bias.shape[0], 2, 98, policy) == windows
    ref_value, ref_grads = _value_and_grads("einsum", qkv, g, bias, mask)
    value, grads = _value_and_grads("chunked", qkv, g, bias, mask, policy)
    errors = [_rel_err(value, ref_value), _rel_err(grads[0], ref_grads[0]), _rel_err(grads[1], ref_grads[1])]
    assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "loop"])
def test_chunked_steps_over_batch_shards_without_gathering(inputs, unroll):
    """On a batch-sharded mesh each step of the chunk loop takes one chunk of every shard, so no device gathers
    another's rows (the loop over the global chunk order all-gathered qkv); values and gradients as einsum."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    qkv, g, bias, mask = inputs
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    cpu = dict(chunk_rows=4, max_unrolled_chunks=16 if unroll else 0, min_unrolled_scores=0)

    def compiled(batch_shards):
        def loss(qkv, bias, g):
            return jnp.sum(ops.window_attention(qkv, bias, mask, 0.25) * g)
        with use(policy_for("cpu", 2, {"window_attention": "chunked", "cpu": cpu}, batch_shards=batch_shards)):
            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(sharded, replicated, sharded))
            return fn, fn.lower(qkv, bias, g).compile().as_text()

    fn, text = compiled(2)
    assert "all-gather" not in text
    if not unroll:  # what the test guards against: the loop over the global chunk order gathers
        assert "all-gather" in compiled(1)[1]
    ref_value, ref_grads = _value_and_grads("einsum", qkv, g, bias, mask)
    value, grads = fn(jax.device_put(qkv, sharded), jax.device_put(bias, replicated), jax.device_put(g, sharded))
    errors = [_rel_err(value, ref_value), _rel_err(grads[0], ref_grads[0]), _rel_err(grads[1], ref_grads[1])]
    assert max(errors) < 1e-5, errors


def test_chunked_groups_single_window_clips():
    """One window per clip (the late stages): a chunk takes several whole clips; values and gradients as einsum."""
    rng = np.random.default_rng(4)
    b, n, h, d = 16, 49, 4, 8
    qkv = jnp.asarray(rng.standard_normal((b, 1, n, 3, h, d)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((b, 1, n, h, d)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((h, n, n)), jnp.float32)
    eight, one = _policy("chunked"), _policy("chunked", devices=1)
    assert chunked.chunk_windows(1, h, b, n, eight) == 2  # 8 devices: 8 chunks of 2 clips
    assert chunked.chunk_windows(8, h, b, n, eight) == 8  # several windows per clip: within one clip, as before
    ref_value, ref_grads = _value_and_grads("einsum", qkv, g, bias, None)
    value, grads = _value_and_grads("chunked", qkv, g, bias, None)
    errors = [_rel_err(value, ref_value), _rel_err(grads[0], ref_grads[0]), _rel_err(grads[1], ref_grads[1])]
    assert max(errors) < 1e-5, errors
    assert chunked.chunk_windows(1, h, b, n, one) == 4  # one device: 4 chunks of 4 clips
    # `small`'s stages 3, 4
    assert chunked.chunk_windows(1, 12, 16, 196, one) == 4 and chunked.chunk_windows(1, 24, 16, 64, one) == 4
    assert chunked.chunk_windows(1, 64, 16, 196, one) == 1  # a chunk of two such clips would exceed max_chunk_scores
    assert chunked.chunk_windows(1, h, 2, n, one) == 1  # too few clips for min_clip_chunks chunks


def test_policy_picks_the_attention_by_platform():
    for platform, name in (("cpu", "chunked"), ("gpu", "dot_product"), ("tpu", "fused")):
        assert policy_for(platform, 4).window_attention == PLATFORM_KERNELS[platform]["window_attention"] == name
    assert policy_for("tpu", 4, {"window_attention": "einsum"}).window_attention == "einsum"
    with pytest.raises(ValueError, match="kernels.window_attention='flash'.*'einsum'"):
        policy_for("cpu", 1, {"window_attention": "flash"})


def test_swin_stage_variants_match_reference():
    """One stage (unshifted + shifted block, window shrunk in time) with every implementation: outputs
    and parameter gradients equal the einsum reference (relative-position table included)."""
    rng = np.random.default_rng(1)
    video = jnp.asarray(rng.standard_normal((2, 4, 32, 32, 3)), jnp.float32)
    readout = jnp.asarray(rng.standard_normal(64), jnp.float32)
    results = {}
    for name in ops.WINDOW_ATTENTION:
        config = swin3d_config("tiny", depths=(2, 2), num_heads=(1, 2))
        params = random_params(config, seed=0)
        model = SwinTransformer3D(config)
        loss = lambda p: jnp.sum(model.apply({"params": p}, video) @ readout)  # noqa: E731
        with use(_policy(name)):
            results[name] = jax.jit(jax.value_and_grad(loss))(params)
    ref_value, ref_grads = results.pop("einsum")
    for name, (value, grads) in results.items():
        errors = jax.tree.map(_rel_err, grads, ref_grads)
        worst = max(jax.tree.leaves(errors))
        print(f"\n{name}: loss rel err {_rel_err(value, ref_value):.1e}, worst param-gradient rel err {worst:.1e}")
        assert _rel_err(value, ref_value) < 1e-5
        assert worst < 1e-4, errors


def test_multi_mask_equals_separate_passes():
    """A (B, K, Hp, Wp) mask gives row b*K + j = clip b under mask j, from one patch embedding."""
    config = swin3d_config("tiny", depths=(2,), num_heads=(1,))
    params = random_params(config, seed=2)
    model = SwinTransformer3D(config)
    rng = np.random.default_rng(3)
    video = jnp.asarray(rng.standard_normal((2, 4, 32, 32, 3)), jnp.float32)
    masks = jnp.asarray(rng.random((2, 2, 8, 8)) < 0.4, jnp.float32)
    forward = jax.jit(lambda v, m: model.apply({"params": params}, v, m))
    both = np.asarray(forward(video, masks))
    assert both.shape[0] == 4
    for j in range(2):
        np.testing.assert_allclose(both[j::2], np.asarray(forward(video, masks[:, j])), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, K, Hp, Wp\)"):
        model.apply({"params": params}, video, masks[:, :, :4])


def test_clip_by_clip_encoder_matches_batched():
    """model.video_batching="per_clip": Clover's video encoder scans over clips (rematerialised); the pre-training
    outputs and every parameter gradient equal the batched encoder's under the CPU policy (drop path off: the
    scan splits the dropout key per clip, so its draws differ from the batched call's)."""
    from clover_jax.models.clover import Clover, clover_config, dummy_batch, init_params

    rng = np.random.default_rng(4)
    readout = jnp.asarray(rng.standard_normal(256), jnp.float32)
    results = {}
    for name in ("batched", "per_clip"):
        config = clover_config("tiny", num_frames=4, image_size=32, video_batching=name,  # 3 shards of one clip
                               execution=policy_for("cpu", 8, batch_shards=3))
        if not results:  # one batch and one set of parameters (the attention variant has no parameters of its own)
            shared = dummy_batch(config, batch_size=3, text_length=8)
            shared["video"] = rng.standard_normal(shared["video"].shape).astype(np.float32)
            shared["video_mask"] = (rng.random(shared["video_mask"].shape) < 0.4).astype(np.float32)
            shared["text_ids"] = rng.integers(1000, 2000, shared["text_ids"].shape).astype(np.int32)
            params = jax.jit(lambda r: nn.unbox(init_params(config, r)))(jax.random.key(0))
        model = Clover(config)

        def loss(p):  # fixed random readouts (a sum of squares after a LayerNorm would be ~constant)
            out = model.apply({"params": p}, shared, deterministic=False, rngs={"dropout": jax.random.key(5)})
            outs = {k: out[k] for k in ("v", "v_masked", "z_v", "z_t")}
            return sum(jnp.sum(o * readout[: o.shape[-1]]) for o in outs.values()), outs

        results[name] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    ((ref_value, ref_outs), ref_grads), ((value, outs), grads) = results["batched"], results["per_clip"]
    # The outputs themselves, not only the scalar: the random-sign readout sum cancels, so its relative
    # error is ill-conditioned (1.2e-5 seen on one CPU with outputs equal to 1e-6).
    for k in ref_outs:
        assert _rel_err(outs[k], ref_outs[k]) < 1e-5, k
    readout_scale = sum(float(jnp.sum(jnp.abs(o * readout[: o.shape[-1]]))) for o in ref_outs.values())
    # Only parameters the readouts depend on (key biases, the MLM head, ... have zero gradient up to rounding).
    errors = [_rel_err(g, r) for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))
              if float(jnp.abs(r).max()) > 1e-6]
    worst = max(errors)
    print(f"\nper_clip vs batched: loss rel err {_rel_err(value, ref_value):.1e}, worst gradient rel err {worst:.1e}")
    assert abs(float(value) - float(ref_value)) < 1e-5 * readout_scale
    assert worst < 1e-4
