"""Datasets, TFDS builders and the tf.data input pipeline for Clover."""
