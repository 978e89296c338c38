"""Test set-up: 8 virtual CPU devices and the entry points' XLA CPU flags (set before jax is imported), and the
shared golden/data paths."""
import os
import pathlib

from clover_jax.aot import set_compile_only_environment  # jax-free, as is the next import
from clover_jax.xla_cpu_flags import with_default_flags

# The suite's programs are tiny and each runs a few times, so compiling dominates its time: LLVM at -O0 cuts
# the backend compile by about a third (and the whole suite by minutes). It changes how the fused loops are
# optimised, not the HLO the tests check; test processes and the subprocesses they start use it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = with_default_flags(
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}"
)
set_compile_only_environment()  # JAX_PLATFORMS=cpu, and libtpu (requirements-tpu.txt) for TPU compiles only
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("CLOVER_SHARED", REPO_ROOT.parent / "shared"))


def _need(path: pathlib.Path) -> pathlib.Path:
    """Returns `path`; skips the test when it is absent, but fails under CI (CI always has ../shared)."""
    if not path.exists():
        msg = f"{path} is absent: these tests need the project's ../shared folder (set CLOVER_SHARED)"
        if os.environ.get("CI"):
            pytest.fail(msg + " — and CI is set, where it must exist")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return _need(SHARED / "golden")


@pytest.fixture(scope="session")
def real_data_dir() -> pathlib.Path:
    return _need(SHARED / "data" / "real")


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment for running `python -m clover_jax.train/eval` in subprocesses: 2 CPU devices, library
    logs off the terminal, no CLOVER_DEBUG tracebacks, a synthetic-data cache (`CLOVER_TEST_DATA_CACHE`)
    for every such run of this test process, and one XLA compilation cache for every such run of the
    session, pytest-xdist workers included, so the tiny step compiles once. The cache's size limit turns on
    jax's file lock, so one worker never reads an entry another is still writing."""
    cache = tmp_path_factory.mktemp("cli_cache")
    session_root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # xdist: every worker's basetemp sits in one folder of this session
        session_root = session_root.parent
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}",
               JAX_COMPILATION_CACHE_DIR=str(session_root / "cli_xla_cache"),
               JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", CLOVER_TEST_DATA_CACHE=str(cache / "data"))
    env.pop("CLOVER_DEBUG", None)
    return env
