"""3D Swin (Video Swin) video encoder in Flax, faithful to torchvision's SwinTransformer3d / official Video Swin.

Layout is channels-last throughout: video (B, T, H, W, 3) -> features (B, T', H', W', C).
Window attention uses reshape/transpose partitioning, `jnp.roll` for the cyclic shift and
`kernels.ops.window_attention` (the math of `window_attention.py`, in the execution policy's implementation); the
relative-position index and the shift mask are numpy constants built at trace time. The patch embedding
is a patchify reshape and one matmul with the Conv3d's parameters (kernel = stride makes them equal).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clover_jax.kernels import ops
from clover_jax.models.layers import TRUNC_NORMAL_02, dense, gelu, layer_norm, maybe_remat, param_with_axes

Dtype = Any
Triple = tuple[int, int, int]

SHIFT_MASK_FILL = -100.0  # torchvision / official Video Swin fill for cross-region pairs (not -inf)


@dataclasses.dataclass(frozen=True)
class Swin3DConfig:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    patch_size: Triple = (2, 4, 4)
    window_size: Triple = (8, 7, 7)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    use_mask_token: bool = True
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02  # truncated-normal std of linear kernels (torchvision/official: 0.02 at every width)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "window_size", tuple(self.window_size))
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(
                f"depths {self.depths} and num_heads {self.num_heads} must be non-empty and of equal length "
                "(one entry per stage)"
            )
        if len(self.patch_size) != 3 or len(self.window_size) != 3:
            raise ValueError(f"patch_size {self.patch_size} and window_size {self.window_size} need 3 entries "
                             "(t, h, w)")
        for i, heads in enumerate(self.num_heads):
            if self.stage_dim(i) % heads:
                raise ValueError(f"stage {i} width {self.stage_dim(i)} is not divisible by num_heads[{i}]={heads}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @property
    def out_dim(self) -> int:
        return self.stage_dim(self.num_stages - 1)

    def drop_path_rates(self) -> list[float]:
        """Linear schedule from 0 to drop_path_rate over all blocks (torchvision and official agree)."""
        total = sum(self.depths)
        if total == 1:
            return [0.0]
        return [self.drop_path_rate * i / (total - 1) for i in range(total)]


SWIN3D_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),  # the golden test config
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def swin3d_config(name: str, **overrides: Any) -> Swin3DConfig:
    """Named size from SWIN3D_SIZES, with any Swin3DConfig field overridden."""
    if name not in SWIN3D_SIZES:
        raise ValueError(f"unknown Swin3D size '{name}'; valid names: {sorted(SWIN3D_SIZES)}")
    return Swin3DConfig(**{**SWIN3D_SIZES[name], **overrides})


# ----------------------------------------------------------------------------------------------------
# Pure helpers (numpy at trace time)


def window_and_shift(size: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[Triple, Triple]:
    """A dimension no larger than the window shrinks the window to it and is not shifted."""
    win, sh = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            win[i], sh[i] = size[i], 0
    return tuple(win), tuple(sh)


def relative_position_index(window: Sequence[int]) -> np.ndarray:
    """(N, N) index into the ((2Wt-1)(2Wh-1)(2Ww-1), heads) table, tokens flattened in (t, h, w) order."""
    wt, wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wt), np.arange(wh), np.arange(ww), indexing="ij")).reshape(3, -1)
    rel = coords[:, :, None] - coords[:, None, :] + np.array([wt - 1, wh - 1, ww - 1])[:, None, None]
    return rel[0] * (2 * wh - 1) * (2 * ww - 1) + rel[1] * (2 * ww - 1) + rel[2]


def shift_attention_mask(padded: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> np.ndarray:
    """(num_windows, N, N) additive mask: 0 within a shifted region, -100 across regions.

    Regions per dimension are [0, P-W), [P-W, P-s), [P-s, P) (one region where s = 0), as in the
    reference's slice labelling; windows are ordered (t, h, w) like `partition_windows`.
    """
    labels_per_dim = []
    for p, w, s in zip(padded, window, shift):
        pos = np.arange(p)
        labels_per_dim.append(np.zeros(p, np.int64) if s == 0 else (pos >= p - w).astype(np.int64) + (pos >= p - s))
    lt, lh, lw = labels_per_dim
    labels = (lt[:, None, None] * 9 + lh[None, :, None] * 3 + lw[None, None, :])[..., None]
    windows = partition_windows(labels[None], window, xp=np)[0, ..., 0]  # (nW, N)
    same = windows[:, :, None] == windows[:, None, :]
    return np.where(same, 0.0, SHIFT_MASK_FILL).astype(np.float32)


def partition_windows(x, window: Sequence[int], xp=jnp):
    """(B, T, H, W, C) with T, H, W multiples of `window` -> (B, num_windows, window volume, C)."""
    b, t, h, w, c = x.shape
    wt, wh, ww = window
    x = x.reshape(b, t // wt, wt, h // wh, wh, w // ww, ww, c)
    x = xp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
    return x.reshape(b, -1, wt * wh * ww, c)


def merge_windows(x: jnp.ndarray, window: Sequence[int], padded: Sequence[int]) -> jnp.ndarray:
    """Inverse of `partition_windows`: (B, num_windows, N, C) -> (B, T, H, W, C)."""
    b, _, _, c = x.shape
    (wt, wh, ww), (t, h, w) = window, padded
    x = x.reshape(b, t // wt, h // wh, w // ww, wt, wh, ww, c)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))
    return x.reshape(b, t, h, w, c)


def pad_to_multiple(x: jnp.ndarray, multiple: Sequence[int]) -> jnp.ndarray:
    """Zero-pads axes 1..3 of (B, T, H, W, C) at the end up to multiples of `multiple`."""
    pads = [(0, (-s) % m) for s, m in zip(x.shape[1:4], multiple)]
    if not any(p for _, p in pads):
        return x
    return jnp.pad(x, [(0, 0), *pads, (0, 0)])


# ----------------------------------------------------------------------------------------------------
# Modules


def _init(std: float):
    return nn.initializers.truncated_normal(stddev=std)


class PatchProjection(nn.Module):
    """Conv3d with kernel = stride = `patch` over (B, T, H, W, Cin) whose sizes are patch multiples, as a
    patchify reshape and one matmul. Parameters are nn.Conv's: `kernel` (pt, ph, pw, Cin, C), `bias` (C,)."""

    features: int
    patch: Triple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, t, h, w, cin = x.shape
        pt, ph, pw = self.patch
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(TRUNC_NORMAL_02, (None, None, None, None, "embed")),
            (pt, ph, pw, cin, self.features), self.param_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                          (self.features,), self.param_dtype)
        x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, cin)
        x = jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7)).reshape(b, t // pt, h // ph, w // pw, pt * ph * pw * cin)
        y = jnp.dot(x.astype(self.dtype), kernel.reshape(-1, self.features).astype(self.dtype))
        return y + bias.astype(self.dtype)


class PatchEmbed3D(nn.Module):
    """Zero-pad to patch multiples, Conv3d with kernel = stride = patch (`PatchProjection`), then LayerNorm."""

    config: Swin3DConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, video: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        x = pad_to_multiple(video, cfg.patch_size)
        x = PatchProjection(cfg.embed_dim, cfg.patch_size, self.dtype, self.param_dtype, name="proj")(x)
        x = layer_norm(name="norm", eps=cfg.layer_norm_eps, param_dtype=self.param_dtype)(x)
        return x.astype(self.dtype)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside (shifted) 3D windows with a relative position bias."""

    dim: int
    num_heads: int
    window_size: Triple
    shift_size: Triple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, t, h, w, c = x.shape
        window, shift = window_and_shift((t, h, w), self.window_size, self.shift_size)
        wt, wh, ww = self.window_size
        table = param_with_axes(
            self,
            "relative_position_bias_table",
            TRUNC_NORMAL_02,
            ((2 * wt - 1) * (2 * wh - 1) * (2 * ww - 1), self.num_heads),
            (None, None),
            self.param_dtype,
        )
        x = pad_to_multiple(x, window)
        padded = x.shape[1:4]
        if any(shift):
            x = jnp.roll(x, tuple(-s for s in shift), axis=(1, 2, 3))
        windows = partition_windows(x, window)  # (B, nW, N, C)
        nw, n = windows.shape[1:3]

        head_dim = c // self.num_heads
        qkv = dense(3 * c, ("embed", "heads"), name="qkv", dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_init(self.init_std), token_grid=True)(windows)
        qkv = qkv.reshape(b, nw, n, 3, self.num_heads, head_dim)

        # The reference indexes the full-window table and slices it to the (possibly shrunk) window volume.
        index = relative_position_index(self.window_size)[:n, :n]
        bias = jnp.take(table, index.reshape(-1), axis=0).reshape(n, n, self.num_heads)
        bias = jnp.transpose(bias, (2, 0, 1))
        mask = shift_attention_mask(padded, window, shift) if any(shift) else None
        out = ops.window_attention(qkv, bias, mask, head_dim**-0.5)
        out = out.reshape(b, nw, n, c)
        out = dense(c, ("heads", "embed"), name="proj", dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_init(self.init_std), token_grid=True)(out)
        out = merge_windows(out, window, padded)
        if any(shift):
            out = jnp.roll(out, shift, axis=(1, 2, 3))
        return out[:, :t, :h, :w]


class Mlp(nn.Module):
    hidden_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dim = x.shape[-1]
        x = dense(self.hidden_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=_init(self.init_std), token_grid=True)(x)
        x = gelu(x)
        return dense(dim, ("mlp", "embed"), name="fc2", dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=_init(self.init_std), token_grid=True)(x)


def drop_path(module: nn.Module, x: jnp.ndarray, rate: float, deterministic: bool) -> jnp.ndarray:
    """Stochastic depth: drops the whole residual branch per sample, rescaling survivors by 1/(1-rate)."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class SwinBlock3D(nn.Module):
    """Pre-norm block: x + DropPath(W-MSA(LN(x))), then x + DropPath(MLP(LN(x)))."""

    dim: int
    num_heads: int
    window_size: Triple
    shift_size: Triple
    mlp_ratio: float
    drop_path_rate: float
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        y = layer_norm(name="norm1", eps=self.eps, param_dtype=self.param_dtype)(x).astype(self.dtype)
        y = WindowAttention3D(
            self.dim, self.num_heads, self.window_size, self.shift_size, self.dtype, self.param_dtype,
            init_std=self.init_std, name="attn",
        )(y)
        x = x + drop_path(self, y, self.drop_path_rate, deterministic)
        y = layer_norm(name="norm2", eps=self.eps, param_dtype=self.param_dtype)(x).astype(self.dtype)
        y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, self.param_dtype, self.init_std, name="mlp")(y)
        return x + drop_path(self, y, self.drop_path_rate, deterministic)


