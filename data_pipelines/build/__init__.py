"""Offline dataset builds: annotation readers, clip decoding and tags, the TFDS / Beam builders and the build store."""
