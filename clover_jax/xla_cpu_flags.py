"""XLA:CPU compiler flags the entry points and tests start with (set in XLA_FLAGS before jax starts).

`--xla_cpu_experimental_ynn_fusion_type=+reduce,-individual_dot`: XLA (jaxlib 0.10) hands dots fused with
their element-wise neighbours to YNNPACK; adding reductions (softmax and LayerNorm sums, bias gradients) and
leaving lone dots to XLA's own emitter took the `tiny` step at 8x224², batch 8, from 2.5 s to 2.1–2.3 s on
the 2-core machine of `benchmarks/` (README, Performance). The flags only touch the CPU backend.

On a host with no accelerator device node, `add_default_flags` also sets JAX_PLATFORMS=cpu (unless set): jax
then never probes the TPU or CUDA plugins, so a CPU run stays quiet and fast with libtpu installed (for AOT
compiles, `clover_jax.compile`).

A flag already named in XLA_FLAGS is left as the user gave it: `--xla_cpu_experimental_ynn_fusion_type=-reduce`
restores XLA's own choice.
"""
from __future__ import annotations

import glob
import importlib.metadata
import os
from typing import MutableMapping

DEFAULT_FLAGS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "+reduce,-individual_dot"}
MIN_JAXLIB = (0, 10)  # first jaxlib measured with these flags; older ones may not know them (XLA aborts)


def _jaxlib_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ()


def with_default_flags(xla_flags: str, jaxlib_version: tuple[int, ...] | None = None) -> str:
    """`xla_flags` plus every DEFAULT_FLAGS entry it does not already set (unchanged for an older jaxlib)."""
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if version < MIN_JAXLIB:
        return xla_flags
    given = {part.lstrip("-").split("=", 1)[0] for part in xla_flags.split()}
    extra = [f"--{name}={value}" for name, value in DEFAULT_FLAGS.items() if name not in given]
    return " ".join([xla_flags.strip(), *extra]).strip()


# Device nodes of the accelerators jax can drive: TPU chips (accel, or vfio on newer generations), NVIDIA and AMD GPUs.
ACCELERATOR_DEVICE_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def host_has_accelerator() -> bool:
    """Whether any ACCELERATOR_DEVICE_NODES entry exists on this host."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_NODES)


def add_default_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Writes `with_default_flags` into environ["XLA_FLAGS"], and JAX_PLATFORMS=cpu on a host without an
    accelerator (a value already set wins); call before jax starts."""
    environ["XLA_FLAGS"] = with_default_flags(environ.get("XLA_FLAGS", ""))
    if "JAX_PLATFORMS" not in environ and not host_has_accelerator():
        environ["JAX_PLATFORMS"] = "cpu"
