"""Procedural video-text dataset: coloured shapes that move, with captions drawn from the same attributes.

Each clip shows `count` (1–3) copies of one shape in one colour, all doing one motion (move
left/right/up/down, bounce, spin, stay still). Captions are generated from those attributes with
several templates ("two red circles move to the left", "a blue square is bouncing up and down"), so text→video
retrieval is learnable and captions hold nouns and verbs for semantic masking. Per-clip attributes
(colour, shape, count, motion) are kept as metadata for QA-style questions.

Everything is a pure function of (seed, split, index): `clip_spec` draws the attributes,
`render_clip` draws uint8 frames, `captions_for` picks the captions. `ensure_synthetic` writes the
clips once as lossless MP4 (H.264 4:4:4, so decoded frames are reproducible) plus one JSONL annotation
file per split into a cache folder, and reuses them afterwards; `build_synthetic` then runs them
through the same TFDS builder as real data (`data_pipelines.build.builder`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 235),
    "yellow": (235, 220, 30),
    "white": (240, 240, 240),
    "purple": (150, 40, 200),
}
SHAPES = ("square", "circle", "triangle", "cross", "diamond")
MOTIONS = ("left", "right", "up", "down", "bounce", "spin", "still")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SPLIT_IDS = {"train": 0, "test": 1, "val": 2}

# (plural verb, singular verb, participle) per motion; phrased so that spaCy's small English model
# tags the verbs as VERB (bare "bounces"/"spins" after a noun are often tagged NOUN).
MOTION_PHRASES = {
    "left": ("move to the left", "moves to the left", "moving to the left"),
    "right": ("move to the right", "moves to the right", "moving to the right"),
    "up": ("move upwards", "moves upwards", "moving upwards"),
    "down": ("move downwards", "moves downwards", "moving downwards"),
    "bounce": ("bounce up and down", "bounces up and down", "bouncing up and down"),
    "spin": ("spin around", "spins around", "spinning around"),
    "still": ("stay in place", "stays in place", "staying in place"),
}
BACKGROUND = (16, 16, 24)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the synthetic dataset; `seed` fixes every clip, caption and file byte."""

    seed: int = 0
    num_train: int = 256
    num_test: int = 64
    num_frames: int = 16
    size: int = 64
    fps: float = 8.0
    captions_per_clip: int = 3

    def __post_init__(self):
        if self.size < 32:
            raise ValueError(f"SyntheticConfig.size must be >= 32 pixels, got {self.size}")
        if self.num_frames < 2:
            raise ValueError(f"SyntheticConfig.num_frames must be >= 2, got {self.num_frames}")
        if not 1 <= self.captions_per_clip <= len(TEMPLATES):
            raise ValueError(f"captions_per_clip must be in [1, {len(TEMPLATES)}], got {self.captions_per_clip}")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "test": self.num_test}

    def fingerprint(self) -> str:
        """Short hash naming the cache folder, so another config never reuses stale files."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    count: int
    motion: str
    positions: tuple[tuple[float, float], ...]  # start centres, fractions of the frame (x, y)
    scale: float  # object radius as a fraction of the frame size
    caption_templates: tuple[int, ...]

    def attributes(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "count": self.count, "motion": self.motion}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def _caption(template: int, spec: ClipSpec) -> str:
    plural = spec.count > 1
    noun = _plural(spec.shape) if plural else spec.shape
    verb_plural, verb_singular, participle = MOTION_PHRASES[spec.motion]
    verb = verb_plural if plural else verb_singular
    be = "are" if plural else "is"
    det = COUNT_WORDS[spec.count] if plural else "a"
    colour = spec.colour
    count = COUNT_WORDS[spec.count]
    if template == 0:  # "two red circles move to the left"
        return f"{det} {colour} {noun} {verb}"
    if template == 1:  # "a blue square is bouncing up and down"
        return f"{det} {colour} {noun} {be} {participle}"
    if template == 2:
        return f"there {be} {count} {colour} {noun} {participle}"
    if template == 3:
        return f"{det} {noun} that {be} {colour} {be} {participle}"
    if template == 4:
        return f"we can see {count} {colour} {noun} {participle}"
    raise ValueError(f"unknown caption template {template}")


TEMPLATES = (0, 1, 2, 3, 4)


def clip_spec(seed: int, split: str, index: int, cfg: SyntheticConfig) -> ClipSpec:
    """Attributes of clip `index` of `split`: a pure function of (seed, split, index)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_IDS)}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    colour = str(rng.choice(list(COLOURS)))
    motion = str(rng.choice(MOTIONS))
    shapes = [s for s in SHAPES if not (motion == "spin" and s == "circle")]  # a spinning circle looks still
    shape = str(rng.choice(shapes))
    count = int(rng.integers(1, 4))
    scale = float(rng.uniform(0.09, 0.12))
    # Objects sit on slots across the axis perpendicular to the motion (x for vertical motions).
    vertical = motion in ("up", "down", "bounce")
    slots = (np.arange(count) + 1) / (count + 1) + rng.uniform(-0.04, 0.04, count)
    along = {"left": 0.75, "right": 0.25, "up": 0.75, "down": 0.25, "bounce": 0.72}.get(motion, 0.5)
    along += float(rng.uniform(-0.05, 0.05))
    positions = tuple((float(s), along) if vertical else (along, float(s)) for s in slots)
    templates = tuple(int(t) for t in rng.permutation(len(TEMPLATES))[: cfg.captions_per_clip])
    return ClipSpec(colour, shape, count, motion, positions, scale, templates)


