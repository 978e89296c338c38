"""Deprecated: `python -m data_pipelines.prepare` forwards to `python -m clover_jax.prepare` (for one release)."""
import runpy
import sys

if __name__ == "__main__":
    print("note: python -m data_pipelines.prepare is deprecated; use python -m clover_jax.prepare (same flags)",
          file=sys.stderr)
    runpy.run_module("clover_jax.prepare", run_name="__main__", alter_sys=True)
