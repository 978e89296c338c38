"""One clip's TFDS example from one record: media lookup inside the media folder, captions, frames, tags.

Shared by the single-process builder and the Beam pipeline, so both write the same examples. A clip
is keyed by its id (`clip_id`); records sharing an id within a split are merged (`merge_records`,
captions united) before they become one example.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from data_pipelines.build.annotation_rows import VideoText, clean_caption_text
from data_pipelines.build.video_io import DecodeConfig, VideoDecodeError, decode_video

logger = logging.getLogger(__name__)

TAG_KEYS = ("word_start", "word_end", "candidate", "stop")
MEDIA_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".gif", ".m4v", ".jpg", ".jpeg", ".png")


def clean_captions(captions: Sequence[Any], max_chars: int) -> tuple[list[str], collections.Counter, int]:
    """(kept captions, dropped-by-reason, number truncated).

    Drops captions that are not text, not UTF-8, or empty once control and zero-width characters are
    removed; whitespace runs become one space; captions longer than `max_chars` are cut at the last
    space before the limit (when it lies in the second half) and counted.
    """
    kept, dropped, truncated = [], collections.Counter(), 0
    for caption in captions:
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                dropped["non_utf8"] += 1
                continue
        if not isinstance(caption, str):
            dropped["not_text"] += 1
            continue
        try:
            caption.encode("utf-8")  # lone surrogates (e.g. from surrogateescape) are not UTF-8
        except UnicodeEncodeError:
            dropped["non_utf8"] += 1
            continue
        caption = " ".join(clean_caption_text(caption).split())
        if not caption:
            dropped["empty"] += 1
            continue
        if len(caption) > max_chars:
            cut = caption[:max_chars]
            space = cut.rfind(" ")
            caption = cut[:space] if space > max_chars // 2 else cut
            truncated += 1
        kept.append(caption)
    return kept, dropped, truncated


def clip_id(record: VideoText) -> str:
    """The id a record's example is stored under: extra["video_id"], else the file stem of `video`."""
    return str(record.extra.get("video_id") or pathlib.Path(record.video).stem or record.video)


def merge_records(indexed: Iterable[tuple[int, VideoText]]) -> tuple[int, VideoText]:
    """One (first row index, record) for records that share a clip id: the first record's video and
    extra, with the captions of all of them in row order, each distinct caption once."""
    ordered = sorted(indexed, key=lambda item: item[0])
    index, first = ordered[0]
    captions = list(first.captions)
    seen = set(captions)
    for _, other in ordered[1:]:
        for caption in other.captions:
            if caption not in seen:
                seen.add(caption)
                captions.append(caption)
    return index, dataclasses.replace(first, captions=captions)


def merge_duplicates(records: Sequence[VideoText]) -> tuple[list[tuple[int, VideoText]], int]:
    """(first row index, merged record) per distinct clip id in first-seen order, and how many rows
    were merged into an earlier one."""
    groups: dict[str, list[tuple[int, VideoText]]] = {}
    for index, record in enumerate(records):
        groups.setdefault(clip_id(record), []).append((index, record))
    return [merge_records(group) for group in groups.values()], len(records) - len(groups)


class MediaIndex:
    """Finds a record's media file inside a folder: extra["relpath"], the id as a relative path, or a
    unique file whose stem is the id (searched recursively once, e.g. msvd/{clips,gifs}/<id>.*).

    Paths that leave the folder (absolute ones elsewhere, or with `..` reaching above it) are refused:
    `locate` returns the reason "outside_media" and the file is never opened. The check is on the path as
    written, so symbolic links placed inside the folder are followed.
    """

    def __init__(self, media_dir: str | os.PathLike):
        self.root = pathlib.Path(os.path.abspath(media_dir))
        if not self.root.is_dir():
            raise FileNotFoundError(f"media folder {self.root} does not exist")
        self._by_stem: dict[str, str] | None = None

    def _stems(self) -> dict[str, str]:
        if self._by_stem is None:
            by_stem: dict[str, str] = {}
            for dirpath, _, names in os.walk(self.root):
                for name in sorted(names):
                    stem, suffix = os.path.splitext(name)
                    if suffix.lower() in MEDIA_SUFFIXES:
                        by_stem.setdefault(stem, os.path.join(dirpath, name))
            self._by_stem = by_stem
        return self._by_stem

    def _inside(self, rel: str) -> pathlib.Path | None:
        path = os.path.normpath(os.path.join(self.root, rel))  # an absolute `rel` stays as it is
        return pathlib.Path(path) if path.startswith(os.path.join(os.fspath(self.root), "")) else None

    def locate(self, record: VideoText) -> tuple[str | None, str | None]:
        """(path, None), or (None, "outside_media" | "missing_file")."""
        outside = False
        for rel in (record.extra.get("relpath"), record.video):
            if rel:
                path = self._inside(str(rel))
                if path is None:
                    outside = True
                elif path.is_file():
                    return str(path), None
        if outside:
            return None, "outside_media"
        found = self._stems().get(pathlib.Path(record.video).stem if "/" in record.video else record.video)
        return (found, None) if found else (None, "missing_file")

    def resolve(self, record: VideoText) -> str | None:
        """The media path of `record`, or None (missing, or outside the folder)."""
        return self.locate(record)[0]


@functools.lru_cache(maxsize=4)
def media_index(media_dir: str) -> MediaIndex:
    """One MediaIndex per folder and process (its stem listing is walked once)."""
    return MediaIndex(media_dir)


@functools.lru_cache(maxsize=2)
def tagger(name: str):
    """The spaCy pipeline `name`, loaded once per process."""
    from data_pipelines.build import text_tags

    return text_tags.load_tagger(name)


def encode_frames(frames: np.ndarray, quality: int) -> list[bytes]:
    import tensorflow as tf

    return [tf.io.encode_jpeg(f, quality=quality, chroma_downsampling=True).numpy() for f in frames]


def decode_clip(path: str, decode: DecodeConfig, jpeg_quality: int) -> tuple[str | None, dict | None]:
    """(skip reason, None) or (None, the clip's frame fields: JPEG frames, fps, num_frames, height, width)."""
    try:
        video = decode_video(path, decode)
    except VideoDecodeError as e:
        logger.info("skipping %s", e)
        return e.reason, None
    t, h, w, _ = video.frames.shape
    return None, {
        "frames": encode_frames(video.frames, jpeg_quality),
        "fps": np.float32(video.fps),
        "num_frames": np.int32(t),
        "height": np.int32(h),
        "width": np.int32(w),
    }


def example_fields(record: VideoText, captions: list[str], clip: dict, nlp, tag_rule: str) -> dict:
    """The TFDS example of a decoded clip: its frames fields, captions, their word tags (`tag_rule`) and metadata."""
    from data_pipelines.build import text_tags

    tags = text_tags.tag_captions(captions, nlp, rule=tag_rule) if nlp is not None and captions else []
    if not tags:
        tags = [{k: np.zeros(0, np.int32) for k in TAG_KEYS} for _ in captions]
    return {
        "video_id": clip_id(record),
        **clip,
        "captions": captions,
        "num_captions": np.int32(len(captions)),
        **{k: [t[k].astype(np.int32) for t in tags] for k in TAG_KEYS},
        "metadata": json.dumps(record.extra, sort_keys=True, default=str),
    }


def example_key(index: int) -> str:
    """The TFDS key of the example whose first annotation row is `index` (fixes the shard order)."""
    return f"{index:010d}"
