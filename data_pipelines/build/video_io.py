"""Decode a video/GIF/image file with PyAV into uint8 RGB frames at a fixed fps and short side.

`decode_video(path, cfg)` returns a `DecodedVideo` or raises `VideoDecodeError` whose `reason` is one
of `SKIP_REASONS`, so dataset builders can count skips by reason instead of stopping.

Frame-rate resampling works on presentation times: output slot k covers [k/fps, (k+1)/fps) from the
first frame's time; each slot takes the first source frame that falls in it, and a slot that no source
frame falls in (target fps above the source fps) repeats the previous frame. Frames are resized only
after they are kept, so decoding cost is that of the codec, not of the resize.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Literal

import av
import numpy as np

SKIP_REASONS = (
    "missing_file",
    "empty_file",
    "corrupt",
    "no_video_stream",
    "zero_frames",
    "too_few_frames",
    "truncated",
)

# A decode whose frames span less than this share of the container's stated duration is "truncated".
TRUNCATED_BELOW = 0.9

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class VideoDecodeError(Exception):
    """A media file that cannot give a clip; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, path: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.reason = reason
        self.path = path
        self.detail = detail
        super().__init__(f"{reason}: {path}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How to turn a media file into frames.

    fps: output frame rate; None keeps every decoded frame (and reports the source rate).
    short_side: resize so min(H, W) == short_side (aspect kept, sizes rounded to even); None keeps size.
    min_frames: clips with fewer frames after resampling follow `short_clip_policy`.
    short_clip_policy: "loop" tiles the clip, "pad" repeats the last frame, "fail" raises too_few_frames.
    max_frames: if set, longer clips are subsampled uniformly to this many frames (the reported fps
      drops accordingly, so timestamps stay right).
    threads: PyAV decoder threading ("AUTO" lets FFmpeg use frame/slice threads).
    truncated_policy: "skip" raises `truncated` when the decoded frames end well before the stated
      duration (a cut download) or the decoder fails after some frames; "keep" keeps the frames read.
    """

    fps: float | None = 4.0
    short_side: int | None = 256
    min_frames: int = 1
    short_clip_policy: Literal["loop", "pad", "fail"] = "loop"
    max_frames: int | None = None
    threads: bool = True
    truncated_policy: Literal["skip", "keep"] = "skip"

    def __post_init__(self):
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"DecodeConfig.fps must be > 0 or None, got {self.fps}")
        if self.short_side is not None and self.short_side < 2:
            raise ValueError(f"DecodeConfig.short_side must be >= 2 or None, got {self.short_side}")
        if self.min_frames < 1:
            raise ValueError(f"DecodeConfig.min_frames must be >= 1, got {self.min_frames}")
        if self.short_clip_policy not in ("loop", "pad", "fail"):
            raise ValueError(
                f"DecodeConfig.short_clip_policy must be 'loop', 'pad' or 'fail', got {self.short_clip_policy!r}"
            )
        if self.truncated_policy not in ("skip", "keep"):
            raise ValueError(f"DecodeConfig.truncated_policy must be 'skip' or 'keep', got {self.truncated_policy!r}")
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise ValueError(f"DecodeConfig.max_frames ({self.max_frames}) < min_frames ({self.min_frames})")


@dataclasses.dataclass
class DecodedVideo:
    """uint8 frames (T, H, W, 3) RGB at `fps`; `source_*` describe the file before resampling."""

    frames: np.ndarray
    fps: float
    source_fps: float
    source_frames: int
    source_size: tuple[int, int]  # (height, width)


def output_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(H, W) after scaling the short side to `short_side` (even sizes, as most codecs want)."""
    if short_side is None:
        return height, width
    scale = short_side / min(height, width)
    new_h = short_side if height <= width else max(2, int(round(height * scale / 2)) * 2)
    new_w = short_side if width < height else max(2, int(round(width * scale / 2)) * 2)
    return new_h, new_w


def _fit_length(frames: list[np.ndarray], cfg: DecodeConfig, path: str) -> list[np.ndarray]:
    """Applies min_frames (loop/pad/fail) and max_frames (uniform subsample)."""
    n = len(frames)
    if n < cfg.min_frames:
        if cfg.short_clip_policy == "fail":
            raise VideoDecodeError("too_few_frames", path, f"{n} < min_frames={cfg.min_frames}")
        if cfg.short_clip_policy == "loop":
            frames = [frames[i % n] for i in range(cfg.min_frames)]
        else:
            frames = frames + [frames[-1]] * (cfg.min_frames - n)
    if cfg.max_frames is not None and len(frames) > cfg.max_frames:
        keep = np.linspace(0, len(frames), cfg.max_frames, endpoint=False).astype(int)
        frames = [frames[i] for i in keep]
    return frames


def _stated_duration(container, stream) -> float | None:
    """Seconds the container says the video lasts (stream duration, else container duration), or None."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


class Frame:
    """One output frame of a `FrameStream`: decoded, converted to uint8 RGB (H, W, 3) only when `rgb()` is
    called (once; a frame repeated into several slots is the same object)."""

    def __init__(self, frame: "av.VideoFrame", height: int, width: int):
        self._frame, self._size, self._rgb = frame, (height, width), None

    def rgb(self) -> np.ndarray:
        if self._rgb is None:
            self._rgb = self._frame.reformat(width=self._size[1], height=self._size[0], format="rgb24").to_ndarray()
            self._frame = None
        return self._rgb


class FrameStream:
    """`decode_video`'s frames one at a time, before `_fit_length` (min_frames / max_frames): iterate it for
    `Frame`s in order, one per output slot; the same VideoDecodeError is raised, from the iteration (a
    truncated file only once the decoder reaches its end). After a full iteration `num_frames`, `fps`,
    `source_fps`, `source_frames` and `source_size` hold what decode_video reports."""

    def __init__(self, path: str | os.PathLike, cfg: DecodeConfig = DecodeConfig()):
        self.path, self.cfg = os.fspath(path), cfg
        self.num_frames = self.source_frames = 0
        self.fps = self.source_fps = 0.0
        self.source_size: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Frame]:
        path = self.path
        if not os.path.exists(path):
            raise VideoDecodeError("missing_file", path)
        if os.path.getsize(path) == 0:
            raise VideoDecodeError("empty_file", path)
        try:
            container = av.open(path, mode="r")
        except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
            raise VideoDecodeError("corrupt", path, str(e)) from None
        with container:
            yield from self._frames(container)

    def _frames(self, container: Any) -> Iterator[Frame]:
        path, cfg = self.path, self.cfg
        if not container.streams.video:
            raise VideoDecodeError("no_video_stream", path)
        stream = container.streams.video[0]
        if cfg.threads:
            stream.thread_type = "AUTO"
        is_image = path.lower().endswith(IMAGE_SUFFIXES)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        source_fps = float(rate) if rate else 0.0
        target_fps = cfg.fps if cfg.fps is not None else (source_fps or 1.0)
        kept = decoded = 0
        t0 = previous = None
        last_slot = -1
        size = None
        try:
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.height, frame.width)
                    out_h, out_w = output_size(frame.height, frame.width, cfg.short_side)
                if frame.time is not None:
                    t = float(frame.time)
                else:  # no timestamps (some AVI/GIF): fall back to the nominal rate
                    t = decoded / (source_fps or target_fps)
                decoded += 1
                if t0 is None:
                    t0 = t
                slot = int(math.floor((t - t0) * target_fps + 1e-6)) if cfg.fps is not None else decoded - 1
                if slot <= last_slot:
                    continue
                # Fill skipped slots (target fps above the source) with the previous frame.
                for _ in range(slot - last_slot - 1 if kept else 0):
                    kept += 1
                    yield previous
                previous = Frame(frame, out_h, out_w)
                kept += 1
                yield previous
                last_slot = slot
                if is_image:
                    break
        except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
            if not kept:
                raise VideoDecodeError("corrupt", path, str(e)) from None
            if cfg.truncated_policy == "skip":
                raise VideoDecodeError("truncated", path, f"decoder error after {decoded} frames: {e}") from None
        if not kept:
            raise VideoDecodeError("zero_frames", path)
        if cfg.truncated_policy == "skip" and not is_image and decoded > 1:
            stated = _stated_duration(container, stream)
            covered = (t - t0) + 1.0 / (source_fps or target_fps)
            if stated and covered < TRUNCATED_BELOW * stated:
                raise VideoDecodeError("truncated", path, f"frames cover {covered:.2f}s of the stated {stated:.2f}s")
        if not source_fps and decoded > 1 and t0 is not None:
            source_fps = decoded / max(t - t0, 1e-6)
        self.num_frames, self.fps, self.source_fps = kept, float(target_fps), source_fps
        self.source_frames, self.source_size = decoded, size


def estimate_num_frames(path: str | os.PathLike, cfg: DecodeConfig = DecodeConfig()) -> tuple[int, float] | None:
    """(frames, fps) a `FrameStream` of `path` gives, from the packets' timestamps (demuxed, not decoded);
    None where they cannot tell (no timestamps, an image, an unreadable file). An estimate: decoding may
    drop or fail on frames, so a reader checks it against the stream's `num_frames`."""
    path = os.fspath(path)
    if path.lower().endswith(IMAGE_SUFFIXES):
        return None
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            target_fps = cfg.fps if cfg.fps is not None else (float(rate) if rate else 1.0)
            pts = []
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's closing flush packet
                    continue
                if packet.pts is None or stream.time_base is None:
                    return None
                pts.append(packet.pts)
            if not pts:
                return None
            times = sorted(float(p * stream.time_base) for p in pts)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError):
        return None
    if cfg.fps is None:
        return len(times), target_fps
    return int(math.floor((times[-1] - times[0]) * target_fps + 1e-6)) + 1, target_fps


def decode_video(path: str | os.PathLike, cfg: DecodeConfig = DecodeConfig()) -> DecodedVideo:
    """Decodes `path` (MP4/AVI/WebM/MKV/GIF, or a JPEG/PNG image as a 1-frame clip).

    Raises VideoDecodeError with reason missing_file, empty_file, corrupt (container or decoder error
    before any frame), no_video_stream, zero_frames, too_few_frames (policy "fail"), or truncated
    (policy "skip": a decoder error after some frames, or frames spanning less than TRUNCATED_BELOW of
    the container's stated duration); under truncated_policy "keep" the frames already read are kept.
    `FrameStream` gives the same frames one at a time.
    """
    stream = FrameStream(path, cfg)
    kept = [frame.rgb() for frame in stream]
    frames = _fit_length(kept, cfg, stream.path)
    fps = stream.fps
    if cfg.max_frames is not None and len(kept) > cfg.max_frames:
        fps = stream.fps * len(frames) / len(kept)
    return DecodedVideo(frames=np.stack(frames), fps=float(fps), source_fps=stream.source_fps,
                        source_frames=stream.source_frames, source_size=stream.source_size)
