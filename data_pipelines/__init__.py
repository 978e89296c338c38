"""Clover's data: offline dataset builds (`build/`) and the online tf.data input (`input/`).

Imports nothing from `clover_jax/` (tests/unit/test_import_graph.py checks it).
"""
