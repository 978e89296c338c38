"""clover_jax: Clover (Huang et al., CVPR 2023) video-language pre-training in JAX/Flax."""
