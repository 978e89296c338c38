"""The entry points' XLA CPU flags: added unless the user set them, skipped for an old jaxlib, seen by XLA."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from clover_jax import xla_cpu_flags
from clover_jax.xla_cpu_flags import DEFAULT_FLAGS, with_default_flags

YNN = "xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_appended_to_other_flags():
    flags = with_default_flags("--xla_force_host_platform_device_count=8", (0, 10))
    assert flags.split() == ["--xla_force_host_platform_device_count=8", f"--{YNN}={DEFAULT_FLAGS[YNN]}"]
    assert with_default_flags("", (0, 10)) == f"--{YNN}={DEFAULT_FLAGS[YNN]}"


def test_a_flag_the_user_gave_is_kept():
    for given in (f"--{YNN}=-reduce", f"--{YNN}=", f"-{YNN}=dot --xla_cpu_enable_fast_math=false"):
        assert with_default_flags(given, (0, 10)) == given


def test_older_jaxlib_gets_nothing_added():
    assert with_default_flags("--a=1", (0, 9)) == "--a=1"
    assert with_default_flags("--a=1", ()) == "--a=1"


def test_add_default_flags_writes_the_environment(monkeypatch):
    env = {"XLA_FLAGS": "--b=2"}
    monkeypatch.setattr(xla_cpu_flags, "host_has_accelerator", lambda: False)
    xla_cpu_flags.add_default_flags(env)
    assert env["XLA_FLAGS"].startswith("--b=2 ") and YNN in env["XLA_FLAGS"]
    assert env["JAX_PLATFORMS"] == "cpu"  # no accelerator: jax never probes libtpu or CUDA


def test_platform_is_left_alone_with_an_accelerator_or_a_choice(monkeypatch):
    monkeypatch.setattr(xla_cpu_flags, "host_has_accelerator", lambda: True)
    env: dict[str, str] = {}
    xla_cpu_flags.add_default_flags(env)
    assert "JAX_PLATFORMS" not in env
    monkeypatch.setattr(xla_cpu_flags, "host_has_accelerator", lambda: False)
    env = {"JAX_PLATFORMS": "tpu"}
    xla_cpu_flags.add_default_flags(env)
    assert env["JAX_PLATFORMS"] == "tpu"


def test_accelerator_detection_reads_device_nodes(monkeypatch):
    monkeypatch.setattr(xla_cpu_flags.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert xla_cpu_flags.host_has_accelerator()
    monkeypatch.setattr(xla_cpu_flags.glob, "glob", lambda pattern: [])
    assert not xla_cpu_flags.host_has_accelerator()


def test_this_process_compiles_with_them():
    """conftest set the flags before jax started: a lone dot is XLA's own, not a YNNPACK fusion
    (under XLA's default list it would be one)."""
    assert f"--{YNN}=" in os.environ["XLA_FLAGS"]
    hlo = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
    assert "dot(" in hlo and "__ynn_fusion" not in hlo
