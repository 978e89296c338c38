"""The Clover network: Swin3D video encoder, BERT text encoder, fusion encoder and every head.

Pre-training forward (reference §2.1), for video V, block-masked video V^m, text T and masked text T^m:
  v = g_v(Swin(V)),  v^m = g_v(Swin(V^m)),  t = g_t(BERT(T)),  t^m = g_t(BERT(T^m)),
  z_V = h_V(Fuse(Swin(V^m), BERT(T))),  z_T = h_T(Fuse(Swin(V), BERT(T^m))),
  mlm_logits = MLM(text tokens of Fuse(Swin(V), BERT(T^m))).
The two Swin passes, the two BERT passes and the two fusion passes each run as one call over a batch
of 2B whose rows interleave (full, masked) per example, so a batch-sharded input stays shard-local.

h_V's input is ambiguous in the released code (reference §1.4): `h_v_input="text_cls"` (default) feeds
the fused text [CLS] of Fuse(V^m, T), which is what the official recognizer passes; "video_token_mean"
feeds the mean of the fused video tokens, which is what the head's own shape comment expects.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from clover_jax.kernels import execution
from clover_jax.models.bert import BertConfig, BertModel, bert_config
from clover_jax.models.fusion import FusionEncoder
from clover_jax.models.heads import (
    FusedTextHead,
    FusedVideoHead,
    MLMHead,
    MultipleChoiceHead,
    OpenEndedQAHead,
    TextProjector,
    VideoProjector,
)
from clover_jax.models.layers import REMAT_POLICIES, remat_name
from clover_jax.models.swin3d import Swin3DConfig, SwinTransformer3D, swin3d_config

PRETRAIN_OUTPUTS = ("v", "t", "v_masked", "t_masked", "z_v", "z_t", "mlm_logits")
# How the video encoder takes a batch: "batched" (one call over every clip) or "per_clip" (a scan over clips
# whose body is rematerialised: no batch-wide Swin activation is stored, and a clip's windows stay in cache).
VIDEO_BATCHING = ("batched", "per_clip")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class CloverConfig:
    """Sizes and switches of the whole network (see `clover_config` for the named presets)."""

    video: Swin3DConfig
    text: BertConfig
    fusion_layers: int = 3
    embed_dim: int = 768  # width of v, t, z_V, z_T
    num_frames: int = 8  # input frames the fusion's temporal position table is sized for
    image_size: int = 224  # input height = width the fusion's spatial position table is sized for
    h_v_input: str = "text_cls"  # or "video_token_mean" (reference §1.4)
    num_answers: int = 0  # > 0 adds the open-ended QA head (MSRVTT-QA 1500, MSVD-QA 1000, ...)
    multiple_choice: bool = False  # adds the multiple-choice scorer head
    qa_dropout: float = 0.5
    mask_token_id: int = 103  # [MASK] in bert-base-uncased; fill-in-the-blank reads the fused state here
    fusion_cls_token: bool = False  # a learned token between video and text in the fusion (official LSMDC-FiB)
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: str = "none"  # `layers.REMAT_POLICIES` name for every Swin block and BERT layer (True = "full")
    video_batching: str = "batched"  # or "per_clip": see VIDEO_BATCHING
    execution: execution.ExecutionPolicy = execution.REFERENCE  # implementations of backend-dependent ops

    def __post_init__(self):
        object.__setattr__(self, "remat", remat_name(self.remat))
        if self.video_batching not in VIDEO_BATCHING:
            valid = ", ".join(map(repr, VIDEO_BATCHING))
            raise ValueError(f"model.video_batching={self.video_batching!r}; valid: {valid}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}; valid: {sorted(DTYPES)}")
        if self.h_v_input not in ("text_cls", "video_token_mean"):
            raise ValueError(f"model.h_v_input={self.h_v_input!r}; valid: 'text_cls', 'video_token_mean'")
        if not 1 <= self.fusion_layers:
            raise ValueError(f"model.fusion_layers={self.fusion_layers} must be >= 1")

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def fusion_config(self) -> BertConfig:
        return dataclasses.replace(self.text, num_layers=self.fusion_layers)

    @property
    def token_grid(self) -> tuple[int, int]:
        """Patch-token (Hp, Wp) of an image_size input: the resolution of the video block mask."""
        side = math.ceil(self.image_size / self.video.patch_size[1])
        return side, side

    @property
    def video_token_shape(self) -> tuple[int, int]:
        """(temporal, spatial) token counts of the Swin output for num_frames x image_size² input."""
        t = math.ceil(self.num_frames / self.video.patch_size[0])
        side = self.token_grid[0]
        for _ in range(self.video.num_stages - 1):
            side = math.ceil(side / 2)
        return t, side * side


# Named presets. "official_tiny" matches shared/golden/clover_official_tiny; "base" is the paper's.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(video="tiny", text="tiny", fusion_layers=1, embed_dim=64, num_frames=4, image_size=64),
    "official_tiny": dict(
        video="tiny", text="tiny", text_overrides=dict(vocab_size=1000), fusion_layers=1, embed_dim=64,
    ),
    "small": dict(video="T", text="MiniLM-L6-H384", fusion_layers=2, embed_dim=256, num_frames=8, image_size=112),
    "base": dict(video="B", text="base", fusion_layers=3, embed_dim=768, video_overrides=dict(drop_path_rate=0.3)),
}


def clover_config(preset: str, **overrides: Any) -> CloverConfig:
    """A named preset with top-level fields replaced by `overrides` (video/text sizes by name or config)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown Clover preset {preset!r}; valid: {sorted(_PRESETS)}")
    spec = dict(_PRESETS[preset])
    video_overrides = {**spec.pop("video_overrides", {}), **overrides.pop("video_overrides", {})}
    text_overrides = {**spec.pop("text_overrides", {}), **overrides.pop("text_overrides", {})}
    spec.update(overrides)
    valid = {f.name for f in dataclasses.fields(CloverConfig)}
    bad = sorted(set(spec) - valid)
    if bad:
        raise ValueError(f"unknown CloverConfig fields {bad}; valid: {sorted(valid)}")
    video, text = spec.pop("video"), spec.pop("text")
    video = swin3d_config(video, **video_overrides) if isinstance(video, str) else video
    text = bert_config(text, **text_overrides) if isinstance(text, str) else text
    return CloverConfig(video=video, text=text, **spec)


