"""Ahead-of-time compiles for chips this host does not have: topologies, chip constants and the compiled steps.

`compile_devices("v5p-32")` returns compile-only devices from libtpu's compiler (`jax.experimental.topologies`,
as MaxText's `train_compile.py` does; no TPU needed), `compile_devices("h100")` from the CUDA plugin's (no GPU
needed). `compile_train_step` / `compile_embedding_step` lower the exact steps `clover_jax.train` and the
evaluators run from abstract arrays carrying their shardings, so nothing is allocated; the mesh's platform
picks the execution policy (`kernels/execution.py`). `hlo_collectives` and `largest_buffers` read the
compiled program's HLO text.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, MutableMapping

import ml_collections

GIB = 2**30

# libtpu on a host without TPUs, used only to compile: no metadata-server queries or start-up warnings, and no
# lockfile, so several processes (the suite's workers, a compile beside a test) may load it at once.
COMPILE_ONLY_TPU_ENVIRONMENT = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3",
}


# XLA:GPU with no device cannot autotune: Triton GEMM tilings then fail ("Couldn't find output tile sizes", a
# Swin Dense) and so does a Triton softmax fusion of the NCE logits; cuBLAS and XLA's own fusions compile.
GPU_COMPILE_ONLY_XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false --xla_disable_hlo_passes=triton-softmax-rewriter"


def set_compile_only_environment(environ: MutableMapping[str, str] = os.environ, topology: str = "") -> None:
    """Before jax starts: the CPU as the only runtime platform, libtpu quiet and, for a GPU `topology` name,
    GPU_COMPILE_ONLY_XLA_FLAGS (values already set win)."""
    environ.setdefault("JAX_PLATFORMS", "cpu")
    for name, value in COMPILE_ONLY_TPU_ENVIRONMENT.items():
        environ.setdefault(name, value)
    chip = re.match(r"[a-z0-9]+?(?=[-:]|$)", topology.strip().lower())
    if chip and CHIPS.get(chip.group(0), Chip("tpu", 0, 0, 0)).platform == "gpu":
        given = environ.get("XLA_FLAGS", "")
        extra = [f for f in GPU_COMPILE_ONLY_XLA_FLAGS.split() if f.split("=")[0] not in given]
        environ["XLA_FLAGS"] = " ".join([given, *extra]).strip()


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip: what a step's roofline and memory are measured against (vendor figures)."""

    platform: str  # "tpu" or "gpu"
    hbm_gib: float
    bf16_tflops: float  # dense bf16 peak
    hbm_gbps: float  # HBM bandwidth, GB/s
    cores_per_chip: int = 1  # TPU "-N" names count TensorCores (v4, v5p: 2 per chip, one jax device)


CHIPS: dict[str, Chip] = {
    "v4": Chip("tpu", hbm_gib=32, bf16_tflops=275, hbm_gbps=1228, cores_per_chip=2),
    "v5e": Chip("tpu", hbm_gib=16, bf16_tflops=197, hbm_gbps=819),
    "v5p": Chip("tpu", hbm_gib=95, bf16_tflops=459, hbm_gbps=2765, cores_per_chip=2),
    "v6e": Chip("tpu", hbm_gib=32, bf16_tflops=918, hbm_gbps=1640),
    "h100": Chip("gpu", hbm_gib=80, bf16_tflops=989, hbm_gbps=3350),
}
TPU_TOPOLOGY_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}  # torus dimensions of each TPU generation
# libtpu's chip configuration where its default is not one device per chip (which jax meshes need)
TPU_CHIP_CONFIGS = {"v4": "megacore"}

