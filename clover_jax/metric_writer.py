"""Scalars of a run to TensorBoard (`<workdir>/tb`) and a JSONL copy (`<workdir>/metrics.jsonl`), process 0."""
from __future__ import annotations

import json
import pathlib

import jax


class MetricWriter:
    """One row per `write(step, scalars)` in metrics.jsonl, and the same scalars as TensorBoard summaries."""

    def __init__(self, workdir: pathlib.Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            import tensorflow as tf

            self._tf = tf
            self._tb = tf.summary.create_file_writer(str(workdir / "tb"))
            self._jsonl = open(workdir / "metrics.jsonl", "a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        with self._tb.as_default():
            for k, v in scalars.items():
                self._tf.summary.scalar(k, v, step=step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
