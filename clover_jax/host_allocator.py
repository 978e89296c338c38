"""Host malloc for the entry points: re-executes the process under tcmalloc so XLA's per-step CPU buffers stay
mapped instead of being unmapped and page-faulted in again every step.

XLA's CPU runtime allocates a step's temporaries (GiBs at 8x224²) afresh on every execution. glibc serves
blocks above its mmap threshold (at most 32 MiB) with mmap and returns them with munmap, so every step
faults the whole arena in again page by page: about 1.0 M minor faults per `tiny` step at 8x224², batch 8,
which took 3 s of kernel time per step on the 2-core machine of `benchmarks/`. tcmalloc keeps freed spans
mapped, so from the second step on a step faults almost nothing (see README, Performance).

`CLOVER_JAX_ALLOCATOR` chooses: `auto` (default; tcmalloc when the dynamic loader finds it, e.g. Debian's
`libtcmalloc-minimal4`, else the system malloc), `tcmalloc` (required: fails when it is missing),
`glibc_tuned` (glibc with mmap off, no trimming and one arena: no library needed; it helped the large
step but slowed small test workloads here, hence not the default) or `system` (leave the process as is).
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from typing import Mapping

ENV_CHOICE = "CLOVER_JAX_ALLOCATOR"
_ENV_APPLIED = "CLOVER_JAX_ALLOCATOR_APPLIED"  # set in the re-executed process: never re-execute twice
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
TCMALLOC_SETTINGS = {
    "TCMALLOC_RELEASE_RATE": "0",  # never hand freed spans back to the OS (that is what re-faults them)
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 44),  # no "large alloc" line per GiB-sized buffer
}
GLIBC_TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
CHOICES = ("auto", "tcmalloc", "glibc_tuned", "system")


class AllocatorError(ValueError):
    """A CLOVER_JAX_ALLOCATOR value that cannot be honoured (user-fixable)."""


def find_tcmalloc() -> str | None:
    """The tcmalloc shared library the dynamic loader resolves (a soname such as libtcmalloc_minimal.so.4)."""
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def allocator_environment(choice: str, environ: Mapping[str, str], tcmalloc: str | None
                          ) -> tuple[str, dict[str, str]]:
    """(description, environment updates) for `choice`; no updates means: keep this process as it is."""
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV_CHOICE}={choice!r}; valid: {', '.join(CHOICES)}")
    preloaded = environ.get("LD_PRELOAD", "")
    if choice == "system" or environ.get(_ENV_APPLIED) or "malloc" in preloaded:
        return "as started", {}
    if choice == "glibc_tuned":
        return "glibc, mmap off", {"GLIBC_TUNABLES": GLIBC_TUNED}
    if tcmalloc is None:
        if choice == "tcmalloc":
            raise AllocatorError(f"{ENV_CHOICE}=tcmalloc but no libtcmalloc was found; install one (Debian/Ubuntu: "
                                 "apt-get install libtcmalloc-minimal4) or set it to auto")
        return "system malloc (no tcmalloc found)", {}
    return f"tcmalloc ({tcmalloc})", {"LD_PRELOAD": " ".join(filter(None, (tcmalloc, preloaded))), **TCMALLOC_SETTINGS}


def reexec_with_tuned_allocator() -> None:
    """Re-executes this command line under the chosen allocator (Linux only; no-op once applied)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        description, updates = allocator_environment(os.environ.get(ENV_CHOICE, "auto"), os.environ, find_tcmalloc())
    except AllocatorError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not updates:
        return
    env = {**os.environ, **updates, _ENV_APPLIED: description}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)


def applied_allocator() -> str:
    """What `reexec_with_tuned_allocator` chose for this process ("" when it did not re-execute)."""
    return os.environ.get(_ENV_APPLIED, "")
