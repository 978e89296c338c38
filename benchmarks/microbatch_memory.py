"""Benchmark: compiled peak temporary memory of the pre-training step for `config.microbatches` k = 1, 2, 4.

  .venv/bin/python -m benchmarks.microbatch_memory [--preset tiny] [--frames 8] [--size 224] [--text-length 16]
      [--microbatches 1,2,4] [--placements 0,1]

Compiles (never runs) the real step — `tasks.pretrain_objective` + `grad_cache.value_and_grad` + AdamW +
`train_step.make_train_step` — for two placements and prints, per k, XLA's
`compiled.memory_analysis().temp_size_in_bytes` (per device: activations and other scratch; parameters,
optimizer state and the batch are arguments and not counted) and the compile time:
  - global batch 8 on 1 device;
  - global batch 16 on 8 virtual CPU devices (mesh data 4 x model 2).
Dropout is on, as in training; it does not change the memory. At 8x224² each compile takes minutes on
2 cores; XLA_FLAGS=--xla_backend_optimization_level=0 roughly halves that (LLVM optimisation only).
"""
from __future__ import annotations

import os

from clover_jax.xla_cpu_flags import with_default_flags  # jax-free: the CPU flags training compiles with

os.environ["XLA_FLAGS"] = with_default_flags(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clover_jax import (  # noqa: E402
    grad_cache,
    losses,
    optim,
    partitioning,  # noqa: E402
    tasks,
)
from clover_jax import train_step as ts  # noqa: E402
from clover_jax.models import clover  # noqa: E402

PLACEMENTS = (("1 device", {"data": 1}, 8), ("8 devices, data 4 x model 2", {"data": 4, "model": 2}, 16))


def abstract_batch(config: clover.CloverConfig, batch_size: int, text_length: int, sharding) -> dict:
    """ShapeDtypeStructs of a pre-training batch, placed on `sharding` (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: clover.dummy_batch(config, batch_size, text_length))
    return {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for k, x in shapes.items()}


def step_memory(config: clover.CloverConfig, mesh_axes: dict[str, int], batch_size: int, text_length: int,
                microbatches: int) -> tuple[int, float]:
    """(temp_size_in_bytes per device, compile seconds) of one compiled train step."""
    mesh = partitioning.make_mesh(mesh_axes, jax.devices()[: math.prod(mesh_axes.values())])
    boxed = jax.eval_shape(lambda: clover.init_params(config, jax.random.key(0)))
    param_sh = partitioning.param_shardings(boxed, mesh)
    tx, schedule = optim.make_optimizer(dict(lr=1e-4, warmup_steps=0), 10)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), param_sh)
    state_sh = ts.train_state_shardings(tx, params, param_sh, mesh)
    state = jax.eval_shape(lambda p: ts.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                           params)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
    replicas = partitioning.num_data_replicas(mesh)
    grad_cache.check_microbatches(batch_size, microbatches, replicas)
    objective = tasks.pretrain_objective(config, losses.default_loss_config(), replicas)
    batch_sh = partitioning.batch_sharding(mesh)
    step = ts.make_train_step(None, tx, state_shardings=state_sh, batch_sharding=batch_sh, mesh=mesh,
                              schedule=schedule, value_and_grad_fn=grad_cache.value_and_grad(objective, microbatches))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=partitioning.replicated(mesh))
    start = time.perf_counter()
    compiled = step.lower(state, abstract_batch(config, batch_size, text_length, batch_sh), rng).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--text-length", type=int, default=16)
    parser.add_argument("--microbatches", default="1,2,4")
    parser.add_argument("--placements", default="0,1", help="indices into PLACEMENTS (0: 1 device, 1: 8 devices)")
    args = parser.parse_args()
    config = clover.clover_config(args.preset, num_frames=args.frames, image_size=args.size)
    ks = [int(k) for k in args.microbatches.split(",")]
    print(f"Clover '{args.preset}', {args.frames}x{args.size}², text length {args.text_length}: "
          "compiled temp memory per device of one train step")
    print("| placement | global batch | k | chunk rows | temp MiB | vs k=1 | compile s |")
    print("|---|---|---|---|---|---|---|")
    for name, axes, batch in [PLACEMENTS[int(i)] for i in args.placements.split(",")]:
        base = None
        for k in ks:
            temp, seconds = step_memory(config, axes, batch, args.text_length, k)
            base = base or temp
            print(f"| {name} | {batch} | {k} | {batch // k} | {temp / 2**20:.1f} | {temp / base:.2f} | {seconds:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
