"""The builder as an Apache Beam pipeline: record files in, one clip per element, counters out.

The driver streams the annotation records into JSONL record files (`write_record_files`, one row per
line with its row index), so no worker holds a whole annotation file. The pipeline reads those lines,
groups rows by clip id (merging duplicates, as the in-process builder does), spreads the clips over
the workers and turns each into the same TFDS example as the in-process builder
(`clip_examples`). Skip reasons and caption counts are Beam counters (namespace `clover_build`); after
the run they fill the build summary (`add_counters`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pathlib
import re
import sys
from typing import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from data_pipelines.build import clip_examples
from data_pipelines.build.annotation_rows import VideoText

NAMESPACE = "clover_build"
RUNNER_NAMES = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner",
                "spark": "SparkRunner", "portable": "PortableRunner"}


def write_record_files(records: Iterable[VideoText], folder: pathlib.Path, split: str,
                       rows_per_file: int) -> str:
    """Streams `records` into `folder/{split}-NNNNN.jsonl` files of `rows_per_file` rows; returns their
    glob pattern ("" when there was no record)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = None
    count = 0
    try:
        for index, record in enumerate(records):
            if index % rows_per_file == 0:
                if out is not None:
                    out.close()
                out = open(folder / f"{split}-{index // rows_per_file:05d}.jsonl", "w", encoding="utf-8",
                           errors="surrogateescape")
            row = {"index": index, "video": record.video, "captions": list(record.captions),
                   "split": record.split, "extra": record.extra}
            out.write(json.dumps(row, default=str) + "\n")
            count += 1
    finally:
        if out is not None:
            out.close()
    return str(folder / f"{split}-*.jsonl") if count else ""


def pipeline_options(beam_cfg) -> PipelineOptions:
    """Pipeline options of a `builder.BeamConfig`: the runner, DirectRunner's worker processes, extra flags."""
    runner = RUNNER_NAMES.get(beam_cfg.runner.lower(), beam_cfg.runner)
    flags = [f"--runner={runner}", *beam_cfg.pipeline_options]
    if runner == "DirectRunner":
        flags += ["--direct_running_mode=multi_processing", f"--direct_num_workers={beam_cfg.workers}",
                  "--default_sdk_harness_log_level=WARNING"]
    return PipelineOptions(flags)


@contextlib.contextmanager
def stderr_to(path: pathlib.Path) -> Iterator[None]:
    """Sends this process's stderr file descriptor, which DirectRunner's worker processes inherit, to
    `path` while the pipeline runs (their log lines and tracebacks otherwise flood the terminal)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def let_local_workers_import_this_repo() -> None:
    """Puts this repository on PYTHONPATH, which DirectRunner's worker processes inherit. (Cluster
    runners need the code shipped to their workers: a container image or `--setup_file`, see README.)"""
    repo = str(pathlib.Path(__file__).resolve().parents[2])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if repo not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, paths)])


def _counter(name: str) -> None:
    Metrics.counter(NAMESPACE, name).inc()


def _parse_row(line: str) -> tuple[str, tuple[int, VideoText]]:
    row = json.loads(line)
    record = VideoText(row["video"], row["captions"], row["split"], row["extra"])
    return clip_examples.clip_id(record), (row["index"], record)


def _merge_group(keyed: tuple[str, Iterable[tuple[int, VideoText]]], split: str) -> tuple[int, VideoText]:
    rows = list(keyed[1])
    if len(rows) > 1:
        Metrics.counter(NAMESPACE, f"{split}/duplicates_merged").inc(len(rows) - 1)
    return clip_examples.merge_records(rows)


class _ClipToExample(beam.DoFn):
    """(row index, merged record) -> (key, example), or nothing with the skip reason counted."""

    def __init__(self, split: str, media_dir: str, cfg):
        self._split, self._media_dir, self._cfg = split, media_dir, cfg

    def setup(self):
        self._media = clip_examples.media_index(self._media_dir)
        self._nlp = clip_examples.tagger(self._cfg.tagger) if self._cfg.tagger else None

    def process(self, item: tuple[int, VideoText]) -> Iterator[tuple[str, dict]]:
        index, record = item
        cfg, split = self._cfg, self._split
        _counter(f"{split}/seen")
        captions, dropped, truncated = clip_examples.clean_captions(record.captions, cfg.max_caption_chars)
        for reason, n in dropped.items():
            Metrics.counter(NAMESPACE, f"captions_dropped/{reason}").inc(n)
        if truncated:
            Metrics.counter(NAMESPACE, "captions_truncated").inc(truncated)
        reason, clip = ("no_captions", None) if cfg.require_captions and not captions else (None, None)
        if reason is None:
            path, reason = self._media.locate(record)
            if reason is None:
                reason, clip = clip_examples.decode_clip(path, cfg.decode, cfg.jpeg_quality)
        if reason is not None:
            # A warning, so that the worker log names the clips of a split that fails with no example.
            logging.getLogger(__name__).warning("skipped (%s): %s", reason, record.video)
            _counter(f"skipped/{reason}")
            _counter(f"{split}/skipped")
            return
        _counter(f"{split}/written")
        Metrics.counter(NAMESPACE, "captions_written").inc(len(captions))
        fields = clip_examples.example_fields(record, captions, clip, self._nlp, cfg.tag_rule)
        yield clip_examples.example_key(index), fields


def clip_examples_transform(split: str, pattern: str, media_dir: str, cfg) -> beam.PTransform:
    """The PTransform TFDS applies for `split`: record files matching `pattern` -> (key, example)."""

    @beam.ptransform_fn
    def _examples(pipeline):
        return (
            pipeline
            | f"Read{split}" >> beam.io.ReadFromText(pattern)
            | f"ById{split}" >> beam.Map(_parse_row)
            | f"Group{split}" >> beam.GroupByKey()
            | f"Merge{split}" >> beam.Map(_merge_group, split=split)
            | f"Spread{split}" >> beam.Reshuffle()
            | f"Clip{split}" >> beam.ParDo(_ClipToExample(split, media_dir, cfg))
        )

    return _examples()


def _counters(result) -> dict[str, int]:
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    values: dict[str, int] = collections.Counter()
    for counter in found:
        value = counter.committed if counter.committed is not None else counter.attempted
        values[counter.key.metric.name] += int(value or 0)
    return values


def add_counters(result, summary) -> None:
    """Adds the pipeline's counters into a `builder.BuildSummary`."""
    for name, value in _counters(result).items():
        head, _, tail = name.partition("/")
        if head == "skipped":
            summary.skipped[tail] += value
        elif head == "captions_dropped":
            summary.captions_dropped[tail] += value
        elif name == "captions_truncated":
            summary.captions_truncated += value
        elif name == "captions_written":
            summary.captions_written += value
        elif tail == "seen":
            summary.clips_seen[head] += value
        elif tail == "written":
            summary.clips_written[head] += value
        elif tail == "duplicates_merged":
            summary.duplicates_merged[head] += value


def skipped_in(result, split: str) -> int:
    """Clips of `split` the pipeline skipped."""
    return _counters(result).get(f"{split}/skipped", 0)


_NO_EXAMPLES = re.compile(r"total number of generated examples is 0 for split (\S+?)\.")


def split_without_examples(err: BaseException) -> str | None:
    """The split named by TFDS's Beam writer when it failed a pipeline because a split yielded no example
    (the failure reaches the driver as a runner error, before any counter can be read)."""
    match = _NO_EXAMPLES.search(str(err))
    return match.group(1) if match else None
