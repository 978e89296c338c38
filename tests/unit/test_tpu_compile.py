"""Ahead-of-time compiles for a TPU topology on this CPU host (`clover_jax.aot`, `clover_jax.compile`): the
execution policy is the TPU one, none of the CPU kernels is in the program, and memory is reported.

Needs libtpu (requirements-tpu.txt, which the README's test command installs): the test skips without it on a
user's clone and fails when CI is set.
"""
from __future__ import annotations

import importlib.util
import os

import jax
import ml_collections
import pytest

from clover_jax import aot
from clover_jax.compile import compile_report, format_report
from clover_jax.kernels.cpu import dense_grad, dropout, layer_norm, window_attention
from clover_jax.kernels.ops import CLIP_GROUPS_SCOPE
from configs import pretrain

# The name scopes of the CPU kernels (each kernel's ops run inside its scope, so lowered programs carry it).
CPU_KERNEL_SCOPES = (window_attention.SCOPE, dense_grad.SCOPE, layer_norm.SCOPE, dropout.SCOPE, CLIP_GROUPS_SCOPE)


@pytest.fixture(scope="module")
def tpu_devices():
    if importlib.util.find_spec("libtpu") is None:
        msg = "libtpu is not installed (pip install -r requirements-tpu.txt)"
        if os.environ.get("CI"):
            pytest.fail(msg + " — and CI is set, where .ci/run installs it")
        pytest.skip(msg)
    return aot.compile_devices(aot.parse_topology("v5e:2x2"))


def _tiny_with_dropout():
    config = pretrain.get_config("tiny")
    config.model.overrides.text_overrides.hidden_dropout = 0.1  # the golden tiny BERT has none
    config.compilation_cache_dir = ""
    return config


def _lowered_text(config, devices) -> str:
    lowered, run = aot.lower_train_step(config, devices)
    return lowered.as_text(debug_info=True), run


def test_topology_names():
    assert aot.parse_topology("v5p-32") == aot.Topology("v5p-32", "v5p", 16, "2x2x4")
    assert aot.parse_topology("v5litepod-16").shape == "4x4" and aot.parse_topology("v4-8").chips == 4
    assert aot.parse_topology("v5p:2x2x1").chips == 4 and aot.parse_topology("h100-8").shape == "1x1x8"
    for bad, match in (("v9-8", "unknown chip"), ("v5p-3", "multiple of 2"), ("v5e:2xq", "chip shape")):
        with pytest.raises(ValueError, match=match):
            aot.parse_topology(bad)


def test_compile_only_environment():
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
    aot.set_compile_only_environment(env, "h100-8")
    assert env["JAX_PLATFORMS"] == "cpu" and env["ALLOW_MULTIPLE_LIBTPU_LOAD"] == "1"
    # the user's own setting wins; the other GPU compile-only flag is added
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true --xla_disable_hlo_passes=triton-softmax-rewriter"
    env = {}
    aot.set_compile_only_environment(env, "v5p-32")
    assert "XLA_FLAGS" not in env  # TPU compiles take no GPU flags


def test_collectives_and_buffers_from_hlo_text():
    hlo = """
  %all-reduce.1 = f32[1024,768]{1,0} all-reduce(f32[1024,768]{1,0} %p), metadata={op_name="jit(step)/grad"}
  %ag-start = (bf16[8,64]{1,0}, bf16[32,64]{1,0}) all-gather-start(bf16[8,64]{1,0} %x), metadata={op_name="nce/gather"}
  %ag-done = bf16[32,64]{1,0} all-gather-done((bf16[8,64]{1,0}, bf16[32,64]{1,0}) %ag-start)
  ROOT %fusion.2 = f32[4096,4096]{1,0} fusion(f32[2]{0} %a), kind=kLoop
"""
    found = aot.hlo_collectives(hlo)
    assert found["all-reduce"]["count"] == 1 and found["all-reduce"]["bytes"] == 1024 * 768 * 4
    assert found["all-gather"]["count"] == 1 and found["all-gather"]["bytes"] == (8 * 64 + 32 * 64) * 2 // 2
    assert found["all-gather"]["largest"][0][1] == "nce/gather"
    assert aot.largest_buffers(hlo, 1)[0][0] == 4096 * 4096 * 4


