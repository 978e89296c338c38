"""ml_collections configs: `--config=configs/<file>.py:<arg>`; see each file's docstring."""
