"""Test set-up: 8 virtual CPU devices (set before jax is imported) and the shared golden/data paths."""
import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
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
