"""The execution policy: which implementation each backend-dependent op uses, chosen once from the mesh.

`models/` writes the math once and calls `kernels.ops` where an op has implementations that differ by
backend (window attention, LayerNorm sums, Dense kernel gradients over video tokens, dropout masks, clip
groups). Which one runs is an `ExecutionPolicy`: `policy_for_mesh` picks it from the platform of the
mesh's devices (not the process's default backend, so a step traced on a CPU host for a TPU mesh gets
the TPU choices), with any `config.kernels` override, and the entry points print `describe(policy)`.
The policy travels in `CloverConfig.execution`; `Clover` traces its methods under `use(policy)`.

PLATFORM_KERNELS is the one table of per-platform defaults; every other list derives from it and from
IMPLEMENTATIONS. The CPU kernels' host-tuned sizes are `CpuTuning` fields (config `kernels.cpu`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Mapping

# Every choice the policy makes, and the implementations each choice may name. "xla" is the plain
# formulation of `models/`, left to the compiler.
IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "window_attention": ("einsum", "fused", "chunked", "dot_product"),
    "layer_norm": ("xla", "matvec_sums"),
    "dense": ("xla", "token_chunked_grad"),
    "dropout": ("xla", "threefry_unrolled"),
}

# Per platform (jax Device.platform): the implementation of each choice. The CPU column is what the
# `benchmarks/` host measured fastest; "fused" keeps no (N, N) tensor past its block (TPU); cuDNN's fused
# attention serves "dot_product" on GPU.
PLATFORM_KERNELS: dict[str, dict[str, str]] = {
    "cpu": dict(window_attention="chunked", layer_norm="matvec_sums", dense="token_chunked_grad",
                dropout="threefry_unrolled"),
    "gpu": dict(window_attention="dot_product", layer_norm="xla", dense="xla", dropout="xla"),
    "tpu": dict(window_attention="fused", layer_norm="xla", dense="xla", dropout="xla"),
}
# A policy for no mesh at all (a model built outside an entry point): the plain math of `models/`.
REFERENCE_KERNELS = dict(window_attention="einsum", layer_norm="xla", dense="xla", dropout="xla")

AUTO = "auto"
MAX_STAGES = 8  # a `kernels.clip_groups=N` override applies N to this many stages (more than any Swin has)


@dataclasses.dataclass(frozen=True)
class CpuTuning:
    """Sizes of the CPU kernels, tuned on the 2-core host of `benchmarks/` (see each kernel's module)."""

    chunk_rows: int = 64  # (window, head) pairs per chunk of `chunked` attention
    max_unrolled_chunks: int = 16  # up to this many attention chunks run as independent ops, not a loop ...
    min_unrolled_scores: int = 1 << 18  # ... when each holds at least this many float32 scores
    rows_per_chunk: int = 1024  # tokens per chunk of the token-chunked Dense kernel gradient
    min_rows_per_width: int = 2  # chunk inside a clip only with this many tokens per channel of the wider side
    max_partial_bytes: int = 64 << 20  # larger partial sums of the kernel gradient fall back to one contraction
    min_clip_chunks: int = 4  # chunks of whole clips (late stages): at least this many
    first_stage_clip_groups: int = 2  # clip groups of the Swin's first stage on a single CPU device

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if "unrolled" in field.name
                                                                                  else 1):
                raise ValueError(f"kernels.cpu.{field.name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """One implementation per backend-dependent op, for `devices` devices of `platform`. Hashable."""

    platform: str = "reference"
    devices: int = 1
    window_attention: str = REFERENCE_KERNELS["window_attention"]
    layer_norm: str = REFERENCE_KERNELS["layer_norm"]
    dense: str = REFERENCE_KERNELS["dense"]
    dropout: str = REFERENCE_KERNELS["dropout"]
    clip_groups: tuple[int, ...] = ()  # groups of clips per Swin stage (missing stages: 1)
    batch_shards: int = 1  # blocks the batch is sharded in (the mesh's batch axes): a per-clip scan steps over each
    cpu: CpuTuning = CpuTuning()

    def __post_init__(self) -> None:
        for choice, valid in IMPLEMENTATIONS.items():
            name = getattr(self, choice)
            if name not in valid:
                raise ValueError(f"kernels.{choice}={name!r}; valid: {AUTO!r}, {', '.join(map(repr, valid))}")
        object.__setattr__(self, "clip_groups", tuple(self.clip_groups))
        if any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in self.clip_groups):
            raise ValueError(f"clip groups must be ints >= 1, got {self.clip_groups}")

    def stage_clip_groups(self, stage: int, rows: int) -> int:
        """Groups of clips Swin stage `stage` runs `rows` rows as (1 where `rows` does not divide)."""
        groups = self.clip_groups[stage] if stage < len(self.clip_groups) else 1
        return groups if rows % groups == 0 else 1


REFERENCE = ExecutionPolicy()


def default_kernels_config() -> dict[str, Any]:
    """`config.kernels` with every choice on "auto" and today's CPU sizes (configs start from this)."""
    return dict(**{choice: AUTO for choice in IMPLEMENTATIONS}, clip_groups=0,
                cpu=dataclasses.asdict(CpuTuning()))


def policy_for(platform: str, devices: int, kernels: Mapping[str, Any] | None = None,
               batch_shards: int = 1) -> ExecutionPolicy:
    """The policy for `devices` devices of `platform` ("cpu", "gpu", "tpu"): PLATFORM_KERNELS's row, with every
    non-"auto" entry of `kernels` (a `config.kernels` mapping) in its place. `kernels.clip_groups`: 0 = auto
    (the first Swin stage in `cpu.first_stage_clip_groups` groups on a single CPU device, else none), N > 0 =
    N groups in every stage."""
    kernels = dict(kernels or {})
    unknown = sorted(set(kernels) - {*IMPLEMENTATIONS, "clip_groups", "cpu"})
    if unknown:
        raise ValueError(f"unknown config.kernels keys {unknown}; valid: "
                         f"{sorted({*IMPLEMENTATIONS, 'clip_groups', 'cpu'})}")
    cpu_fields = {f.name for f in dataclasses.fields(CpuTuning)}
    cpu_given = dict(kernels.get("cpu") or {})
    if set(cpu_given) - cpu_fields:
        raise ValueError(f"unknown config.kernels.cpu keys {sorted(set(cpu_given) - cpu_fields)}; "
                         f"valid: {sorted(cpu_fields)}")
    tuning = CpuTuning(**cpu_given)
    chosen = dict(PLATFORM_KERNELS.get(platform, REFERENCE_KERNELS))
    chosen.update({c: kernels[c] for c in IMPLEMENTATIONS if kernels.get(c, AUTO) != AUTO})
    groups = kernels.get("clip_groups", 0)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
        raise ValueError(f"kernels.clip_groups must be an int >= 0 (0 = auto), got {groups!r}")
    if groups:
        stage_groups: tuple[int, ...] = (groups,) * MAX_STAGES
    elif platform == "cpu" and devices == 1:
        stage_groups = (tuning.first_stage_clip_groups,)
    else:
        stage_groups = ()
    return ExecutionPolicy(platform=platform, devices=devices, clip_groups=stage_groups, batch_shards=batch_shards,
                           cpu=tuning, **chosen)


def mesh_platform(mesh: Any) -> str:
    """The platform of a mesh's devices (all of one platform, as jax requires)."""
    return mesh.devices.flat[0].platform


def policy_for_mesh(mesh: Any, kernels: Mapping[str, Any] | None = None, batch_shards: int = 1) -> ExecutionPolicy:
    """`policy_for` the platform and device count of `mesh` (whose batch axes split the batch `batch_shards` ways)."""
    return policy_for(mesh_platform(mesh), int(mesh.devices.size), kernels, batch_shards)


def describe(policy: ExecutionPolicy) -> str:
    """One line for start-up: platform, devices and each choice (with the CPU sizes where they apply)."""
    parts = [f"{choice} {getattr(policy, choice)}" for choice in IMPLEMENTATIONS]
    groups = ",".join(map(str, policy.clip_groups[:4])) if policy.clip_groups else "none"
    parts.append(f"clip groups {groups}")
    uses_cpu_sizes = {policy.window_attention, policy.dense} & {"chunked", "token_chunked_grad"}
    if uses_cpu_sizes:
        cpu = policy.cpu
        parts.append(f"cpu sizes chunk_rows={cpu.chunk_rows} rows_per_chunk={cpu.rows_per_chunk} "
                     f"min_clip_chunks={cpu.min_clip_chunks} max_unrolled_chunks={cpu.max_unrolled_chunks}")
    s = "s" if policy.devices != 1 else ""
    return f"execution policy for {policy.devices} {policy.platform} device{s}: " + "; ".join(parts)


_ACTIVE: contextvars.ContextVar[ExecutionPolicy] = contextvars.ContextVar("clover_jax_execution", default=REFERENCE)


@contextlib.contextmanager
def use(policy: ExecutionPolicy) -> Iterator[ExecutionPolicy]:
    """Ops traced inside use `policy` (like `nn.logical_axis_rules`: it holds while a function is traced)."""
    token = _ACTIVE.set(policy)
    try:
        yield policy
    finally:
        _ACTIVE.reset(token)


def active() -> ExecutionPolicy:
    """The policy ops are being traced under (REFERENCE outside any `use`)."""
    return _ACTIVE.get()
