"""Benchmark: one Swin window-attention core per implementation, forward and forward + backward, in isolation.

  .venv/bin/python -m benchmarks.window_attention [--clips 16] [--windows 64] [--heads 1] [--head-dim 32]
      [--window 4,7,7] [--repeats 5] [--implementations einsum,fused,chunked]

The default shape is stage 1 of the `tiny` Clover step at 8×224², batch 8 (16 clips: full and masked):
16 × 64 windows of 4·7·7 = 196 tokens, one head of 32, with the shifted block's mask. Prints the median
milliseconds of each implementation and its largest deviation from "einsum" (output, qkv and bias
gradients). Start it as the entry points start (tcmalloc, XLA flags): it re-executes itself the same way.
"""
from __future__ import annotations

import argparse
import statistics
import time

if __name__ == "__main__":  # before jax starts, as `python -m clover_jax.train` does
    from clover_jax import launch

    launch.prepare_process()  # the XLA flags and the malloc `python -m clover_jax.train` runs with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from clover_jax.models import window_attention as wa  # noqa: E402
from clover_jax.models.swin3d import shift_attention_mask  # noqa: E402


def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--windows", type=int, default=64, help="windows per clip (a square grid of windows)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--window", default="4,7,7")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--implementations", default="einsum,fused,chunked")
    a = p.parse_args()
    window = tuple(int(x) for x in a.window.split(","))
    side = int(round(a.windows ** 0.5))
    if side * side != a.windows or len(window) != 3:
        raise SystemExit("--windows must be a square number and --window three sizes t,h,w")
    names = a.implementations.split(",")
    for name in names:
        if name not in wa.ATTENTION_IMPLEMENTATIONS:
            raise SystemExit(f"--implementations: unknown {name!r}; valid: {', '.join(wa.ATTENTION_IMPLEMENTATIONS)}")
    n = int(np.prod(window))
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((a.clips, a.windows, n, 3, a.heads, a.head_dim)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((a.clips, a.windows, n, a.heads, a.head_dim)), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal((a.heads, n, n)), jnp.float32)
    padded = (window[0], side * window[1], side * window[2])
    mask = shift_attention_mask(padded, window, tuple(w // 2 for w in window))
    scale = a.head_dim**-0.5
    print(f"{a.clips} clips x {a.windows} windows x {a.heads} heads, {n} tokens of {a.head_dim}; "
          f"backend {jax.default_backend()}, {len(jax.devices())} device(s)")
    reference = None
    for name in ["einsum"] + [x for x in names if x != "einsum"]:
        def forward(qkv, bias, name=name):
            return wa.window_attention(qkv, bias, mask, scale=scale, implementation=name)
        grad = jax.jit(lambda qkv, bias, f=forward: jax.vjp(f, qkv, bias)[1](g))
        forward = jax.jit(forward)
        results = (forward(qkv, bias), *grad(qkv, bias))
        reference = reference or results
        error = max(float(jnp.max(jnp.abs(r - x))) for r, x in zip(reference, results))
        if name in names:
            print(f"{name:12s} forward {_median_ms(forward, (qkv, bias), a.repeats):7.1f} ms   forward+backward "
                  f"{_median_ms(grad, (qkv, bias), a.repeats):7.1f} ms   max |diff| vs einsum {error:.1e}")


if __name__ == "__main__":
    main()