def test_a_step_that_does_not_fit_names_its_largest_buffers():
    report = dict(step="train", topology="v5e-4", chips=4, chip="v5e", shape="2x2", num_slices=1, compile_s=1.0,
                  mesh={"data": 4}, clips_per_chip=32, config_batch=128, policy="execution policy ...",
                  model=dict(remat="none", video_batching="batched", dtype="bfloat16", microbatches=1),
                  arguments=3 * aot.GIB, outputs=aot.GIB, aliased=aot.GIB, temporaries=20 * aot.GIB,
                  peak=23 * aot.GIB, hbm=16 * aot.GIB, fits=False, xla_flops=2e12, analytic_flops=1e12,
                  bytes_accessed=1e11, roofline_s=0.1, compute_s=0.01, memory_s=0.1, collectives={},
                  largest_buffers=[(6 * aot.GIB, "bf16[64,8,56,56,128]", "video_encoder/layers_0/attn")])
    text = format_report(report)
    assert "peak 23.00 GiB of 16.00 GiB HBM (DOES NOT FIT)" in text
    assert "largest buffers: 6.00 GiB bf16[64,8,56,56,128] (video_encoder/layers_0/attn)" in text


def test_a_step_the_compiler_refuses_for_memory_is_reported_not_raised():
    """libtpu itself refuses a program whose temporaries exceed HBM (v4-8 at 512 clips per chip did): the report
    says so in the same form, with the largest values of the program, instead of a traceback."""
    from types import SimpleNamespace

    from clover_jax import compile as compile_cli
    from clover_jax.kernels.execution import policy_for

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(35.98G) exceeds available HBM (30.75G).")
    run = SimpleNamespace(mesh=SimpleNamespace(shape={"data": 4}), execution=policy_for("tpu", 4),
                          model_config=SimpleNamespace(remat="none", video_batching="per_clip", dtype="bfloat16"))
    refused = aot.CompilerOutOfMemory(message, run, 243.6, [(8 * aot.GIB, "bf16[2048,768]", "fusion/x")])
    config = ml_collections.ConfigDict(dict(data=dict(batch_size=2048), eval=dict(batch_size=32)))
    report = compile_cli._refused_report(config, aot.parse_topology("v4-8"), 1, "train", 4, refused)
    assert not report["fits"] and report["temporaries"] == pytest.approx(35.98 * aot.GIB)
    text = format_report(report)
    assert "the compiler refused it after 243.6 s" in text and "512 clips per chip" in text
    assert "DOES NOT FIT: temporaries alone 35.98 GiB of 30.75 GiB available HBM" in text
    assert "8.00 GiB bf16[2048,768] (fusion/x)" in text


def test_cpu_lowering_carries_every_cpu_kernel():
    """The positive control: the same step lowered for one CPU device runs every CPU kernel."""
    text, run = _lowered_text(_tiny_with_dropout(), jax.devices()[:1])
    assert run.execution.platform == "cpu"
    missing = [scope for scope in CPU_KERNEL_SCOPES if scope not in text]
    assert not missing, missing


def test_tpu_compile_has_the_tpu_policy_no_cpu_kernel_and_reports_memory(tpu_devices):
    """The per-clip encoder (the `:base` recipe's) for 4 TPU chips: no CPU kernel, memory reported, and each scan
    step encodes one clip per chip, so the step gathers no clip (a scan over the global batch axis all-gathered
    the whole video batch to every chip)."""
    config = _tiny_with_dropout()
    config.model.update(video_batching="per_clip", remat="full")
    text, run = _lowered_text(config, tpu_devices)
    assert run.execution.platform == "tpu" and run.execution.window_attention == "fused"
    assert (run.execution.layer_norm, run.execution.dense, run.execution.dropout) == ("xla", "xla", "xla")
    assert run.execution.clip_groups == ()
    found = [scope for scope in CPU_KERNEL_SCOPES if scope in text]
    assert not found, found
    report = compile_report(config, "v5e:2x2")
    print("\n" + format_report(report))
    assert report["chips"] == 4 and report["clips_per_chip"] == 2 and report["fits"]
    assert report["arguments"] > 0 and report["temporaries"] > 0 and report["peak"] < report["hbm"]
    assert report["xla_flops"] > 0 and report["analytic_flops"] > 0 and report["roofline_s"] > 0
    assert "all-reduce" in report["collectives"]  # the gradient reduction over the 4 chips
    assert "for 4 tpu devices: window_attention fused" in report["policy"]
    assert run.execution.batch_shards == 4 and report["model"]["video_batching"] == "per_clip"
    one_clip_bf16 = config.data.num_frames * config.data.image_size**2 * 3 * 2
    gathers = report["collectives"].get("all-gather", {"largest": []})["largest"]
    assert all(size < one_clip_bf16 for size, _ in gathers), gathers
