"""Kernels tuned for XLA:CPU: chunked window attention, token-chunked Dense gradients, LayerNorm row sums,
unrolled Threefry dropout masks and chunks of whole clips. Sizes come from `policy.CpuTuning`."""
