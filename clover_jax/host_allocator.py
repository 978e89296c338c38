"""Host malloc for the entry points: re-executes the process under tcmalloc or mimalloc so XLA's per-step CPU
buffers stay mapped instead of being unmapped and page-faulted in again every step.

XLA's CPU runtime allocates a step's temporaries (GiBs at 8x224²) afresh on every execution. glibc serves
blocks above its mmap threshold (at most 32 MiB) with mmap and returns them with munmap, so every step
faults the whole arena in again page by page: about 1.0 M minor faults per `tiny` step at 8x224², batch 8,
which took 3 s of kernel time per step on the 2-core machine of `benchmarks/`. tcmalloc keeps freed spans
mapped, and so does mimalloc with purging off, so from the second step on a step faults almost nothing (see
README, Performance).

`CLOVER_JAX_ALLOCATOR` chooses: `auto` (default: tcmalloc when the dynamic loader finds it, e.g. Debian's
`libtcmalloc-minimal4`; else the libmimalloc.so of the pip package `cmeel-mimalloc` (a pinned requirement),
located through its installed file list; else the system malloc), `tcmalloc` or `mimalloc` (that library,
failing when it is missing), `glibc_tuned` (glibc with mmap off, no trimming and one arena: no library needed;
it helped the large step but slowed small test workloads here, hence not in `auto`) or `system` (leave the
process as is). `CLOVER_JAX_NO_TCMALLOC=1` hides tcmalloc from `find_tcmalloc`, so `auto` acts as on a machine
without it (what a fresh pip install gets; benchmarks/compare_pytorch.sh uses it).
"""
from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import re
import sys
from typing import Mapping

ENV_CHOICE = "CLOVER_JAX_ALLOCATOR"
ENV_NO_TCMALLOC = "CLOVER_JAX_NO_TCMALLOC"  # "1": find_tcmalloc finds nothing (a machine without tcmalloc)
_ENV_APPLIED = "CLOVER_JAX_ALLOCATOR_APPLIED"  # set in the re-executed process: never re-execute twice
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
TCMALLOC_SETTINGS = {
    "TCMALLOC_RELEASE_RATE": "0",  # never hand freed spans back to the OS (that is what re-faults them)
    "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 44),  # no "large alloc" line per GiB-sized buffer
}
MIMALLOC_DISTRIBUTION = "cmeel-mimalloc"  # ships cmeel.prefix/lib/libmimalloc.so*
MIMALLOC_SETTINGS = {
    "MIMALLOC_PURGE_DELAY": "-1",  # never purge (decommit) freed arena memory: the default, 1 s, re-faults it
}
GLIBC_TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
# choice -> what it does (the error message for a bad value lists the keys)
CHOICES = {
    "auto": "tcmalloc if found, else mimalloc if installed, else the system malloc",
    "tcmalloc": "preload libtcmalloc (required)",
    "mimalloc": f"preload the libmimalloc of pip's {MIMALLOC_DISTRIBUTION} (required)",
    "glibc_tuned": "glibc with mmap off, no trimming, one arena",
    "system": "leave the process as started",
}
_SETTINGS = {"tcmalloc": TCMALLOC_SETTINGS, "mimalloc": MIMALLOC_SETTINGS}
_INSTALL_HINTS = {
    "tcmalloc": "install one (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)",
    "mimalloc": f"pip install -r requirements.txt (it pins {MIMALLOC_DISTRIBUTION})",
}


class AllocatorError(ValueError):
    """A CLOVER_JAX_ALLOCATOR value that cannot be honoured (user-fixable)."""


def find_tcmalloc(environ: Mapping[str, str] = os.environ) -> str | None:
    """The tcmalloc shared library the dynamic loader resolves (a soname such as libtcmalloc_minimal.so.4);
    None when there is none or CLOVER_JAX_NO_TCMALLOC=1."""
    if environ.get(ENV_NO_TCMALLOC) == "1":
        return None
    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def find_mimalloc() -> str | None:
    """Absolute path of the libmimalloc.so that pip's cmeel-mimalloc installed (from its file list), or None."""
    try:
        dist = importlib.metadata.distribution(MIMALLOC_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in sorted(dist.files or (), key=lambda f: len(f.name)):
        if re.fullmatch(r"libmimalloc\.so(\.\d+)*", file.name):
            path = os.path.abspath(str(dist.locate_file(file)))
            if os.path.isfile(path):
                return path
    return None


def _preload(name: str, lib: str, preloaded: str) -> tuple[str, dict[str, str]]:
    return f"{name} ({lib})", {"LD_PRELOAD": " ".join(filter(None, (lib, preloaded))), **_SETTINGS[name]}


def allocator_environment(choice: str, environ: Mapping[str, str], tcmalloc: str | None,
                          mimalloc: str | None = None) -> tuple[str, dict[str, str]]:
    """(description, environment updates) for `choice`, given the tcmalloc / mimalloc libraries found (None:
    missing); no updates means: keep this process as it is."""
    if choice not in CHOICES:
        raise AllocatorError(f"{ENV_CHOICE}={choice!r}; valid: {', '.join(CHOICES)}")
    preloaded = environ.get("LD_PRELOAD", "")
    if choice == "system" or environ.get(_ENV_APPLIED) or "malloc" in preloaded:
        return "as started", {}
    if choice == "glibc_tuned":
        return "glibc, mmap off", {"GLIBC_TUNABLES": GLIBC_TUNED}
    libraries = {"tcmalloc": tcmalloc, "mimalloc": mimalloc}
    if choice != "auto":
        if libraries[choice] is None:
            raise AllocatorError(f"{ENV_CHOICE}={choice} but no lib{choice} was found; "
                                 f"{_INSTALL_HINTS[choice]} or set it to auto")
        return _preload(choice, libraries[choice], preloaded)
    for name, lib in libraries.items():  # auto: the first one found
        if lib is not None:
            return _preload(name, lib, preloaded)
    return "system malloc (no tcmalloc or mimalloc found)", {}


def runs_on_cpu(environ: Mapping[str, str]) -> bool:
    """Whether JAX_PLATFORMS names the CPU first."""
    return environ.get("JAX_PLATFORMS", "").split(",")[0].strip() == "cpu"


def reexec_with_tuned_allocator() -> None:
    """Re-executes this command line under the chosen allocator (Linux only; no-op once applied). Only for a
    process whose jax runs on the CPU (`JAX_PLATFORMS` starting with cpu, which `xla_cpu_flags.add_default_flags`
    sets on a host without accelerators): an accelerator's step buffers are not host memory."""
    if not sys.platform.startswith("linux") or not runs_on_cpu(os.environ):
        return
    choice = os.environ.get(ENV_CHOICE, "auto")
    try:
        tcmalloc = find_tcmalloc() if choice in ("auto", "tcmalloc") else None
        mimalloc = find_mimalloc() if choice == "mimalloc" or (choice == "auto" and tcmalloc is None) else None
        description, updates = allocator_environment(choice, os.environ, tcmalloc, mimalloc)
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
