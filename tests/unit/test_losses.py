"""Clover losses against the reference's golden arrays (values and gradients), in float64 and float32."""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clover_jax import losses

TRI_FILES = [
    "tri_nce_B4_D16_near0.0.npz",
    "tri_nce_B8_D32_near0.0.npz",
    "tri_nce_B8_D32_near0.9.npz",
    "tri_nce_B16_D24_near0.5.npz",
]
INFONCE_FILES = ["infonce_B4_D8.npz", "infonce_B12_D32.npz"]
FOCAL_FILES = ["focal_N5_C11.npz", "focal_N20_C50.npz"]
TRI_INPUTS = ("anchor", "full", "masked", "fused")

# precision mode -> (context, float dtype, relative tolerance)
@jax.jit
def _tri_values_and_grads(anchor, full, masked, fused):
    xs = (anchor, full, masked, fused)
    nce, rank = losses.tri_modal_exclusive_nce(*xs, temperature=0.05, margin=5.0)
    grads_nce = jax.grad(lambda *a: losses.tri_modal_exclusive_nce(*a)[0], argnums=(0, 1, 2, 3))(*xs)
    grads_total = jax.grad(lambda *a: sum(losses.tri_modal_exclusive_nce(*a)), argnums=(0, 1, 2, 3))(*xs)
    return nce, rank, grads_nce, grads_total


_infonce_value_and_grads = jax.jit(jax.value_and_grad(losses.symmetric_infonce, argnums=(0, 1)))
_focal_value_and_grad = jax.jit(jax.value_and_grad(losses.focal_mlm_loss))


@functools.lru_cache(maxsize=None)
def _pretrain_value_and_grads(grad_scale: str = "global", replicas: int = 1):
    cfg = losses.default_loss_config()
    cfg.contrastive_grad_scale = grad_scale
    objective = functools.partial(losses.pretrain_objective, cfg=cfg, num_data_replicas=replicas)
    return jax.jit(jax.value_and_grad(objective, has_aux=True))

MODES = {"x64": (lambda: jax.enable_x64(True), np.float64, 1e-8), "f32": (contextlib.nullcontext, np.float32, 1e-4)}


def _assert_close(actual, expected, tol, what):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    err = float(np.max(np.abs(actual - expected))) / scale
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def _load(golden_dir, name):
    return dict(np.load(golden_dir / "clover_losses" / name))


