"""benchmarks/gpu_step.py's pure parts: the out-of-memory classifier, the batch search and the row record."""
from __future__ import annotations

import json
import math

import jax
import pytest

from benchmarks import gpu_step


def test_only_xla_allocation_failures_count_as_out_of_memory():
    oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB."
    assert gpu_step.is_out_of_memory(jax.errors.JaxRuntimeError(oom))
    assert gpu_step.is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: Failed: out of memory (cuMemAlloc)"))
    assert not gpu_step.is_out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: cuDNN frontend: no valid plan"))
    assert not gpu_step.is_out_of_memory(RuntimeError(oom))  # not raised by XLA


def _search(limit: int, start: int, cap: int, resolution: int = 1) -> tuple[int, list[int]]:
    probed: list[int] = []

    def fits(b: int) -> bool:
        probed.append(b)
        return b <= limit

    return gpu_step.largest_fitting_batch(fits, start, cap, resolution), probed


@pytest.mark.parametrize("limit, start, cap, resolution, largest, probed", [
    (20, 8, 1000, 1, 20, [8, 16, 32, 24, 20, 22, 21]),  # doubling, then bisection between 16 and 32
    (100, 8, 12, 1, 12, [8, 12]),  # everything fits: stops at the cap
    (100, 8, 5, 1, 5, [5]),  # the cap below the start
    (0, 8, 1000, 1, 0, [8, 4, 2, 1]),  # nothing fits
    (20, 8, 1000, 4, 20, [8, 16, 32, 24, 20]),  # bisection stops once the gap is 4
    (23, 8, 1000, 4, 20, [8, 16, 32, 24, 20]),  # ... so it may answer below the true limit, by < 4
])
def test_batch_search_doubles_then_bisects_and_probes_each_batch_once(limit, start, cap, resolution, largest,
                                                                       probed):
    assert _search(limit, start, cap, resolution) == (largest, probed)


def test_record_rates_and_strict_json_for_failed_rows():
    row = gpu_step.Row("fused", 4, "timed", global_batch=8, step_s=0.5, train_flops=10**12, compile_s=3.0,
                       memory=dict(peak=2 * 2**30), device_peak=3 * 2**30, finite=True)
    r = gpu_step.record(row, peak_flops=4e12, devices=2)
    assert r["clips_per_s"] == 16 and r["model_tflop_per_s"] == 2 and r["mfu"] == 0.25
    assert r["xla_peak_gib"] == 2 and r["device_peak_gib"] == 3
    failed = gpu_step.record(gpu_step.Row("bogus", 4, "timed", error="bad"), peak_flops=math.nan, devices=1)
    assert failed["step_s"] is None and failed["mfu"] is None and failed["device_peak_gib"] is None
    json.dumps(failed, allow_nan=False)
