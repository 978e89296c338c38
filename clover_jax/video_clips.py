"""A folder of a user's videos as model inputs: the file scan (with skips), clip windows, and test-time preprocessing.

`scan_videos(root)` lists the video files under a folder, recursively and sorted, with size and mtime
(`with_digests` adds a blake2b digest of each file's bytes);
symbolic links that leave the folder and unreadable files are skips (`SKIP_REASONS` of `video_io` plus
"outside_dir" and "unreadable"), counted as `prepare` counts its skips. `ClipReader` streams a file through
`video_io.FrameStream` (prepare's decode: fps, short side), cuts it into `clip_windows`, stores the frames
each window's eval sampling takes as the builder does (JPEG, `clip_examples.encode_frames`) and runs them
through the eval pipeline's own graph op (`tf_ops.decoded_video`, train=False): the same frames, crop,
resize and normalisation a prepared dataset's clips get in evaluation, without the whole video in memory.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Callable

import numpy as np

from data_pipelines.build.clip_examples import MEDIA_SUFFIXES, encode_frames
from data_pipelines.build.video_io import (
    IMAGE_SUFFIXES,
    DecodeConfig,
    FrameStream,
    VideoDecodeError,
    decode_video,
    estimate_num_frames,
)
from data_pipelines.input.input_config import InputConfig

VIDEO_SUFFIXES = tuple(s for s in MEDIA_SUFFIXES if s not in IMAGE_SUFFIXES)
OUTSIDE = "outside_dir"
UNREADABLE = "unreadable"


@dataclasses.dataclass(frozen=True)
class VideoFile:
    """A file under the videos folder: its path relative to the folder, size, mtime (ns) and content digest
    (`file_digest`; "" until `with_digests` reads the file)."""

    path: str
    size: int
    mtime_ns: int
    digest: str = ""

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


def file_digest(path: str | os.PathLike) -> str:
    """blake2b (32 hex digits) of the file's bytes, read in 1 MiB pieces; "" when it cannot be read."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def with_digests(root: str | os.PathLike, files: list[VideoFile], workers: int) -> list[VideoFile]:
    """`files` with their content digests, `workers` files read at a time."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        digests = pool.map(lambda f: file_digest(os.path.join(root, f.path)), files)
        return [dataclasses.replace(f, digest=d) for f, d in zip(files, digests)]


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
    """One clip of a video: its time range (seconds) and the frames eval sampling takes, as JPEGs (the other
    frames are empty strings); `video` preprocesses them when asked, so the clips of a long video wait in
    memory compressed."""

    start: float
    end: float
    jpegs: list[bytes]
    height: int
    width: int
    preprocess: Callable = dataclasses.field(repr=False)

    @property
    def video(self) -> np.ndarray:
        """The normalised frames (T, S, S, 3) float32 that the model embeds."""
        return np.asarray(self.preprocess(self.jpegs, len(self.jpegs), self.height, self.width))


class ClipReader:
    """Decode + eval preprocessing of one video file into its clips (thread-safe: PyAV and TF release the GIL).

    The file is streamed (`video_io.FrameStream`): the frame count comes from the packets' timestamps (checked
    against the decode, which is redone with the true count when they differ), and of each clip window only
    the frames eval sampling takes are converted and kept (as the JPEGs a prepared dataset stores), so memory
    holds a few frames per window, however long the video."""

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
        self._sampled = tf.function(lambda n: tf_ops.eval_frame_indices(n, cfg), input_signature=[spec])

    def _ranges(self, num_frames: int, fps: float, windows: list[tuple[float, float]] | None
                ) -> list[tuple[int, int, int]]:
        """(first, frames start, frames end) of each clip: its first frame (its start time) and the frames it
        takes, [first, end) cut at the video's end; a window past the end takes the last frame alone."""
        if windows is None:
            return [(a, a, b) for a, b in clip_windows(num_frames, self.clip_seconds, fps)]
        ranges = [(int(round(s * fps)), max(int(round(s * fps)) + 1, int(round(e * fps)))) for s, e in windows]
        return [(a, a, min(b, num_frames)) if a < num_frames else (a, num_frames - 1, num_frames) for a, b in ranges]

    def _clip(self, first: int, length: int, fps: float, jpegs: list[bytes], height: int, width: int) -> Clip:
        return Clip(round(first / fps, 3), round(first / fps + length / fps, 3), jpegs, height, width,
                    self._preprocess)

    def read(self, path: str | os.PathLike, windows: list[tuple[float, float]] | None = None,
             stats: dict[str, int] | None = None) -> tuple[str | None, list[Clip]]:
        """(None, clips) or (skip reason, []). `windows` (seconds) picks clips by time (e.g. a search hit's);
        default: every clip of `clip_windows`. `stats`, when given, gets `passes` (decodes of the file) and
        `peak_frames` (the most decoded frames held at once)."""
        stats = {} if stats is None else stats
        stats.update(passes=0, peak_frames=0)
        try:
            if self.decode.max_frames is not None or self.decode.min_frames > 1:
                return None, self._read_whole(path, windows)  # the length is refit once all frames are read
            known = estimate_num_frames(path, self.decode)
            if known is None:  # counted by a decode that keeps no frame
                stream = FrameStream(path, self.decode)
                stats["passes"] += 1
                for _ in stream:
                    pass
                known = (stream.num_frames, stream.fps)
            for _ in range(2):  # a second pass with the count the first one found, where the estimate was off
                clips, found = self._stream(path, windows, known, stats)
                if found == known:
                    return None, clips
                known = found
            return None, self._read_whole(path, windows)
        except VideoDecodeError as err:
            return err.reason, []
        except OSError:
            return UNREADABLE, []

    def _stream(self, path: str | os.PathLike, windows: list[tuple[float, float]] | None,
                known: tuple[int, float], stats: dict[str, int]) -> tuple[list[Clip], tuple[int, float]]:
        """The clips of `path` for a video of `known` (frames, fps), in one pass; and the (frames, fps) found."""
        num_frames, fps = known
        ranges = self._ranges(num_frames, fps, windows)
        wanted: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)  # frame -> (clip, its offset)
        last = []
        for n, (_, start, end) in enumerate(ranges):
            positions = np.asarray(self._sampled(end - start))
            for index in sorted(set((start + positions).tolist())):
                wanted[index].append((n, index - start))
            last.append(start + int(positions.max()))
        jpegs: dict[int, list[bytes]] = {}
        clips: list[Clip | None] = [None] * len(ranges)
        size = (0, 0)
        stream = FrameStream(path, self.decode)
        stats["passes"] += 1
        for index, frame in enumerate(stream):
            if index not in wanted:
                continue
            rgb = frame.rgb()
            size = rgb.shape[:2]
            (jpeg,) = encode_frames(rgb[None], self.jpeg_quality)
            del rgb
            for n, position in wanted[index]:
                jpegs.setdefault(n, [b""] * (ranges[n][2] - ranges[n][1]))[position] = jpeg
            stats["peak_frames"] = max(stats["peak_frames"], sum(len({id(j) for j in v if j}) for v in jpegs.values()))
            for n in [n for n in jpegs if last[n] == index]:
                # Frames eval sampling skips stay empty strings: the preprocessing never decodes them.
                first, start, end = ranges[n]
                clips[n] = self._clip(first, end - start, fps, jpegs.pop(n), *size)
        found = (stream.num_frames, stream.fps)
        if found != known or any(c is None for c in clips):
            return [], found
        return clips, found

    def _read_whole(self, path: str | os.PathLike, windows: list[tuple[float, float]] | None) -> list[Clip]:
        """The clips from a whole-file `decode_video` (every frame in memory): the reference `read` streams."""
        decoded = decode_video(path, self.decode)
        frames, fps = decoded.frames, decoded.fps
        clips = []
        for first, start, end in self._ranges(len(frames), fps, windows):
            part = frames[start:end]
            clips.append(self._clip(first, len(part), fps, encode_frames(part, self.jpeg_quality),
                                    part.shape[1], part.shape[2]))
        return clips


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