def captions_for(spec: ClipSpec) -> list[str]:
    return [_caption(t, spec) for t in spec.caption_templates]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Inside-test in object coordinates (u right, v up), radius r."""
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= r * 0.85
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "diamond":
        return abs(u) + abs(v) <= r * 1.1
    if shape == "cross":
        arm = r / 3
        return ((abs(u) <= arm) & (abs(v) <= r)) | ((abs(v) <= arm) & (abs(u) <= r))
    if shape == "triangle":  # equilateral, apex up: three half-planes at distance 0.7 r
        inside = np.ones_like(u, bool)
        for angle in (-90.0, 30.0, 150.0):
            a = math.radians(angle)
            inside &= u * math.cos(a) + v * math.sin(a) <= r * 0.7
        return inside
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(spec: ClipSpec, cfg: SyntheticConfig) -> np.ndarray:
    """uint8 (T, size, size, 3) frames of `spec`."""
    n, size = cfg.num_frames, cfg.size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = spec.scale * size
    travel = 0.5
    frames = np.empty((n, size, size, 3), np.uint8)
    colour = np.array(COLOURS[spec.colour], np.uint8)
    for t in range(n):
        phase = t / (n - 1)
        frame = np.empty((size, size, 3), np.uint8)
        frame[...] = BACKGROUND
        dx = dy = 0.0
        angle = 0.0
        if spec.motion == "left":
            dx = -travel * phase
        elif spec.motion == "right":
            dx = travel * phase
        elif spec.motion == "up":
            dy = -travel * phase
        elif spec.motion == "down":
            dy = travel * phase
        elif spec.motion == "bounce":
            dy = -0.45 * abs(math.sin(2 * math.pi * phase))
        elif spec.motion == "spin":
            angle = 2 * math.pi * phase
        for px, py in spec.positions:
            cx, cy = (px + dx) * size, (py + dy) * size
            u, v = xs - cx, cy - ys
            cu, sv = math.cos(angle), math.sin(angle)
            inside = _shape_mask(spec.shape, cu * u + sv * v, -sv * u + cu * v, r)
            frame[inside] = colour
        frames[t] = frame
    return frames


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Lossless H.264 (qp 0, 4:4:4) MP4 written by single-threaded x264.

    Decoded frames are a pure function of `frames`. The bytes may still differ between processes:
    x264's floating-point mode decisions see the FPU state, which TensorFlow changes (flush-to-zero).
    """
    # bitexact: no creation time or encoder version in the file, so equal frames give equal bytes.
    with av.open(os.fspath(path), mode="w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"
        stream.options = {"qp": "0", "preset": "veryfast"}
        stream.codec_context.thread_count = 1  # x264 frame threads make the bytes run-dependent
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@dataclasses.dataclass(frozen=True)
class SyntheticFiles:
    """Where `ensure_synthetic` put things: media folder and one JSONL per split."""

    root: pathlib.Path
    media_dir: pathlib.Path
    annotations: dict[str, pathlib.Path]


def ensure_synthetic(cache_dir: str | os.PathLike, cfg: SyntheticConfig = SyntheticConfig()) -> SyntheticFiles:
    """Writes the clips and annotations under cache_dir/synthetic_<fingerprint>/ unless already there.

    JSONL rows: {"video": "<split>/<id>.mp4", "text": [captions], "colour", "shape", "count",
    "motion", "video_id"}; `annotations.read_generic_jsonl` reads them (attributes land in `extra`).
    A finished folder carries a `DONE` marker, so an interrupted run is redone, never half-used.
    """
    root = pathlib.Path(cache_dir) / f"synthetic_{cfg.fingerprint()}"
    media = root / "media"
    annotations = {split: root / f"annotations_{split}.jsonl" for split in cfg.split_sizes()}
    if (root / "DONE").exists():
        return SyntheticFiles(root, media, annotations)
    for split, num in cfg.split_sizes().items():
        (media / split).mkdir(parents=True, exist_ok=True)
        with open(annotations[split], "w", encoding="utf-8") as f:
            for index in range(num):
                spec = clip_spec(cfg.seed, split, index, cfg)
                video_id = f"synthetic_{split}_{index:05d}"
                relpath = f"{split}/{video_id}.mp4"
                write_mp4(media / relpath, render_clip(spec, cfg), cfg.fps)
                row = {"video": relpath, "text": captions_for(spec), "video_id": video_id, **spec.attributes()}
                f.write(json.dumps(row) + "\n")
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    (root / "DONE").write_text("ok\n")
    return SyntheticFiles(root, media, annotations)


def build_synthetic(
    cache_dir: str | os.PathLike,
    cfg: SyntheticConfig = SyntheticConfig(),
    build_cfg=None,
) -> pathlib.Path:
    """Generates (if needed) and builds the synthetic dataset; returns the TFDS dataset folder.

    `build_cfg` is a `builder.BuildConfig` (default: decode at the synthetic fps and size, so frames
    are stored as drawn).
    """
    from data_pipelines.build import builder, caption_readers
    from data_pipelines.build.video_io import DecodeConfig

    files = ensure_synthetic(cache_dir, cfg)
    if build_cfg is None:
        build_cfg = builder.BuildConfig(decode=DecodeConfig(fps=cfg.fps, short_side=cfg.size))
    records = {split: caption_readers.read_generic_jsonl(path, split=split)
               for split, path in files.annotations.items()}
    return builder.build_dataset(
        name=f"synthetic_{cfg.fingerprint()}",
        records=records,
        media_dir=files.media_dir,
        data_dir=pathlib.Path(cache_dir) / "tfds",
        cfg=build_cfg,
        on_other_key="rebuild",  # derived data: a cache made with other settings is simply remade
    ).data_dir
