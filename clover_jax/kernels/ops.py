"""The ops `models/` calls where the implementation depends on the backend, each run by the active policy.

Every function here looks up `policy.active()` (set by `Clover` from `CloverConfig.execution`, see
`execution.py`) and runs the implementation the policy names, from one dict per op. Outside any policy they
run the plain math of `models/`. Tuned sizes reach the CPU kernels as an argument, so a backward pass traced
later uses the sizes its forward was traced with.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from clover_jax.kernels.attention import dot_product_attention, fused_attention
from clover_jax.kernels.cpu.dense_grad import token_chunked_dot_general
from clover_jax.kernels.cpu.dropout import keep_mask as threefry_keep_mask
from clover_jax.kernels.cpu.layer_norm import layer_norm_fn
from clover_jax.kernels.cpu.window_attention import chunked_attention
from clover_jax.kernels.execution import ExecutionPolicy, active
from clover_jax.models.layer_norm import layer_norm as layer_norm_math
from clover_jax.models.window_attention import einsum_attention

Array = jax.Array
CLIP_GROUPS_SCOPE = "cpu_clip_groups"  # name scope of a stage run in clip groups (tests look for it)

WINDOW_ATTENTION: dict[str, Callable[[Array, Array, Any, float, ExecutionPolicy], Array]] = {
    "einsum": lambda qkv, bias, mask, scale, policy: einsum_attention(qkv, bias, mask, scale),
    "fused": lambda qkv, bias, mask, scale, policy: fused_attention(qkv, bias, mask, scale),
    "chunked": chunked_attention,
    "dot_product": lambda qkv, bias, mask, scale, policy: dot_product_attention(qkv, bias, mask, scale),
}
LAYER_NORM: dict[str, Callable[[Array, Array, Array, float], Array]] = {
    "xla": layer_norm_math,
    "matvec_sums": lambda x, scale, bias, eps: layer_norm_fn(x, scale, bias, eps, True),
}
DENSE_DOT_GENERAL: dict[str, Callable[[ExecutionPolicy], Callable | None]] = {
    "xla": lambda policy: None,  # nn.Dense's own lax.dot_general
    "token_chunked_grad": lambda policy: functools.partial(token_chunked_dot_general, policy=policy),
}
DROPOUT_KEEP_MASK: dict[str, Callable[[Array, float, tuple[int, ...]], Array]] = {
    "xla": lambda key, keep, shape: jax.random.bernoulli(key, keep, shape),
    "threefry_unrolled": threefry_keep_mask,
}


def window_attention(qkv: Array, bias: Array, mask: Any, scale: float) -> Array:
    """softmax(scale q k^T + bias + mask) v over windows (`models/window_attention.py` for the shapes)."""
    policy = active()
    return WINDOW_ATTENTION[policy.window_attention](qkv, bias, mask, scale, policy)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """LayerNorm over the last axis (`models/layer_norm.py`)."""
    return LAYER_NORM[active().layer_norm](x, scale, bias, eps)


def token_grid_dot_general() -> Callable | None:
    """`dot_general` for an nn.Dense over a grid of video tokens (None: nn.Dense's own)."""
    policy = active()
    return DENSE_DOT_GENERAL[policy.dense](policy)


def dropout_keep_mask(key: Array, keep: float, shape: tuple[int, ...]) -> Array:
    """Boolean mask of `shape`, each element True with probability `keep`."""
    return DROPOUT_KEEP_MASK[active().dropout](key, keep, shape)


def split_clip_groups(x: Array, groups: int) -> list[Array]:
    """(B, ...) -> `groups` arrays (B / groups, ...); group g holds rows g, g + groups, ..."""
    if groups == 1:
        return [x]
    rows = x.reshape(x.shape[0] // groups, groups, *x.shape[1:])
    return [rows[:, g] for g in range(groups)]


def join_clip_groups(xs: list[Array]) -> Array:
    """Inverse of `split_clip_groups`."""
    if len(xs) == 1:
        return xs[0]
    return jnp.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:])


def in_clip_groups(fn: Callable[[Array], tuple[Any, ...]], x: Array, stage: int) -> tuple[Any, ...]:
    """fn(x) for per-clip `fn`, run over the interleaved groups of clips the policy gives Swin stage `stage`
    (the same values; separate ops XLA can run side by side). Each output (an array or None) is re-joined.
    Group g holds rows g, g + G, ...: a batch sharded in contiguous blocks keeps each group's rows in place."""
    groups = active().stage_clip_groups(stage, x.shape[0])
    if groups == 1:
        return fn(x)
    with jax.named_scope(CLIP_GROUPS_SCOPE):
        outs = [fn(part) for part in split_clip_groups(x, groups)]
        return tuple(None if o[0] is None else join_clip_groups(list(o)) for o in zip(*outs))
