"""Chunks of whole clips, the unit the CPU kernels split a batch into when a clip has too few tokens.

The Dense kernel gradients (`dense_grad.py`) and the attention of single-window clips
(`window_attention.py`) of the late Swin stages sum or run over a few chunks of whole clips: at least
`CpuTuning.min_clip_chunks` (two per core of the `benchmarks/` host, whose XLA:CPU runs independent chunks
concurrently), and a multiple of the mesh's device count, so a batch sharded over devices splits evenly.

Clip groups (`ExecutionPolicy.clip_groups`, applied by `kernels.ops.in_clip_groups`) are the other use of
whole clips: the Swin's first stage run as two interleaved groups on a single CPU device, which XLA:CPU runs
side by side. Measured there (tcmalloc, alternating runs, 2 threads): a first-stage block of the `tiny` step at
8x224² (16 clips) forward + backward 500 -> 453 ms; the `small` step (8x112²) 3.88 / 3.85 s in one group,
3.80 / 3.77 s with two in the first stage, 3.89 / 3.80 s with two in every stage, so the default groups the
first stage only.
"""
from __future__ import annotations


def clip_chunk_counts(clips: int, devices: int, min_chunks: int) -> list[int]:
    """Counts m >= `min_chunks` of equal chunks of whole clips a batch of `clips` splits into, ascending; each a
    multiple of `devices`."""
    return [m for m in range(min_chunks, clips + 1) if clips % m == 0 and m % devices == 0]