class PatchMerging(nn.Module):
    """2x2 spatial merge (zero-pad odd H/W), concat in x0,x1,x2,x3 order, LN over 4C, Linear 4C -> 2C."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        c = x.shape[-1]
        _, _, h, w, _ = x.shape
        x = jnp.pad(x, [(0, 0), (0, 0), (0, h % 2), (0, w % 2), (0, 0)])
        x = jnp.concatenate(
            [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], axis=-1
        )
        x = layer_norm(name="norm", eps=self.eps, axis=None, param_dtype=self.param_dtype)(x).astype(self.dtype)
        return dense(
            2 * c, (None, "embed"), name="reduction", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_init(self.init_std), token_grid=True,
        )(x)


class SwinStage3D(nn.Module):
    """One stage: `depth` blocks alternating unshifted / shifted windows, then optional PatchMerging.

    Returns (stage output, downsampled output or None).
    """

    config: Swin3DConfig
    stage: int
    drop_path_rates: tuple[float, ...]
    downsample: bool
    remat: bool | str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        cfg = self.config
        block_cls = maybe_remat(SwinBlock3D, self.remat, static_argnums=(2,))
        half_window = tuple(w // 2 for w in cfg.window_size)
        for j in range(cfg.depths[self.stage]):
            x = block_cls(
                dim=cfg.stage_dim(self.stage),
                num_heads=cfg.num_heads[self.stage],
                window_size=cfg.window_size,
                shift_size=(0, 0, 0) if j % 2 == 0 else half_window,
                mlp_ratio=cfg.mlp_ratio,
                drop_path_rate=self.drop_path_rates[j],
                eps=cfg.layer_norm_eps,
                init_std=cfg.init_std,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"blocks_{j}",
            )(x, deterministic)
        if not self.downsample:
            return x, None
        merged = PatchMerging(cfg.layer_norm_eps, self.dtype, self.param_dtype, cfg.init_std, name="downsample")(x)
        return x, merged


class SwinTransformer3D(nn.Module):
    """Video Swin encoder. `video` (B, T, H, W, 3) -> final-LayerNorm'd features (B, T', H', W', C_last).

    `token_mask` (B, ceil(H/ph), ceil(W/pw)), float weights or bool, is applied after patch embedding and
    broadcast over time: x * (1 - w) + mask_token * w. A (B, K, Hp, Wp) mask encodes each clip under K
    masks from one patch embedding: the output has B*K rows, row b*K + j being clip b under mask j.
    With `return_features=True` also returns the list
    [patch_embed, features_0, ..., features_{2S-2}] as torchvision's `features` (patch embedding after its
    norm and the mask substitution, then each stage's output and each PatchMerging output).
    Each stage runs in the clip groups the execution policy gives it (`kernels.ops.in_clip_groups`): the same
    values, as ops XLA:CPU can run concurrently.
    """

    config: Swin3DConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool | str = "none"

    def _check_inputs(self, video: jnp.ndarray, token_mask: jnp.ndarray | None) -> tuple[int, int]:
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(
                f"video must be channels-last (B, T, H, W, 3), got shape {tuple(video.shape)}; "
                "transpose a PyTorch (B, C, T, H, W) clip with x.transpose(0, 2, 3, 4, 1)"
            )
        _, ph, pw = self.config.patch_size
        grid = (math.ceil(video.shape[2] / ph), math.ceil(video.shape[3] / pw))
        if token_mask is not None:
            b = video.shape[0]
            shape = tuple(token_mask.shape)
            if not (shape == (b, *grid) or (len(shape) == 4 and shape[0] == b and shape[2:] == grid)):
                raise ValueError(
                    f"token_mask must be (B, Hp, Wp) = {(b, *grid)} or (B, K, Hp, Wp) for video "
                    f"{tuple(video.shape)} (patch-token resolution, shared over time), got {shape}"
                )
        return grid

    @nn.compact
    def __call__(
        self,
        video: jnp.ndarray,
        token_mask: jnp.ndarray | None = None,
        *,
        deterministic: bool = True,
        return_features: bool = False,
    ) -> jnp.ndarray | tuple[jnp.ndarray, list[jnp.ndarray]]:
        cfg = self.config
        self._check_inputs(video, token_mask)
        x = PatchEmbed3D(cfg, self.dtype, self.param_dtype, name="patch_embed")(video)
        if cfg.use_mask_token:
            mask_token = param_with_axes(
                self, "mask_token", TRUNC_NORMAL_02, (cfg.embed_dim,), ("embed",), self.param_dtype
            )
        if token_mask is not None:
            if not cfg.use_mask_token:
                raise ValueError("token_mask was given but the config has use_mask_token=False")
            masks = token_mask if token_mask.ndim == 4 else token_mask[:, None]
            weight = masks.astype(self.dtype)[:, :, None, :, :, None]  # (B, K, 1, Hp, Wp, 1)
            x = x[:, None] * (1 - weight) + mask_token.astype(self.dtype) * weight
            x = x.reshape(-1, *x.shape[2:])
        features = [x]
        rates = cfg.drop_path_rates()
        start = 0
        for i, depth in enumerate(cfg.depths):
            last = i == cfg.num_stages - 1
            stage = SwinStage3D(
                cfg,
                i,
                tuple(rates[start : start + depth]),
                downsample=not last,
                remat=self.remat,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"layers_{i}",
            )
            stage_out, merged = ops.in_clip_groups(lambda rows: stage(rows, deterministic), x, i)
            start += depth
            if return_features:
                features.append(stage_out)
                if not last:
                    features.append(merged)
            x = stage_out if last else merged

        out = layer_norm(name="norm", eps=cfg.layer_norm_eps, param_dtype=self.param_dtype)(x).astype(self.dtype)
        return (out, features) if return_features else out


def abstract_params(config: Swin3DConfig) -> dict[str, Any]:
    """Unboxed parameter shapes (jax.ShapeDtypeStruct tree) of SwinTransformer3D(config), without compute."""
    model = SwinTransformer3D(config)
    video = jax.ShapeDtypeStruct((1, *config.patch_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v), video)
    return nn.meta.unbox(variables["params"])
