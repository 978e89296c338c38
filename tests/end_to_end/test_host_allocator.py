"""The entry points' malloc choice (clover_jax/host_allocator.py): environments, the re-exec, and its effect."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from clover_jax import host_allocator as ha

LIB = "libtcmalloc_minimal.so.4"
MI = "/venv/site-packages/cmeel.prefix/lib/libmimalloc.so"


def test_tcmalloc_is_preloaded_with_its_settings_in_front_of_an_existing_preload():
    name, env = ha.allocator_environment("auto", {"LD_PRELOAD": "libfoo.so"}, LIB, MI)
    assert name == f"tcmalloc ({LIB})"
    assert env["LD_PRELOAD"] == f"{LIB} libfoo.so"
    assert env["TCMALLOC_RELEASE_RATE"] == "0"
    assert ha.allocator_environment("tcmalloc", {}, LIB)[1]["LD_PRELOAD"] == LIB


def test_without_tcmalloc_auto_preloads_the_pip_mimalloc_with_purging_off():
    name, env = ha.allocator_environment("auto", {"LD_PRELOAD": "libfoo.so"}, None, MI)
    assert name == f"mimalloc ({MI})"
    assert env == {"LD_PRELOAD": f"{MI} libfoo.so", "MIMALLOC_PURGE_DELAY": "-1"}
    assert ha.allocator_environment("mimalloc", {}, LIB, MI)[1]["LD_PRELOAD"] == MI  # asked for by name


@pytest.mark.parametrize("choice, environ, lib, mi", [
    ("system", {}, LIB, MI),  # asked to leave the process alone
    ("auto", {}, None, None),  # nothing to preload
    ("auto", {"CLOVER_JAX_ALLOCATOR_APPLIED": "tcmalloc"}, LIB, MI),  # already re-executed once
    ("tcmalloc", {"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}, LIB, MI),  # the user preloaded a malloc already
    ("auto", {"LD_PRELOAD": MI}, None, MI),
])
def test_no_restart_when_there_is_nothing_to_change(choice, environ, lib, mi):
    assert ha.allocator_environment(choice, environ, lib, mi)[1] == {}


def test_glibc_tuned_needs_no_library():
    name, env = ha.allocator_environment("glibc_tuned", {}, None, None)
    assert env == {"GLIBC_TUNABLES": ha.GLIBC_TUNED} and "glibc" in name


def test_user_mistakes_name_the_fix():
    with pytest.raises(ha.AllocatorError, match="valid: auto, tcmalloc, mimalloc, glibc_tuned, system"):
        ha.allocator_environment("jemalloc", {}, LIB, MI)
    with pytest.raises(ha.AllocatorError, match="apt-get install libtcmalloc-minimal4"):
        ha.allocator_environment("tcmalloc", {}, None, MI)
    with pytest.raises(ha.AllocatorError, match="pip install -r requirements.txt"):
        ha.allocator_environment("mimalloc", {}, LIB, None)


def test_no_tcmalloc_switch_hides_it(monkeypatch):
    monkeypatch.setattr(ha.ctypes.util, "find_library", lambda name: f"lib{name}.so.4")
    assert ha.find_tcmalloc({}) == "libtcmalloc_minimal.so.4"
    assert ha.find_tcmalloc({"CLOVER_JAX_NO_TCMALLOC": "1"}) is None


def _need_mimalloc() -> None:
    """Skips without the pinned cmeel-mimalloc (a partial install), but fails when CI is set: .ci/run installs it."""
    if ha.find_mimalloc() is None:
        msg = f"{ha.MIMALLOC_DISTRIBUTION} is not installed (pip install -r requirements.txt)"
        if os.environ.get("CI"):
            pytest.fail(msg + " — and CI is set, where requirements.txt is installed")
        pytest.skip(msg)


def test_mimalloc_is_the_library_file_of_the_installed_distribution(monkeypatch):
    _need_mimalloc()
    files = importlib.metadata.distribution(ha.MIMALLOC_DISTRIBUTION).files
    path = ha.find_mimalloc()
    assert path is not None and os.path.isabs(path) and os.path.isfile(path)
    assert os.path.basename(path).startswith("libmimalloc.so")
    assert any(path.endswith(str(f)) for f in files)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(ha.importlib.metadata, "distribution", missing)
    assert ha.find_mimalloc() is None


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


def _probe(choice: str, **extra: str) -> dict:
    env = {**os.environ, "CLOVER_JAX_ALLOCATOR": choice, "JAX_PLATFORMS": "cpu", **extra}
    env.pop("CLOVER_JAX_ALLOCATOR_APPLIED", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the re-exec and LD_PRELOAD are Linux-only")
def test_a_fresh_install_restarts_under_the_pip_mimalloc_and_keeps_large_buffers_mapped():
    """No tcmalloc on the machine (CLOVER_JAX_NO_TCMALLOC=1): `auto` re-executes under cmeel-mimalloc's
    library, and the 128 MiB of temporaries per call stop faulting."""
    _need_mimalloc()
    plain, fresh = _probe("system"), _probe("auto", CLOVER_JAX_NO_TCMALLOC="1")
    assert fresh["applied"] == f"mimalloc ({ha.find_mimalloc()})"
    print(f"\nminor faults per call: system malloc {plain['faults']:.0f}, auto without tcmalloc {fresh['faults']:.0f}")
    assert plain["faults"] > 10_000
    assert fresh["faults"] < 0.1 * plain["faults"]


def test_a_bad_choice_stops_the_entry_point_in_one_line():
    env = {**os.environ, "CLOVER_JAX_ALLOCATOR": "jemalloc"}
    code = "from clover_jax.host_allocator import reexec_with_tuned_allocator as r; r()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: CLOVER_JAX_ALLOCATOR='jemalloc'; valid: auto, tcmalloc, "
                                               "mimalloc, glibc_tuned, system"]


def test_an_accelerator_process_keeps_its_malloc():
    """Host malloc is CPU process set-up: with JAX_PLATFORMS naming an accelerator the choice is not even read."""
    assert ha.runs_on_cpu({"JAX_PLATFORMS": "cpu"}) and not ha.runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"})
    assert not ha.runs_on_cpu({})
    env = {**os.environ, "CLOVER_JAX_ALLOCATOR": "jemalloc", "JAX_PLATFORMS": "cuda"}
    code = "from clover_jax.host_allocator import reexec_with_tuned_allocator as r; r(); print('not restarted')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0 and out.stdout.strip() == "not restarted"