# GpuTargetConfigProto (text format) of an H100 SXM 80GB, as XLA reads it from a live device: the CUDA
# plugin compiles for it with no GPU present (no autotuning, so tiles are defaults; memory sizes hold).
GPU_TARGET_CONFIGS: dict[str, str] = {
    "h100": """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user gave it
    chip_name: str
    chips: int  # per slice
    shape: str  # libtpu's "AxBxC" (GPU: "1x1xN")

    @property
    def chip(self) -> Chip:
        return CHIPS[self.chip_name]


def _tpu_shape(chips: int, dims: int) -> str:
    """Cloud TPU's slice shape for `chips` chips (a power of two): from 2x2x1 (2x2) up, the last of the
    smallest sides doubles: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (2x4, 4x4, 4x8, 8x8, ...)."""
    if chips & (chips - 1):
        raise ValueError(f"{chips} chips: TPU slices have a power-of-two chip count")
    sides = [1] * dims
    while math.prod(sides) < chips:
        smallest = min(sides)
        last = max(i for i, side in enumerate(sides) if side == smallest)
        if dims == 3 and sides == [1, 1, 1]:
            last = 1  # 2 chips: 1x2x1
        elif dims == 3 and sides == [1, 2, 1]:
            last = 0  # 4 chips: 2x2x1
        sides[last] *= 2
    return "x".join(map(str, sides))


def parse_topology(name: str) -> Topology:
    """'v5p-32' (TensorCores, as Cloud TPU names slices), 'v5e-16' / 'v5litepod-16' (chips), 'v5p:2x2x4'
    (libtpu's chip shape), 'h100' or 'h100-8' (GPUs)."""
    text = name.strip().lower().replace("v5litepod", "v5e")
    valid = "e.g. v5p-32, v5e-16, v4-8, v5p:2x2x4, h100 or h100-8"
    match = re.fullmatch(r"([a-z0-9]+?)(?:[-:](.+))?", text)
    chip_name = match.group(1) if match else ""
    if chip_name not in CHIPS:
        raise ValueError(f"--topology={name!r}: unknown chip {chip_name!r}; known: {', '.join(CHIPS)} ({valid})")
    chip, rest = CHIPS[chip_name], match.group(2) or "1"
    if ":" in text:
        sides = rest.split("x")
        if chip.platform != "tpu" or not all(s.isdigit() and int(s) > 0 for s in sides):
            raise ValueError(f"--topology={name!r}: a chip shape is AxB or AxBxC for a TPU ({valid})")
        return Topology(name, chip_name, math.prod(map(int, sides)), rest)
    if not rest.isdigit() or int(rest) < 1 or int(rest) % chip.cores_per_chip:
        raise ValueError(f"--topology={name!r}: the count after '-' must be a positive multiple of "
                         f"{chip.cores_per_chip} ({valid})")
    chips = int(rest) // chip.cores_per_chip
    if chip.platform == "gpu":
        return Topology(name, chip_name, chips, f"1x1x{chips}")
    return Topology(name, chip_name, chips, _tpu_shape(chips, TPU_TOPOLOGY_DIMS[chip_name]))


def compile_devices(topology: Topology, num_slices: int = 1) -> list[Any]:
    """Compile-only devices of `num_slices` slices of `topology` (libtpu's or the CUDA plugin's compiler)."""
    from jax.experimental import topologies

    chip = topology.chip
    try:
        if chip.platform == "tpu":
            options: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
            if topology.chip_name in TPU_CHIP_CONFIGS:
                options["chip_config_name"] = TPU_CHIP_CONFIGS[topology.chip_name]
            desc = topologies.get_topology_desc(f"{topology.chip_name}:{topology.shape}", "tpu", **options)
        else:
            if num_slices > 1:
                raise ValueError("--num_slices applies to TPU topologies")
            desc = topologies.get_topology_desc(platform="cuda", target_config=GPU_TARGET_CONFIGS[topology.chip_name],
                                                topology=topology.shape)
    except (RuntimeError, NotImplementedError) as err:
        need = ('libtpu (pip install -r requirements-tpu.txt)' if chip.platform == "tpu"
                else 'the CUDA plugin (pip install "jax[cuda12]==0.10.2")')
        raise ValueError(f"cannot compile for {topology.name}: {str(err).splitlines()[0][:200]}; this needs {need}"
                         ) from None
    return list(desc.devices)


def _abstract(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class CompilerOutOfMemory(RuntimeError):
    """The accelerator's compiler refused the program: it needs more memory per chip than the chip has.
    `buffers` are the largest values of the program before partitioning (global shapes: the compiled,
    per-chip program does not exist)."""

    def __init__(self, message: str, run: Any, seconds: float, buffers: list[tuple[int, str, str]]):
        super().__init__(message)
        self.run, self.seconds, self.buffers = run, seconds, buffers


def _compile(lowered: Any, run: Any, start: float) -> Any:
    """`lowered.compile()`; the compiler's own out-of-memory refusal becomes `CompilerOutOfMemory`."""
    try:
        return lowered.compile()
    except Exception as err:  # noqa: BLE001 - only RESOURCE_EXHAUSTED is turned into a report; the rest re-raises
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        raise CompilerOutOfMemory(" ".join(str(err).split()), run, time.perf_counter() - start,
                                  largest_buffers(lowered.as_text(dialect="hlo"))) from None


def compile_train_step(config: ml_collections.ConfigDict, devices: list[Any] | None = None
                       ) -> tuple[Any, Any, float]:
    """(compiled step, Run, lower + compile seconds) of `lower_train_step`; `CompilerOutOfMemory` where the
    compiler refuses it for memory."""
    start = time.perf_counter()
    lowered, run = lower_train_step(config, devices)
    return _compile(lowered, run, start), run, time.perf_counter() - start


def lower_train_step(config: ml_collections.ConfigDict, devices: list[Any] | None = None) -> tuple[Any, Any]:
    """(lowered step, Run) of the training step `clover_jax.train` runs for `config` on `devices` (default:
    this process's), from abstract state, batch and rng."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from clover_jax import optim, run_setup, train
    from clover_jax import train_step as ts
    from clover_jax.models.clover import dummy_batch

    run = run_setup.setup_run(config, devices)
    # The schedule's lengths change values, not the program: epochs (resolved from the data at start) are
    # stood in for by total_steps, and a warm-up of at least one step (optax logs a line for zero).
    optim_config = ml_collections.ConfigDict(config.optim.to_dict())
    optim_config.warmup_steps = max(1, min(optim_config.warmup_steps, config.total_steps - 1))
    tx, schedule = optim.make_optimizer(optim_config, config.total_steps)
    params = nn.unbox(run.abstract_params)
    state_sh = ts.train_state_shardings(tx, params, run.param_shardings, run.mesh)
    step = ts.make_train_step(tx=tx, state_shardings=state_sh, batch_sharding=run.batch_sharding, mesh=run.mesh,
                              schedule=schedule, rules=run_setup.logical_rules(config),
                              **train._gradient_fn(run, config))
    state = jax.eval_shape(
        lambda p: ts.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)), params)
    batch = jax.eval_shape(lambda: dummy_batch(run.model_config, config.data.batch_size, config.data.text_length))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=run.batch_sharding), batch)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=jax.sharding.NamedSharding(
        run.mesh, jax.sharding.PartitionSpec()))
    return step.lower(_abstract(state, state_sh), batch, rng), run


def compile_embedding_step(config: ml_collections.ConfigDict, devices: list[Any] | None = None
                           ) -> tuple[Any, Any, float]:
    """(compiled, Run, seconds) of the evaluators' video-embedding pass at `eval.batch_size` clips of
    `eval.num_frames` x `eval.image_size`² (the retrieval evaluation's heaviest program)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from clover_jax import run_setup, tasks

    run = run_setup.setup_run(config, devices)
    params = _abstract(nn.unbox(run.abstract_params), run.param_shardings)
    e = config.eval
    video = jax.ShapeDtypeStruct((e.batch_size, e.num_frames, e.image_size, e.image_size, 3), jnp.float32,
                                 sharding=run.batch_sharding)
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    fn = jax.jit(tasks.video_embedding_fn(run.model_config), out_shardings=replicated)
    start = time.perf_counter()
    compiled = _compile(fn.lower(params, video), run, start)
    return compiled, run, time.perf_counter() - start


# ---- reading the compiled program ---------------------------------------------------------------------

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z\-]+)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def shape_bytes(shape_text: str) -> int:
    """Bytes of an HLO result shape, e.g. 'f32[1024,768]{1,0}' or a tuple '(bf16[8,4], f32[])'."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _op_name(rest: str) -> str:
    found = re.search(r'op_name="([^"]+)"', rest)
    return found.group(1) if found else ""


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
    """{kind: {count, bytes, largest: [(bytes, op_name)]}} of the collectives in a compiled module's text
    (async pairs counted once, at their -start)."""
    found: dict[str, dict[str, Any]] = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        opcode = m.group(3).removesuffix("-start")
        if opcode not in COLLECTIVES or m.group(3).endswith("-done"):
            continue
        size = shape_bytes(m.group(2))
        if m.group(3).endswith("-start") and opcode in ("all-gather", "collective-permute"):
            size //= 2  # the -start tuple holds the operand and the result
        entry = found.setdefault(opcode, {"count": 0, "bytes": 0, "largest": []})
        entry["count"] += 1
        entry["bytes"] += size
        entry["largest"].append((size, _op_name(m.group(4))))
    for entry in found.values():
        entry["largest"] = sorted(entry["largest"], reverse=True)[:3]
    return found


def largest_buffers(hlo_text: str, k: int = 5) -> list[tuple[int, str, str]]:
    """The k largest instruction results of the program: (bytes, shape, op_name or instruction name)."""
    rows = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m and m.group(3) not in ("parameter", "tuple", "get-tuple-element", "bitcast"):
            rows.append((shape_bytes(m.group(2)), m.group(2).split("{")[0], _op_name(m.group(4)) or m.group(1)))
    return sorted(rows, reverse=True)[:k]


def cost_of(compiled: Any) -> dict[str, float]:
    """`compiled.cost_analysis()` as one dict. The CUDA plugin's compile-only client has none (UNIMPLEMENTED):
    there XLA's HLO cost analysis of the optimised module is run through the CPU backend (a private jax API;
    {} if that fails too)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - the compile-only CUDA client raises UNIMPLEMENTED
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    if cost:
        return dict(cost)
    try:
        from jax._src import xla_bridge
        from jax._src.lib import _jax

        module = compiled.runtime_executable().hlo_modules()[0]
        return dict(_jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))
    except Exception:  # noqa: BLE001 - private API: report no cost rather than fail the compile report
        return {}
