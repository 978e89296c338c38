"""How the model's ops run fast on each backend: the execution policy (`execution.py`), the dispatch `models/`
calls (`ops.py`), accelerator attention (`attention.py`) and the CPU kernels (`cpu/`)."""