def test_golden_folder_is_fully_covered(golden_dir):
    on_disk = sorted(p.name for p in (golden_dir / "clover_losses").glob("*.npz"))
    assert on_disk == sorted(TRI_FILES + INFONCE_FILES + FOCAL_FILES + ["pretrain_total.npz"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TRI_FILES)
def test_tri_modal_exclusive_nce_matches_golden(golden_dir, name, mode):
    ctx, dtype, tol = MODES[mode]
    g = _load(golden_dir, name)
    with ctx():
        xs = [jnp.asarray(g[k], dtype) for k in TRI_INPUTS]
        nce, rank, grads_nce, grads_total = _tri_values_and_grads(*xs)
        assert nce.dtype == dtype
    _assert_close(nce, g["nce_loss"], tol, "nce_loss")
    if g["rank_loss"] == 0.0:
        assert float(rank) == 0.0
    else:
        _assert_close(rank, g["rank_loss"], tol, "rank_loss")
    for k, gn, gt in zip(TRI_INPUTS, grads_nce, grads_total):
        _assert_close(gn, g[f"grad_nce_{k}"], tol, f"grad_nce_{k}")
        _assert_close(gt, g[f"grad_total_{k}"], tol, f"grad_total_{k}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", INFONCE_FILES)
def test_symmetric_infonce_matches_golden(golden_dir, name, mode):
    ctx, dtype, tol = MODES[mode]
    g = _load(golden_dir, name)
    with ctx():
        video, text = jnp.asarray(g["video"], dtype), jnp.asarray(g["text"], dtype)
        loss, (gv, gt) = _infonce_value_and_grads(video, text)
    _assert_close(loss, g["loss"], tol, "loss")
    _assert_close(gv, g["grad_video"], tol, "grad_video")
    _assert_close(gt, g["grad_text"], tol, "grad_text")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", FOCAL_FILES)
def test_focal_mlm_loss_matches_golden(golden_dir, name, mode):
    ctx, dtype, tol = MODES[mode]
    g = _load(golden_dir, name)
    with ctx():
        logits = jnp.asarray(g["logits"], dtype)
        loss, grad = _focal_value_and_grad(logits, jnp.asarray(g["target"], jnp.int32))
    _assert_close(loss, g["loss"], tol, "loss")
    _assert_close(grad, g["grad_logits"], tol, "grad_logits")


def test_focal_ignores_unlabelled_positions(golden_dir):
    g = _load(golden_dir, "focal_N5_C11.npz")
    rng = np.random.default_rng(0)
    # Interleave 4 extra positions with random logits whose label is ignore_index; the loss must not move.
    logits = np.concatenate([g["logits"], rng.normal(size=(4, g["logits"].shape[1])) * 10])[[0, 5, 1, 6, 2, 7, 3, 8, 4]]
    labels = np.concatenate([g["target"], np.full(4, -100)])[[0, 5, 1, 6, 2, 7, 3, 8, 4]]
    loss = losses.focal_mlm_loss(jnp.asarray(logits.reshape(3, 3, -1), jnp.float32), jnp.asarray(labels.reshape(3, 3)))
    _assert_close(loss, g["loss"], 1e-5, "loss with ignored positions")


def test_focal_is_zero_without_masked_labels():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 7)), jnp.float32)
    labels = jnp.full((2, 5), -100)
    loss, grad = _focal_value_and_grad(logits, labels)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def _pretrain_inputs(g, dtype):
    outputs = {
        "v": g["video"],
        "t": g["text"],
        "v_masked": g["video_masked"],
        "t_masked": g["text_masked"],
        "z_v": g["fused_masked_video_full_text"],
        "z_t": g["fused_full_video_masked_text"],
        "mlm_logits": g["mlm_logits"].reshape(1, *g["mlm_logits"].shape),  # golden (N, C) -> (B=1, L=N, V=C)
    }
    outputs = {k: jnp.asarray(v, dtype) for k, v in outputs.items()}
    labels = jnp.asarray(g["mlm_target"].reshape(1, -1), jnp.int32)
    return outputs, labels


GOLDEN_GRAD_KEY = {
    "v": "video",
    "t": "text",
    "v_masked": "video_masked",
    "t_masked": "text_masked",
    "z_v": "fused_masked_video_full_text",
    "z_t": "fused_full_video_masked_text",
    "mlm_logits": "mlm_logits",
}


@pytest.mark.parametrize("mode", MODES)
def test_pretrain_objective_matches_golden(golden_dir, mode):
    ctx, dtype, tol = MODES[mode]
    g = _load(golden_dir, "pretrain_total.npz")
    with ctx():
        outputs, labels = _pretrain_inputs(g, dtype)
        (total, terms), grads = _pretrain_value_and_grads()(outputs, labels)
    _assert_close(total, g["total"], tol, "total")
    _assert_close(terms["total"], g["total"], tol, "terms[total]")
    _assert_close(terms["mlm"], g["mlm_loss"], tol, "mlm")
    for term in losses.CONTRASTIVE_TERMS:
        _assert_close(terms[term], g[term], tol, term)
    for key, golden_key in GOLDEN_GRAD_KEY.items():
        expected = g[f"grad_total_{golden_key}"].reshape(grads[key].shape)
        _assert_close(grads[key], expected, tol, f"grad {key}")