def _interleave(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """(B, ...) x2 -> (2B, ...) with rows a0, b0, a1, b1, ... (shard-local for batch-sharded inputs)."""
    return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def _split(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Inverse of `_interleave`."""
    pairs = x.reshape(x.shape[0] // 2, 2, *x.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def _encode_clip_by_clip(encoder: SwinTransformer3D, video: jnp.ndarray, token_mask: jnp.ndarray | None,
                         deterministic: bool, remat: str, shards: int) -> jnp.ndarray:
    """`encoder(video, token_mask)` as a scan over clips whose body is rematerialised (under the `remat`
    policy; "none" counts as "full"): the backward recomputes one step's forward at a time. Step i encodes
    clip i of each of the `shards` contiguous blocks the batch is sharded in, so on a mesh every device
    encodes its own clip each step (a scan over the global batch axis would gather every clip to every
    device). Same rows and values as the batched call."""
    b = video.shape[0]
    shards = shards if b % shards == 0 else 1

    def by_step(x):  # (B, ...) -> (B / shards, shards, ...): step i holds row i of every shard's block
        return None if x is None else jnp.swapaxes(x.reshape(shards, b // shards, *x.shape[1:]), 0, 1)

    def one_step(module, carry, clips):
        clip_video, clip_mask = clips
        return carry, module(clip_video, clip_mask, deterministic=deterministic)

    policy = REMAT_POLICIES[remat if remat != "none" else "full"]
    scan = nn.scan(nn.remat(one_step, prevent_cse=False, policy=policy), variable_broadcast="params",
                   split_rngs={"params": False, "dropout": True}, in_axes=0, out_axes=0)
    _, features = scan(encoder, None, (by_step(video), by_step(token_mask)))  # (B / shards, shards * K, ...)
    features = features.reshape(b // shards, shards, -1, *features.shape[2:])  # (step, shard, mask, ...)
    return jnp.swapaxes(features, 0, 1).reshape(-1, *features.shape[3:])


def _under_execution_policy(method: Callable) -> Callable:
    """`method` traced under the model config's execution policy (`kernels.execution.use`)."""

    @functools.wraps(method)
    def traced(self, *args, **kwargs):
        with execution.use(self.config.execution):
            return method(self, *args, **kwargs)

    return traced


class Clover(nn.Module):
    """Clover: `encode_video`, `encode_text`, `fuse`, the pre-training forward (`__call__`) and QA heads."""

    config: CloverConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=jnp.float32)
        temporal, spatial = c.video_token_shape
        self._per_clip = c.video_batching == "per_clip"  # the scan rematerialises each clip itself
        self.video_encoder = SwinTransformer3D(c.video, remat="none" if self._per_clip else c.remat, **kw)
        self.text_encoder = BertModel(c.text, add_pooler=False, remat=c.remat, **kw)
        self.fusion = FusionEncoder(
            c.fusion_config, video_dim=c.video.out_dim, max_temporal_tokens=temporal,
            spatial_tokens=spatial, remat=c.remat, cls_token=c.fusion_cls_token, **kw,
        )
        self.video_proj = VideoProjector(c.embed_dim, **kw)
        self.text_proj = TextProjector(c.embed_dim, **kw)
        self.h_v = FusedVideoHead(c.embed_dim, input_kind=c.h_v_input, **kw)
        self.h_t = FusedTextHead(c.embed_dim, **kw)
        self.mlm_head = MLMHead(c.text.vocab_size, **kw)
        if c.num_answers:
            self.qa_head = OpenEndedQAHead(c.num_answers, dropout_rate=c.qa_dropout, **kw)
        if c.multiple_choice:
            self.mc_head = MultipleChoiceHead(dropout_rate=c.qa_dropout, **kw)

    # ---- encoders -----------------------------------------------------------------------------
    @_under_execution_policy
    def encode_video(
        self, video: jnp.ndarray, token_mask: jnp.ndarray | None = None, *, deterministic: bool = True
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """video (B, T, H, W, 3) -> (Swin features (B, T', H', W', C), v (B, E) float32); a (B, K, Hp, Wp)
        `token_mask` gives B*K rows (clip b under mask j at row b*K + j, see SwinTransformer3D)."""
        if self._per_clip:
            features = _encode_clip_by_clip(self.video_encoder, video, token_mask, deterministic, self.config.remat,
                                            self.config.execution.batch_shards)
        else:
            features = self.video_encoder(video, token_mask, deterministic=deterministic)
        return features, self.video_proj(features, deterministic=deterministic).astype(jnp.float32)

    @_under_execution_policy
    def encode_text(
        self, ids: jnp.ndarray, mask: jnp.ndarray, *, deterministic: bool = True
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """ids, mask (B, L) -> (hidden states (B, L, H), t (B, E) float32)."""
        states = self.text_encoder(ids, mask, deterministic=deterministic)
        return states, self.text_proj(states).astype(jnp.float32)

    @_under_execution_policy
    def fuse(
        self, video_features: jnp.ndarray, text_states: jnp.ndarray, text_mask: jnp.ndarray,
        *, deterministic: bool = True,
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Fusion encoder: -> (fused video tokens (B, N, H), fused text tokens (B, L, H)); [CLS] is [:, 0]."""
        return self.fusion(video_features, text_states, text_mask, deterministic=deterministic)

    # ---- pre-training -------------------------------------------------------------------------
    @_under_execution_policy
    def __call__(self, batch: dict[str, jnp.ndarray], *, deterministic: bool = True) -> dict[str, jnp.ndarray]:
        """The pre-training forward; `batch` holds video, video_mask, text_ids, text_ids_masked, text_mask.

        Returns float32 `v, t, v_masked, t_masked, z_v, z_t` (B, E) and `mlm_logits` (B, L, vocab).
        """
        video, token_mask = batch["video"], batch["video_mask"]
        ids, ids_masked, mask = batch["text_ids"], batch["text_ids_masked"], batch["text_mask"]
        # Each clip under (no mask, its block mask) from one patch embedding: rows interleave (full, masked).
        features, v_both = self.encode_video(
            video, jnp.stack([jnp.zeros_like(token_mask), token_mask], axis=1), deterministic=deterministic,
        )
        feat_full, feat_masked = _split(features)
        v, v_masked = _split(v_both)
        states, t_both = self.encode_text(_interleave(ids, ids_masked), _interleave(mask, mask),
                                          deterministic=deterministic)
        states_full, states_masked = _split(states)
        t, t_masked = _split(t_both)

        # Fuse(V^m, T) and Fuse(V, T^m) in one call.
        fused_video, fused_text = self.fuse(
            _interleave(feat_masked, feat_full), _interleave(states_full, states_masked),
            _interleave(mask, mask), deterministic=deterministic,
        )
        video_tokens_vm, _ = _split(fused_video)
        text_vm, text_tm = _split(fused_text)
        h_v_in = text_vm[:, 0] if self.config.h_v_input == "text_cls" else video_tokens_vm
        z_v = self.h_v(h_v_in, deterministic=deterministic)
        z_t = self.h_t(text_tm[:, 0], deterministic=deterministic)
        mlm_logits = self.mlm_head(text_tm)
        out = dict(v=v, t=t, v_masked=v_masked, t_masked=t_masked, z_v=z_v, z_t=z_t, mlm_logits=mlm_logits)
        return {k: x.astype(jnp.float32) for k, x in out.items()}

    # ---- downstream: retrieval and VideoQA ----------------------------------------------------
    @_under_execution_policy
    def video_features(self, video: jnp.ndarray, *, deterministic: bool = True) -> jnp.ndarray:
        """Swin features (B, T', H', W', C) of (B, T, H, W, 3) clips, or of (B, V, T, H, W, 3) clips seen
        as V views (TGIF multi-view testing, reference §5.2): each view is encoded and the V feature maps
        are averaged before fusion."""
        if video.ndim == 5:
            return self.encode_video(video, deterministic=deterministic)[0]
        if video.ndim != 6:
            raise ValueError(f"video must be (B, T, H, W, 3) or (B, V, T, H, W, 3), got shape {video.shape}")
        b, views = video.shape[:2]
        features = self.encode_video(video.reshape(b * views, *video.shape[2:]), deterministic=deterministic)[0]
        return features.reshape(b, views, *features.shape[1:]).mean(axis=1)

    @_under_execution_policy
    def fused_cls(
        self, video: jnp.ndarray, ids: jnp.ndarray, mask: jnp.ndarray, *, deterministic: bool = True
    ) -> jnp.ndarray:
        """Fused text states (B, L, H) of Fuse(Swin(video), BERT(text)); [CLS] at position 0.
        `video` is (B, T, H, W, 3) or (B, V, T, H, W, 3) for V test views (see `video_features`)."""
        features = self.video_features(video, deterministic=deterministic)
        states, _ = self.encode_text(ids, mask, deterministic=deterministic)
        return self.fuse(features, states, mask, deterministic=deterministic)[1]

    @_under_execution_policy
    def qa_open_ended(
        self, video: jnp.ndarray, ids: jnp.ndarray, mask: jnp.ndarray, *, deterministic: bool = True,
        at_mask_token: bool = False,
    ) -> jnp.ndarray:
        """Answer logits (B, num_answers) from the fused [CLS] — or, for fill-in-the-blank
        (`at_mask_token=True`), from the fused state at the first [MASK] position of each question."""
        if not self.config.num_answers:
            raise ValueError("model.num_answers is 0: set it to the answer-vocabulary size for open-ended QA")
        fused = self.fused_cls(video, ids, mask, deterministic=deterministic)
        if at_mask_token:
            pos = jnp.argmax(ids == self.config.mask_token_id, axis=1)
            x = jnp.take_along_axis(fused, pos[:, None, None], axis=1)[:, 0]
        else:
            x = fused[:, 0]
        return self.qa_head(x, deterministic=deterministic).astype(jnp.float32)

    @_under_execution_policy
    def qa_multiple_choice(
        self, video: jnp.ndarray, option_ids: jnp.ndarray, option_mask: jnp.ndarray,
        *, deterministic: bool = True,
    ) -> jnp.ndarray:
        """Scores (B, K) of K option texts (B, K, L) per clip; softmax over K is the MC prediction.
        `video` may carry V test views (B, V, T, H, W, 3): their Swin features are averaged."""
        if not self.config.multiple_choice:
            raise ValueError("model.multiple_choice is False: enable it for multiple-choice QA")
        b, k, length = option_ids.shape
        video_features = self.video_features(video, deterministic=deterministic)
        states, _ = self.encode_text(option_ids.reshape(b * k, length), option_mask.reshape(b * k, length),
                                     deterministic=deterministic)
        feats = jnp.repeat(video_features, k, axis=0)
        fused = self.fuse(feats, states, option_mask.reshape(b * k, length), deterministic=deterministic)[1]
        return self.mc_head(fused[:, 0], deterministic=deterministic).reshape(b, k).astype(jnp.float32)

    @_under_execution_policy
    def initialize_all(self, batch: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
        """Touches every submodule (pre-training path plus configured QA heads) so `init` creates them all."""
        out = self(batch)
        if self.config.num_answers:
            out["qa_logits"] = self.qa_open_ended(batch["video"], batch["text_ids"], batch["text_mask"])
        if self.config.multiple_choice:
            out["mc_scores"] = self.qa_multiple_choice(
                batch["video"], batch["text_ids"][:, None], batch["text_mask"][:, None]
            )
        return out


def dummy_batch(config: CloverConfig, batch_size: int = 2, text_length: int = 8) -> dict[str, jnp.ndarray]:
    """Zero inputs of the shapes the pre-training forward takes (for init and eval_shape)."""
    hp, wp = config.token_grid
    ids = jnp.zeros((batch_size, text_length), jnp.int32)
    return dict(
        video=jnp.zeros((batch_size, config.num_frames, config.image_size, config.image_size, 3), jnp.float32),
        video_mask=jnp.zeros((batch_size, hp, wp), jnp.float32),
        text_ids=ids, text_ids_masked=ids, text_mask=jnp.ones_like(ids), mlm_labels=ids - 100,
    )


def init_params(config: CloverConfig, rng: jax.Array, batch: dict[str, jnp.ndarray] | None = None) -> Any:
    """Boxed (logically partitioned) parameters of Clover(config); use under jax.jit/eval_shape."""
    model = Clover(config)
    batch = dummy_batch(config) if batch is None else batch
    return model.init(rng, batch, method=Clover.initialize_all)["params"]


def abstract_params(config: CloverConfig) -> Any:
    """Unboxed parameter shapes of Clover(config), computed without allocating them."""
    return nn.unbox(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))


def count_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def main() -> None:
    """Runs the tiny pre-training forward under jit on random inputs and prints the output shapes."""
    config = clover_config("tiny")
    batch = dummy_batch(config, batch_size=2, text_length=16)
    rng = jax.random.key(0)
    batch["video"] = jax.random.normal(rng, batch["video"].shape)
    params = jax.jit(lambda r: nn.unbox(init_params(config, r)))(rng)
    out = jax.jit(lambda p, b: Clover(config).apply({"params": p}, b))(params, batch)
    print(f"Clover 'tiny': {count_params(params):,} parameters")
    for name in PRETRAIN_OUTPUTS:
        print(f"  {name:<11} {tuple(out[name].shape)}  mean|x|={float(jnp.abs(out[name]).mean()):.4f}")


if __name__ == "__main__":
    main()
