"""The QA source table (source -> reader and task kind), reading any source's file, and answer vocabularies."""
from __future__ import annotations

import collections
import functools
from typing import Callable, Iterable, Mapping, NamedTuple

from data_pipelines.build import qa_readers
from data_pipelines.build.annotation_rows import PathLike, QAExample, Records, VideoText


class QASource(NamedTuple):
    """How to read one QA source: `reader(path, split=, bad=)` and the task kind its examples train."""

    reader: Callable[..., Records]
    task: str


# task kinds: the three trainable QA tasks (the names of `config.task`), and "zero_shot_multiple_choice"
# (MSR-VTT MC: captions ranked by the retrieval model, no training).
QA_SOURCE_TABLE: dict[str, QASource] = {
    "msrvtt_qa": QASource(qa_readers.read_msrvtt_qa_jsonl, "qa_open_ended"),
    "msvd_qa": QASource(qa_readers.read_msvd_qa, "qa_open_ended"),
    "tgif_frame": QASource(functools.partial(qa_readers.read_tgif_qa_tsv, task="frameqa"), "qa_open_ended"),
    "tgif_count": QASource(functools.partial(qa_readers.read_tgif_qa_tsv, task="count"), "qa_open_ended"),
    "tgif_action": QASource(functools.partial(qa_readers.read_tgif_qa_tsv, task="action"), "qa_multiple_choice"),
    "tgif_transition": QASource(functools.partial(qa_readers.read_tgif_qa_tsv, task="transition"),
                                "qa_multiple_choice"),
    "activitynet_qa": QASource(qa_readers.read_activitynet_qa, "qa_open_ended"),
    "lsmdc_mc": QASource(qa_readers.read_lsmdc_mc_tsv, "qa_multiple_choice"),
    "lsmdc_fib": QASource(qa_readers.read_lsmdc_fib, "qa_fill_in_blank"),
    "msrvtt_mc": QASource(qa_readers.read_msrvtt_mc_jsonl, "zero_shot_multiple_choice"),
}
QA_SOURCES = tuple(QA_SOURCE_TABLE)


def read_qa_examples(
    source: str,
    path: PathLike,
    split: str,
    *,
    mapping_path: PathLike | None = None,
    bad: collections.Counter | None = None,
) -> Records:
    """QAExamples of one QA file of `source` (a key of QA_SOURCE_TABLE), through that source's reader.

    `mapping_path` is msvd_youtube_mapping.txt, used (and only accepted) for "msvd_qa": with it
    MSVD-QA videos are clip names, without it "vid{N}".
    """
    if source not in QA_SOURCE_TABLE:
        raise ValueError(f"unknown QA source {source!r}; choose one of {QA_SOURCES}")
    if mapping_path is not None and source != "msvd_qa":
        raise ValueError(f"mapping_path is only used by 'msvd_qa' (msvd_youtube_mapping.txt), not {source!r}")
    extra_args = {"mapping_path": mapping_path} if mapping_path is not None else {}
    return QA_SOURCE_TABLE[source].reader(path, split=split, bad=bad, **extra_args)


def read_qa_videos(
    source: str,
    path: PathLike,
    split: str,
    *,
    mapping_path: PathLike | None = None,
    bad: collections.Counter | None = None,
) -> Records:
    """The unique videos of a QA file, first-seen order, as caption-less VideoText (the clips to build).

    extra["video_id"] is the QA file's video id verbatim (the built clip's id, so QA rows join to it
    even when the id has dots, as LSMDC's do); extra["relpath"] is kept when the reader gave one.
    `.bad` counts the QA rows the reader skipped.
    """
    examples = read_qa_examples(source, path, split, mapping_path=mapping_path, bad=bad)
    videos: dict[str, VideoText] = {}
    for ex in examples:
        if ex.video not in videos:
            extra = {"video_id": ex.video}
            if ex.extra.get("relpath"):
                extra["relpath"] = ex.extra["relpath"]
            videos[ex.video] = VideoText(ex.video, [], split, extra)
    return Records(videos.values(), bad=collections.Counter(examples.bad))


def answer_coverage(examples: Iterable[QAExample], vocab: Mapping[str, int] | Iterable[str]) -> float:
    """Fraction of examples whose answer is in `vocab` (the accuracy ceiling of a classifier head)."""
    vocab = set(vocab)
    total = hits = 0
    for ex in examples:
        total += 1
        hits += ex.answer in vocab
    if total == 0:
        raise ValueError("answer_coverage needs at least one example")
    return hits / total
