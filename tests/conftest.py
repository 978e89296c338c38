"""Test set-up: 8 virtual CPU devices and the entry points' XLA CPU flags (set before jax is imported), and the
shared golden/data paths."""
import os
import pathlib

from clover_jax.xla_cpu_flags import with_default_flags  # jax-free: imports nothing that starts jax

os.environ["XLA_FLAGS"] = with_default_flags(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
    logs off the terminal, no CLOVER_DEBUG tracebacks, and one XLA compilation cache and one synthetic-data
    cache (`CLOVER_TEST_DATA_CACHE`) for every such run of the session, so the tiny step compiles once."""
    cache = tmp_path_factory.mktemp("cli_cache")
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COMPILATION_CACHE_DIR=str(cache / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", CLOVER_TEST_DATA_CACHE=str(cache / "data"))
    env.pop("CLOVER_DEBUG", None)
    return env
