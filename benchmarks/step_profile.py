"""Benchmark: where one pre-training step's time goes, by Swin component and phase, from a jax.profiler trace.

  .venv/bin/python -m benchmarks.step_profile [--preset tiny] [--frames 8] [--size 224] [--batch 8] [--out DIR]

Compiles the real step (`benchmarks.train_step.compile_train_step`, one device), runs three warm-up steps,
times one untraced step, traces one more and sums the duration of every XLA op in the trace by the module its
HLO `op_name` names (resolved through fusions by `benchmarks.memory.hlo_instructions`: Swin attention, MLP,
LayerNorm, patch merging, patch embedding, the rest) and by
phase (forward, or backward: under `transpose(jvp(...))`). Work Eigen's pool threads do inside one dot is
not traced separately, and tracing adds a fixed cost to each small op, so the traced step is longer than
an untraced one; compare rows of the same table. Start it as the entry points start (tcmalloc, XLA flags).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import tempfile
import time

if __name__ == "__main__":
    from clover_jax import launch

    launch.prepare_process()  # the XLA flags and the malloc `python -m clover_jax.train` runs with

import jax  # noqa: E402

from benchmarks.memory import hlo_instructions  # noqa: E402
from benchmarks.train_step import compile_train_step  # noqa: E402

# component -> op_name fragments, first match wins (patch merging is `downsample`, before its own norm)
COMPONENTS: dict[str, tuple[str, ...]] = {
    "Swin patch merging": ("/downsample/",),
    "Swin window attention": ("/attn/",),
    "Swin MLP": ("/mlp/",),
    "Swin LayerNorms": ("/norm",),
    "Swin patch embedding": ("/patch_embed/",),
}
REST = "fusion, BERT, MLM head, losses, optimizer, other"
def component_of(op_name: str) -> tuple[str, str]:
    """(component, phase) of one op_name."""
    phase = "backward" if "transpose(jvp(" in op_name else "forward"
    if "video_encoder" in op_name:
        for component, fragments in COMPONENTS.items():
            if any(f in op_name for f in fragments):
                return component, phase
    return REST, phase


def traced_op_seconds(trace_dir: str, instructions: dict[str, tuple[str, str]]) -> collections.Counter:
    """Seconds per (component, phase) over the complete ('X') events of the trace that name an HLO op."""
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event.get("name") in instructions:
            totals[component_of(instructions[event["name"]][1])] += event["dur"] / 1e6
    return totals


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-length", type=int, default=30)
    p.add_argument("--out", default="", help="keep the trace here (default: a temporary folder)")
    a = p.parse_args()
    built = compile_train_step(a.preset, a.batch, a.text_length, a.frames, a.size)
    state = built.state
    for _ in range(3):
        state, metrics = built.compiled(state, built.batch, built.rng)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = built.compiled(state, built.batch, built.rng)
    jax.block_until_ready(metrics)
    untraced = time.perf_counter() - start
    out = a.out or tempfile.mkdtemp(prefix="clover_step_profile_")
    start = time.perf_counter()
    with jax.profiler.trace(out, create_perfetto_trace=True):
        state, metrics = built.compiled(state, built.batch, built.rng)
        jax.block_until_ready(metrics)
    traced = time.perf_counter() - start
    totals = traced_op_seconds(out, hlo_instructions(built.compiled.as_text()))
    print(f"{a.preset}, {a.frames}x{a.size}², batch {a.batch}: untraced step {untraced:.2f} s, traced {traced:.2f} s "
          f"(includes writing the trace), traced ops {sum(totals.values()):.2f} s; trace in {out}")
    print("| component | forward s | backward s |\n|---|---|---|")
    for component in (*COMPONENTS, REST):
        print(f"| {component} | {totals[(component, 'forward')]:.2f} | {totals[(component, 'backward')]:.2f} |")


if __name__ == "__main__":
    main()
