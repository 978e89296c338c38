"""A folder of a user's videos as model inputs: the file scan (with skips), clip windows, and test-time preprocessing.

`scan_videos(root)` lists the video files under a folder, recursively and sorted, with size and mtime;
symbolic links that leave the folder and unreadable files are skips (`SKIP_REASONS` of `video_io` plus
"outside_dir" and "unreadable"), counted as `prepare` counts its skips. `ClipReader` decodes a file with
`video_io.decode_video` (prepare's decode: fps, short side), cuts it into `clip_windows`, stores each
window's frames as the builder does (JPEG, `clip_examples.encode_frames`) and runs them through the eval
pipeline's own graph op (`tf_ops.decoded_video`, train=False): the same frames, crop, resize and
normalisation a prepared dataset's clips get in evaluation.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from data_pipelines.build.clip_examples import MEDIA_SUFFIXES, encode_frames
from data_pipelines.build.video_io import IMAGE_SUFFIXES, DecodeConfig, VideoDecodeError, decode_video
from data_pipelines.input.input_config import InputConfig

VIDEO_SUFFIXES = tuple(s for s in MEDIA_SUFFIXES if s not in IMAGE_SUFFIXES)
OUTSIDE = "outside_dir"
UNREADABLE = "unreadable"


@dataclasses.dataclass(frozen=True)
class VideoFile:
    """A file under the videos folder: its path relative to the folder, size and mtime (ns)."""

    path: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


@dataclasses.dataclass
class Scan:
    """The video files of a folder, and the paths refused before decoding (path -> reason)."""

    files: list[VideoFile]
    refused: dict[str, str]

    def refused_counts(self) -> collections.Counter:
        return collections.Counter(self.refused.values())


def _inside(root: str, path: str) -> bool:
    return os.path.realpath(path).startswith(os.path.join(root, ""))


def scan_videos(root: str | os.PathLike) -> Scan:
    """The files under `root` whose suffix `video_io` decodes as video, sorted by relative path. A symbolic
    link (file or folder) whose target lies outside `root` is refused as "outside_dir" and never opened
    (links inside are followed: their targets are indexed where they are); a file that cannot be opened
    for reading is "unreadable"."""
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise NotADirectoryError(f"--videos={root} is not a folder")
    files, refused = [], {}
    for dirpath, dirnames, names in os.walk(root):
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full) and not _inside(root, full):
                refused[os.path.relpath(full, root)] = OUTSIDE
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.splitext(name)[1].lower() not in VIDEO_SUFFIXES:
                continue
            if not _inside(root, full):
                refused[rel] = OUTSIDE
                continue
            try:
                with open(full, "rb"):
                    pass
                stat = os.stat(full)
            except OSError:
                refused[rel] = UNREADABLE
                continue
            files.append(VideoFile(rel, stat.st_size, stat.st_mtime_ns))
    files.sort(key=lambda f: f.path)
    return Scan(files, refused)


def clip_windows(num_frames: int, clip_seconds: float, fps: float) -> list[tuple[int, int]]:
    """[first, end) frame ranges of a video's clips: the whole video when `clip_seconds` <= 0, else
    round(duration / clip_seconds) (at least 1) equal windows, so no clip is shorter than half of
    `clip_seconds` or longer than 1.5 times it."""
    if clip_seconds <= 0 or num_frames <= 1:
        return [(0, num_frames)]
    count = max(1, int(num_frames / (clip_seconds * fps) + 0.5))
    bounds = np.round(np.linspace(0, num_frames, count + 1)).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclasses.dataclass
class Clip:
    """One clip of a video: its time range (seconds) and normalised frames (T, S, S, 3) float32."""

    start: float
    end: float
    video: np.ndarray


class ClipReader:
    """Decode + eval preprocessing of one video file into its clips (thread-safe: PyAV and TF release the GIL)."""

    def __init__(self, cfg: InputConfig, decode: DecodeConfig, clip_seconds: float, jpeg_quality: int):
        import tensorflow as tf

        from data_pipelines.input import tf_ops

        self.cfg, self.decode, self.clip_seconds, self.jpeg_quality = cfg, decode, clip_seconds, jpeg_quality
        spec = tf.TensorSpec([], tf.int32)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string), spec, spec, spec])
        def preprocess(frames, num_frames, height, width):
            ex = {"frames": frames, "num_frames": num_frames, "height": height, "width": width}
            # Eval sampling and the centre crop take no randomness; the seeds are placeholders.
            return tf_ops.decoded_video(ex, cfg, False, tf.zeros([3, 2], tf.int64))

        self._preprocess = preprocess

    def read(self, path: str | os.PathLike,
             windows: list[tuple[float, float]] | None = None) -> tuple[str | None, list[Clip]]:
        """(None, clips) or (skip reason, []). `windows` (seconds) picks clips by time (e.g. a search hit's);
        default: every clip of `clip_windows`."""
        try:
            decoded = decode_video(path, self.decode)
        except VideoDecodeError as err:
            return err.reason, []
        except OSError:
            return UNREADABLE, []
        frames, fps = decoded.frames, decoded.fps
        if windows is None:
            ranges = clip_windows(len(frames), self.clip_seconds, fps)
        else:
            ranges = [(int(round(s * fps)), max(int(round(s * fps)) + 1, int(round(e * fps)))) for s, e in windows]
        clips = []
        for first, end in ranges:
            part = frames[first:end] if first < len(frames) else frames[-1:]
            video = self._preprocess(encode_frames(part, self.jpeg_quality), len(part), part.shape[1], part.shape[2])
            clips.append(Clip(round(first / fps, 3), round(first / fps + len(part) / fps, 3), np.asarray(video)))
        return None, clips


def clip_settings(cfg: InputConfig, decode: DecodeConfig, clip_seconds: float, jpeg_quality: int) -> dict[str, Any]:
    """The preprocessing settings that fix a clip's model input (hashed into an index's identity)."""
    return dict(num_frames=cfg.num_frames, image_size=cfg.image_size, eval_crop=cfg.eval_crop,
                resize_method=cfg.resize_method, mean=list(cfg.mean), std=list(cfg.std),
                channel_order=cfg.channel_order, num_views=cfg.num_views, fps=decode.fps,
                short_side=decode.short_side, truncated_policy=decode.truncated_policy,
                clip_seconds=clip_seconds, jpeg_quality=jpeg_quality)


def relative_inside(root: str | os.PathLike, rel: str) -> pathlib.Path:
    """`root/rel`, refusing a manifest path that would leave `root` (a hand-edited manifest)."""
    base = os.path.realpath(root)
    full = os.path.normpath(os.path.join(base, rel))
    if not full.startswith(os.path.join(base, "")):
        raise ValueError(f"the index names {rel!r}, which lies outside its videos folder {base}")
    return pathlib.Path(full)
