"""Clip groups: the Swin encoder's batch split into interleaved groups of clips that run as separate ops.

Every Swin op is per clip, so groups change no value. They change the schedule on XLA:CPU: it runs each
batched dot of the window attention and of the token-chunked kernel gradients on one thread, and runs
independent ops concurrently, so two groups put both cores of the `benchmarks/` host to work where one
batch left one idle. Measured there (tcmalloc, alternating runs, 2 threads): a first-stage block of the
`tiny` step at 8×224² (16 clips) forward + backward 500 -> 453 ms; the `tiny` step 2.31 / 2.33 / 2.34 s in
one group against 2.23 / 2.22 / 2.28 s in two groups at every stage, and the same with two groups in the
first stage only (2.27 / 2.27 / 2.36 against 2.25 / 2.31 s); the `small` step (8×112²) 3.88 / 3.85 s in one
group, 3.80 / 3.77 s with two in the first stage, 3.89 / 3.80 s with two in every stage. So "auto" splits
the first stage only.

Group g holds rows g, g + G, g + 2G, ...: a batch sharded in contiguous blocks over devices keeps every
group's rows on the devices that held them whenever each device's share divides by G.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

AUTO = 0  # Swin3DConfig.clip_groups value that picks per stage by backend (resolve_clip_groups)
CPU_STAGE_GROUPS = (2,)  # groups "auto" gives each stage on a single CPU device; later stages: 1


# Chunks of whole clips (Dense kernel gradients and attention of the late Swin stages on CPU): at least this many,
# two per core of the `benchmarks/` host, whose XLA:CPU runs independent chunks concurrently.
MIN_CLIP_CHUNKS = 4


def clip_chunk_counts(clips: int) -> list[int]:
    """Counts m >= MIN_CLIP_CHUNKS of equal chunks of whole clips a batch of `clips` splits into, ascending; each a
    multiple of the device count, so a batch sharded over devices splits evenly."""
    devices = jax.device_count()
    return [m for m in range(MIN_CLIP_CHUNKS, clips + 1) if clips % m == 0 and m % devices == 0]


def validate_clip_groups(groups: int) -> None:
    """Raises ValueError unless `groups` is an int >= 0."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 0:
        raise ValueError(f"clip_groups must be an int >= 0 (0 = auto: {CPU_STAGE_GROUPS[0]} groups in the first "
                         f"stage on a single CPU device, else 1), got {groups!r}")


def resolve_clip_groups(groups: int, batch: int, num_stages: int, backend: str | None = None,
                        devices: int | None = None) -> tuple[int, ...]:
    """Groups each of `num_stages` stages runs a batch of `batch` clip rows as: `groups` in every stage, or for
    AUTO CPU_STAGE_GROUPS on a single CPU device and 1 otherwise (a batch sharded over devices may not split
    evenly per device); 1 wherever `batch` does not divide by it."""
    validate_clip_groups(groups)
    if groups != AUTO:
        per_stage = (groups,) * num_stages
    elif (backend or jax.default_backend()) == "cpu" and (jax.device_count() if devices is None else devices) == 1:
        per_stage = (CPU_STAGE_GROUPS + (1,) * num_stages)[:num_stages]
    else:
        per_stage = (1,) * num_stages
    return tuple(g if batch % g == 0 else 1 for g in per_stage)


def split_clip_groups(x: jax.Array, groups: int) -> list[jax.Array]:
    """(B, ...) -> `groups` arrays (B / groups, ...); group g holds rows g, g + groups, ..."""
    if groups == 1:
        return [x]
    rows = x.reshape(x.shape[0] // groups, groups, *x.shape[1:])
    return [rows[:, g] for g in range(groups)]


def join_clip_groups(xs: list[jax.Array]) -> jax.Array:
    """Inverse of `split_clip_groups`."""
    if len(xs) == 1:
        return xs[0]
    return jnp.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:])
