"""Shared layer constructors that attach logical axis names to every parameter.

Logical axis vocabulary (the sharding rules table in `clover_jax/partitioning.py` maps these to mesh axes):
  "embed"  hidden/channel width of a transformer (BERT hidden, Swin stage channels)
  "mlp"    feed-forward inner width
  "heads"  fused attention width (num_heads * head_dim) of q/k/v and the attention output's input
  "vocab"  vocabulary rows / logits
  "classes" answer classes of QA heads
  None     never sharded (position rows, relative-position tables, conv taps, token types, ...)
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clover_jax.kernels import ops

Axes = Sequence[str | None]
Dtype = Any

TRUNC_NORMAL_02 = nn.initializers.truncated_normal(stddev=0.02)
NORMAL_02 = nn.initializers.normal(stddev=0.02)


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    kernel_init: Callable = TRUNC_NORMAL_02,
    token_grid: bool = False,
) -> nn.Dense:
    """nn.Dense whose (in, out) kernel carries `axes` and whose bias carries `axes[1]`. `token_grid`: the
    input is a grid of video tokens, whose product the policy may run with its own kernel gradient."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        dot_general=ops.token_grid_dot_general() if token_grid else None,
        name=name,
    )


class LayerNorm(nn.Module):
    """nn.LayerNorm's parameters (`scale`, `bias`, carrying the logical `axis`) and function, float32
    statistics and output (`layer_norm.py`, run by `kernels.ops.layer_norm`)."""

    epsilon: float = 1e-5
    axis: str | None = "embed"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones_init(), (c,), (self.axis,), self.param_dtype)
        bias = param_with_axes(self, "bias", nn.initializers.zeros_init(), (c,), (self.axis,), self.param_dtype)
        f32 = jnp.float32
        return ops.layer_norm(x.astype(f32), scale.astype(f32), bias.astype(f32), self.epsilon)


def layer_norm(
    *,
    name: str,
    eps: float = 1e-5,
    axis: str | None = "embed",
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> LayerNorm:
    """LayerNorm (statistics and output always in float32) whose scale and bias carry the
    logical axis `axis`."""
    del dtype  # Normalisation runs in float32 for stability; the caller casts the output.
    return LayerNorm(epsilon=eps, axis=axis, param_dtype=param_dtype, name=name)


def param_with_axes(
    module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: Axes, dtype: Dtype
) -> jnp.ndarray:
    """`module.param` with logical axis names attached (for embeddings, tokens and tables)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact (erf) GELU, as in PyTorch nn.GELU() and HF BERT's "gelu": x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2.

    Written with erf rather than `nn.gelu(approximate=False)`, which evaluates erfc (exp and a division per
    element on XLA:CPU): within 1e-6 of it, and GELU(x) @ W of `tiny`'s stage-1 MLP (16 clips) took 21 instead
    of 36 ms forward and 53 instead of 73 ms forward + backward on the 2-core host of `benchmarks/`."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


# `model.remat`: which activations a rematerialised layer keeps for its backward pass, by the names of
# `jax.checkpoint_policies` ("full" keeps none: every layer recomputes its forward; "none": no remat).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def remat_name(remat: bool | str) -> str:
    """A REMAT_POLICIES name from a `model.remat` value (True = "full", False = "none")."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r}; valid: {', '.join(map(repr, REMAT_POLICIES))} (or true / false)")
    return remat


def maybe_remat(module_cls: type[nn.Module], remat: bool | str, static_argnums: tuple[int, ...]) -> type[nn.Module]:
    """`module_cls` rematerialised under the `remat` policy (unchanged for "none")."""
    name = remat_name(remat)
    if name == "none":
        return module_cls
    return nn.remat(module_cls, static_argnums=static_argnums, policy=REMAT_POLICIES[name])
