"""The entry points' malloc choice (clover_jax/host_allocator.py): environments, the re-exec, and its effect."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clover_jax import host_allocator as ha

LIB = "libtcmalloc_minimal.so.4"


def test_tcmalloc_is_preloaded_with_its_settings_in_front_of_an_existing_preload():
    name, env = ha.allocator_environment("auto", {"LD_PRELOAD": "libfoo.so"}, LIB)
    assert name == f"tcmalloc ({LIB})"
    assert env["LD_PRELOAD"] == f"{LIB} libfoo.so"
    assert env["TCMALLOC_RELEASE_RATE"] == "0"
    assert ha.allocator_environment("tcmalloc", {}, LIB)[1]["LD_PRELOAD"] == LIB


@pytest.mark.parametrize("choice, environ, lib", [
    ("system", {}, LIB),  # asked to leave the process alone
    ("auto", {}, None),  # nothing to preload
    ("auto", {"CLOVER_JAX_ALLOCATOR_APPLIED": "tcmalloc"}, LIB),  # already re-executed once
    ("tcmalloc", {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}, LIB),  # the user preloaded a malloc already
])
def test_no_restart_when_there_is_nothing_to_change(choice, environ, lib):
    assert ha.allocator_environment(choice, environ, lib)[1] == {}


def test_glibc_tuned_needs_no_library():
    name, env = ha.allocator_environment("glibc_tuned", {}, None)
    assert env == {"GLIBC_TUNABLES": ha.GLIBC_TUNED} and "glibc" in name


def test_user_mistakes_name_the_fix():
    with pytest.raises(ha.AllocatorError, match="valid: auto, tcmalloc, glibc_tuned, system"):
        ha.allocator_environment("jemalloc", {}, LIB)
    with pytest.raises(ha.AllocatorError, match="apt-get install libtcmalloc-minimal4"):
        ha.allocator_environment("tcmalloc", {}, None)


_PROBE = """
import json, os, resource, sys
from clover_jax.host_allocator import applied_allocator, reexec_with_tuned_allocator
reexec_with_tuned_allocator()
import jax, jax.numpy as jnp
# 2 x 64 MiB temporaries per call (two 4096^2 products), above glibc's largest mmap threshold (32 MiB)
f = jax.jit(lambda x, w: jnp.tanh(jnp.tanh(x @ w) @ w.T @ w).sum())
x, w = jnp.ones((4096, 64)) / 64, jnp.ones((64, 4096)) / 4096
f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
print(json.dumps({"applied": applied_allocator(), "tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults}))
"""


def _probe(choice: str) -> dict:
    env = {**os.environ, "CLOVER_JAX_ALLOCATOR": choice, "JAX_PLATFORMS": "cpu"}
    env.pop("CLOVER_JAX_ALLOCATOR_APPLIED", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec and GLIBC_TUNABLES are Linux-only")
def test_restart_keeps_large_buffers_mapped():
    """The process re-executes itself once under the chosen malloc; under the system malloc every call
    faults its 128 MiB of temporaries in again, re-executed with mmap off it faults none."""
    plain, tuned = _probe("system"), _probe("glibc_tuned")
    assert plain["applied"] == "" and plain["tunables"] == ""
    assert tuned["applied"] == "glibc, mmap off" and tuned["tunables"] == ha.GLIBC_TUNED
    print(f"\nminor faults per call: system malloc {plain['faults']:.0f}, glibc_tuned {tuned['faults']:.0f}")
    assert plain["faults"] > 10_000
    assert tuned["faults"] < 0.1 * plain["faults"]


def test_a_bad_choice_stops_the_entry_point_in_one_line():
    env = {**os.environ, "CLOVER_JAX_ALLOCATOR": "jemalloc"}
    code = "from clover_jax.host_allocator import reexec_with_tuned_allocator as r; r()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: CLOVER_JAX_ALLOCATOR='jemalloc'; valid: auto, tcmalloc, "
                                               "glibc_tuned, system"]