def test_pretrain_metrics_on_constructed_embeddings():
    # Shapes as in pretrain_total.npz so the compiled objective is reused.
    rng = np.random.default_rng(2)
    v = rng.normal(size=(6, 16))
    outputs = {k: jnp.asarray(v, jnp.float32) for k in ("v", "t", "v_masked", "t_masked", "z_v", "z_t")}
    outputs["t"] = jnp.asarray(v[[1, 0, 2, 3, 4, 5]], jnp.float32)  # rows 0 and 1 swapped: 4/6 correct
    outputs["mlm_logits"] = jnp.zeros((1, 9, 30))
    (_, terms), _ = _pretrain_value_and_grads()(outputs, jnp.full((1, 9), -100, jnp.int32))
    cos = np.asarray(losses.l2_normalize(outputs["v"]) @ losses.l2_normalize(outputs["t"]).T)
    assert float(terms["acc_v2t"]) == pytest.approx(4 / 6)
    assert float(terms["acc_t2v"]) == pytest.approx(4 / 6)
    assert float(terms["cos_pos"]) == pytest.approx(np.mean(np.diag(cos)), rel=1e-5)
    assert float(terms["cos_neg"]) == pytest.approx((cos.sum() - np.trace(cos)) / 30, rel=1e-5, abs=1e-6)
    assert float(terms["mlm"]) == 0.0


def test_loss_weights_apply(golden_dir):
    g = _load(golden_dir, "pretrain_total.npz")
    outputs, labels = _pretrain_inputs(g, np.float32)
    cfg = losses.default_loss_config()
    cfg.loss_weights.mlm = 0.0
    cfg.loss_weights.rank_text_anchor = 2.0
    total, _ = losses.pretrain_objective(outputs, labels, cfg)
    expected = g["total"] - g["mlm_loss"] + g["rank_text_anchor"]
    _assert_close(total, expected, 1e-5, "weighted total")


def test_reference_grad_scale_divides_contrastive_gradients_by_replicas(golden_dir):
    g = _load(golden_dir, "pretrain_total.npz")
    replicas = 4
    with jax.enable_x64(True):
        outputs, labels = _pretrain_inputs(g, np.float64)
        results = {}
        # "global" ignores the replica count: reuse the function compiled for the golden test.
        results["global"] = _pretrain_value_and_grads("global", 1)(outputs, labels)
        results["reference"] = _pretrain_value_and_grads("reference", replicas)(outputs, labels)
    (total_g, _), grads_g = results["global"]
    (total_r, _), grads_r = results["reference"]
    _assert_close(total_r, total_g, 1e-14, "value is unchanged")
    for key in ("v", "t", "v_masked", "t_masked", "z_v", "z_t"):
        _assert_close(np.asarray(grads_r[key]) * replicas, grads_g[key], 1e-12, f"grad {key} x R")
    _assert_close(grads_r["mlm_logits"], grads_g["mlm_logits"], 1e-14, "MLM grad unscaled")


@pytest.mark.parametrize("our_replicas", [1, 4])
def test_official_grad_scale_is_golden_over_the_official_replicas(golden_dir, our_replicas):
    """"official": the contrastive gradient is the golden one / 32 (the official pre-training's 8 GPUs x 4
    machines, `official_replicas`'s default) whatever our replica count; the MLM gradient is the golden one."""
    g = _load(golden_dir, "pretrain_total.npz")
    official = losses.default_loss_config().official_replicas
    assert official == 32
    with jax.enable_x64(True):
        outputs, labels = _pretrain_inputs(g, np.float64)
        (total, _), grads = _pretrain_value_and_grads("official", our_replicas)(outputs, labels)
    _assert_close(total, g["total"], 1e-8, "value is the golden total")
    for key, golden_key in GOLDEN_GRAD_KEY.items():
        expected = g[f"grad_total_{golden_key}"].reshape(grads[key].shape)
        if key != "mlm_logits":
            expected = expected / official
        _assert_close(grads[key], expected, 1e-8, f"grad {key}")


def test_official_grad_scale_of_retrieval_fine_tuning(golden_dir):
    """The fine-tune InfoNCE is gathered like pre-training's: "official" divides its gradient by the
    recipe's official GPU count (8 for MSR-VTT), independent of ours."""
    from clover_jax import tasks
    from clover_jax.models.clover import clover_config

    g = _load(golden_dir, "infonce_B12_D32.npz")
    cfg = losses.default_loss_config()
    cfg.contrastive_grad_scale, cfg.official_replicas = "official", 8
    objective = tasks.retrieval_objective(clover_config("tiny"), cfg, num_data_replicas=2)
    with jax.enable_x64(True):
        embeddings = {"v": jnp.asarray(g["video"]), "t": jnp.asarray(g["text"])}
        (value, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(embeddings, jnp.zeros(()))
    _assert_close(value, g["loss"], 1e-8, "loss")
    _assert_close(metrics["infonce"], g["loss"], 1e-8, "logged infonce")
    _assert_close(grads["v"], g["grad_video"] / 8, 1e-8, "grad_video / 8")
    _assert_close(grads["t"], g["grad_text"] / 8, 1e-8, "grad_text / 8")


def test_bad_config_fails_loudly(golden_dir):
    g = _load(golden_dir, "pretrain_total.npz")
    outputs, labels = _pretrain_inputs(g, np.float32)
    with pytest.raises(ValueError, match="contrastive_grad_scale"):
        losses.pretrain_objective(outputs, labels, {"contrastive_grad_scale": "local"})
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="official_replicas"):
            losses.contrastive_grad_factor({"contrastive_grad_scale": "official", "official_replicas": bad})
    with pytest.raises(ValueError, match="unknown terms"):
        losses.pretrain_objective(outputs, labels, {"loss_weights": {"itm": 1.0}})
    with pytest.raises(KeyError, match="z_t"):
        losses.pretrain_objective({k: v for k, v in outputs.items() if k != "z_t"}, labels)


def test_tri_nce_on_batch_sharded_inputs_is_the_global_loss(golden_dir):
    """Under jit with the batch split over 8 devices, XLA gathers: the loss equals the unsharded one."""
    g = _load(golden_dir, "tri_nce_B16_D24_near0.5.npz")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    xs = [jax.device_put(jnp.asarray(g[k], jnp.float32), sharding) for k in TRI_INPUTS]
    nce, rank = jax.jit(losses.tri_modal_exclusive_nce)(*xs)
    _assert_close(nce, g["nce_loss"], 1e-5, "sharded nce")
    _assert_close(rank, g["rank_loss"], 1e-5, "sharded rank")


def test_official_mlm_mean_averages_each_gpus_own_mean():
    """Issue 31, D10: the official MLM is each GPU's focal mean over its own masked tokens, then DDP's mean."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 5, 13)).astype(np.float32)
    labels = np.full((8, 5), -100, np.int32)
    labels[0, :4] = [1, 2, 3, 4]  # group 0 (rows 0-1): 4 tokens; group 1: 1; group 2: 0; group 3: 2
    labels[3, 0] = 5
    labels[6, 1], labels[7, 2] = 6, 7
    terms = np.asarray(losses.focal_mlm_terms(jnp.asarray(logits), jnp.asarray(labels)))
    per_gpu = [terms[2 * g:2 * g + 2].sum() / max((labels[2 * g:2 * g + 2] != -100).sum(), 1) for g in range(4)]
    got = float(losses.official_mlm_loss(jnp.asarray(logits), jnp.asarray(labels), groups=4))
    assert got == pytest.approx(np.mean(per_gpu), rel=1e-6)
    assert abs(got - float(losses.focal_mlm_loss(jnp.asarray(logits), jnp.asarray(labels)))) > 1e-3
    assert float(losses.official_mlm_loss(jnp.asarray(logits), jnp.asarray(labels), groups=1)) == pytest.approx(
        float(losses.focal_mlm_loss(jnp.asarray(logits), jnp.asarray(labels))), rel=1e-6)
    with pytest.raises(ValueError, match="multiple of 3"):
        losses.mlm_row_weights(jnp.asarray(labels), 3)
    with pytest.raises(ValueError, match="mlm_mean"):
        losses.mlm_groups({"mlm_mean": "per_gpu"})
    assert losses.mlm_groups({"mlm_mean": "per_replica", "official_replicas": 32}) == 32
