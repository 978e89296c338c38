"""Readers for the video-text and VideoQA annotation files researchers hold, returning plain records.

Every reader returns a `Records` list (a plain `list` subclass) whose `.bad` attribute is a
`collections.Counter` of skipped rows by reason, so bad rows (empty caption, non-UTF-8 bytes, missing
fields, unparsable values) never crash a build and never vanish silently; each reader also logs one
warning line per file that had bad rows. Pass `bad=<Counter>` to accumulate several files into one.

Reasons used: "empty_caption", "non_utf8", "missing_field", "bad_json", "bad_value",
"unknown_video" (a QA or split id with no annotation), "no_valid_caption" (a video whose captions
were all bad; its captions were counted too), "nothing_to_blank" (an LSMDC fill-in-the-blank row whose
answer is the release's "NOTHINGTOBLANK" placeholder).

`read_qa_examples(source, ...)` reads any QA file named in `QA_SOURCES`; `read_qa_videos` lists the
unique videos of one (the clips `prepare --format qa` builds).

Files are read as bytes and decoded with `surrogateescape`, so one undecodable byte only marks the
row or caption it sits in.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import logging
import os
import pathlib
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

TGIF_TASKS = ("action", "transition", "frameqa", "count")
TGIF_FRAMEQA_TYPES = ("object", "number", "color", "location")
QA_SOURCES = ("msrvtt_qa", "msvd_qa", "tgif_frame", "tgif_action", "tgif_transition", "tgif_count",
              "lsmdc_mc", "lsmdc_fib", "msrvtt_mc")
LSMDC_NUM_OPTIONS = 5
FIB_BLANK = "_____"  # the one spelling of the blank in QAExample.question of LSMDC-FiB


@dataclasses.dataclass
class VideoText:
    """One video (or image, as a 1-frame clip) and its captions."""

    video: str
    captions: list[str]
    split: str
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class QAExample:
    """One VideoQA item: open-ended (options None) or multiple choice (options + answer_index)."""

    video: str
    question: str
    answer: str
    options: list[str] | None = None
    answer_index: int | None = None
    qid: str = ""
    extra: dict = dataclasses.field(default_factory=dict)


class Records(list):
    """A list of records; `.bad` counts the rows that were skipped, by reason."""

    def __init__(self, items: Iterable = (), bad: collections.Counter | None = None):
        super().__init__(items)
        self.bad: collections.Counter = bad if bad is not None else collections.Counter()


class _Collector:
    """Accumulates records and bad-row reasons for one file, then reports them."""

    def __init__(self, path: PathLike, bad: collections.Counter | None):
        self.path = str(path)
        self.records = Records(bad=collections.Counter())
        self._shared = bad

    def skip(self, reason: str) -> None:
        self.records.bad[reason] += 1

    def add(self, record: Any) -> None:
        self.records.append(record)

    def done(self) -> Records:
        if self.records.bad:
            logger.warning(
                "%s: kept %d records, skipped %d rows: %s",
                self.path, len(self.records), sum(self.records.bad.values()), dict(self.records.bad),
            )
        if self._shared is not None:
            self._shared.update(self.records.bad)
        return self.records


# ----------------------------------------------------------------------------- text helpers


def _read_text(path: PathLike) -> str:
    """File contents as str; undecodable bytes become lone surrogates (see `_is_valid_utf8`)."""
    text = pathlib.Path(path).read_bytes().decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _is_valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean_text(value: Any) -> tuple[str | None, str | None]:
    """(stripped text, None) or (None, bad-row reason) for a caption/question/answer field."""
    if value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "bad_value"
    if not _is_valid_utf8(value):
        return None, "non_utf8"
    value = value.strip()
    if not value:
        return None, "empty_caption"
    return value, None


def _clean_id(value: Any) -> tuple[str | None, str | None]:
    """A non-empty identifier (video id, path) as str, or a bad-row reason."""
    if value is None:
        return None, "missing_field"
    value = str(value).strip()
    if not value:
        return None, "missing_field"
    if not _is_valid_utf8(value):
        return None, "non_utf8"
    return value, None


def _cleaned_texts(col: "_Collector", values: Iterable[Any]) -> list[str] | None:
    """The cleaned texts, or None with the first bad one's reason counted."""
    cleaned = [_clean_text(v) for v in values]
    for _, reason in cleaned:
        if reason:
            col.skip(reason)
            return None
    return [text for text, _ in cleaned]


def _cleaned(col: "_Collector", video: Any, *texts: Any) -> tuple[str, ...] | None:
    """(video id, *texts) cleaned, or None with the first bad field's reason counted (the id first)."""
    video, reason = _clean_id(video)
    if reason:
        col.skip(reason)
        return None
    cleaned = _cleaned_texts(col, texts)
    return None if cleaned is None else (video, *cleaned)


def _jsonl_rows(path: PathLike, col: _Collector) -> Iterator[tuple[int, dict]]:
    """(line number, parsed object) per non-blank line; bad lines are counted, not yielded."""
    for lineno, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        if not _is_valid_utf8(line):
            col.skip("non_utf8")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            col.skip("bad_json")
            continue
        if not isinstance(row, dict):
            col.skip("bad_json")
            continue
        yield lineno, row


def _load_json(path: PathLike) -> Any:
    """Whole-file JSON; non-UTF-8 bytes survive as lone surrogates inside strings (caught per field)."""
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); check you passed the right file") from err


def _csv_rows(
    path: PathLike, required: Sequence[str], delimiter: str = ","
) -> Iterator[dict[str, str | None]]:
    """Dict rows of a headed CSV/TSV; raises if the header lacks a required column (wrong file)."""
    # TSV files (TGIF-QA) use no quoting: a question may start with a double quote.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, quoting=quoting)
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: header {header} lacks column(s) {missing}; is this the right file/reader?")
    yield from reader


def _tsv_lines(path: PathLike) -> Iterator[list[str]]:
    """Tab-split fields of each non-blank line (no CSV quoting: LSMDC/CC3M captions contain quotes)."""
    for _, fields in _numbered_tsv_lines(path):
        yield fields


def _numbered_tsv_lines(path: PathLike) -> Iterator[tuple[int, list[str]]]:
    """(0-based line number, tab-split fields) of each non-blank line; no CSV quoting."""
    for lineno, line in enumerate(_read_text(path).splitlines()):
        if line.strip():
            yield lineno, line.split("\t")


_ISO_DURATION = re.compile(r"^P(?:(\d+)D)?T?(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


def _parse_duration(value: str | None) -> float | None:
    """Seconds from '12.5' or ISO-8601 'PT00H00M11S' (WebVid); None when absent or unparsable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    m = _ISO_DURATION.match(value)
    if not m or not any(m.groups()):
        return None
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


# ----------------------------------------------------------------------------- pre-training corpora


def read_webvid_csv(path: PathLike, split: str = "train", bad: collections.Counter | None = None) -> Records:
    """WebVid-2M/10M CSV `videoid,contentUrl,duration,page_dir,name` -> VideoText per row.

    `video` is the videoid; extra holds `relpath` ("{page_dir}/{videoid}.mp4", the layout of the
    common download scripts), `content_url`, `page_dir` and `duration` in seconds (None if unparsable).
    """
    col = _Collector(path, bad)
    for row in _csv_rows(path, required=("videoid", "name")):
        fields = _cleaned(col, row.get("videoid"), row.get("name"))
        if fields is None:
            continue
        video, caption = fields
        page_dir = (row.get("page_dir") or "").strip()
        col.add(VideoText(video, [caption], split, {
            "relpath": f"{page_dir}/{video}.mp4" if page_dir else f"{video}.mp4",
            "content_url": row.get("contentUrl"),
            "page_dir": page_dir,
            "duration": _parse_duration(row.get("duration")),
        }))
    return col.done()


def read_cc3m_tsv(path: PathLike, split: str = "train", bad: collections.Counter | None = None) -> Records:
    """CC3M TSV `caption<TAB>url-or-path` (no header; a `caption<TAB>url` header line is skipped).

    Images become 1-frame clips: `video` is the url/path, extra = {"is_image": True, "num_frames": 1,
    "row": line index}.
    """
    col = _Collector(path, bad)
    for index, fields in enumerate(_tsv_lines(path)):
        if index == 0 and fields[0].strip().lower() in ("caption", "text", "title"):
            continue
        if len(fields) < 2:
            col.skip("missing_field")
            continue
        caption, reason = _clean_text(fields[0])
        if reason:
            col.skip(reason)
            continue
        video, reason = _clean_id(fields[1])
        if reason:
            col.skip(reason)
            continue
        col.add(VideoText(video, [caption], split, {"is_image": True, "num_frames": 1, "row": index}))
    return col.done()


def read_generic_jsonl(
    path: PathLike,
    split: str = "train",
    bad: collections.Counter | None = None,
    video_key: str = "video",
    text_key: str = "text",
) -> Records:
    """JSONL with one `{"video": ..., "text": str | [str, ...]}` per line -> VideoText.

    Bad captions inside a list are counted one by one; a line left with none counts as
    "no_valid_caption". Other keys of the line go to extra.
    """
    col = _Collector(path, bad)
    for _, row in _jsonl_rows(path, col):
        video, reason = _clean_id(row.get(video_key))
        if reason:
            col.skip(reason)
            continue
        text = row.get(text_key)
        if text is None:
            col.skip("missing_field")
            continue
        captions = _clean_caption_list([text] if isinstance(text, str) else text, col)
        if captions is None:
            continue
        extra = {k: v for k, v in row.items() if k not in (video_key, text_key)}
        col.add(VideoText(video, captions, split, extra))
    return col.done()


def _clean_caption_list(texts: Any, col: _Collector) -> list[str] | None:
    """Valid captions of a list (bad ones counted); None (and counted) when none is left."""
    if not isinstance(texts, (list, tuple)):
        col.skip("bad_value")
        return None
    captions = []
    for text in texts:
        caption, reason = _clean_text(text)
        if reason:
            col.skip(reason)
        else:
            captions.append(caption)
    if not captions:
        col.skip("no_valid_caption")
        return None
    return captions


# ----------------------------------------------------------------------------- MSR-VTT


def read_video_id_list(path: PathLike) -> list[str]:
    """Video ids, one per line (MSVD `*_list.txt`, MSR-VTT `train.9k.csv` with its `video_id` header)."""
    ids = []
    for index, line in enumerate(_read_text(path).splitlines()):
        line = line.strip().split(",")[0].strip()
        if not line or (index == 0 and line.lower() in ("video_id", "videoid", "video", "clip_name")):
            continue
        if not _is_valid_utf8(line):
            raise ValueError(f"{path}: line {index + 1} is not UTF-8; a split list must be clean")
        ids.append(line)
    return ids


def read_msrvtt_jsfusion_csv(
    path: PathLike, split: str = "test", bad: collections.Counter | None = None
) -> Records:
    """MSR-VTT 1k-A test CSV `key,vid_key,video_id,sentence` -> one VideoText (one caption) per row."""
    col = _Collector(path, bad)
    for row in _csv_rows(path, required=("video_id", "sentence")):
        fields = _cleaned(col, row.get("video_id"), row.get("sentence"))
        if fields is None:
            continue
        video, caption = fields
        col.add(VideoText(video, [caption], split, {"key": row.get("key"), "vid_key": row.get("vid_key")}))
    return col.done()


def read_msrvtt_captions_json(
    path: PathLike,
    video_ids: Sequence[str] | None = None,
    split: str = "train",
    bad: collections.Counter | None = None,
) -> Records:
    """MSR-VTT `MSRVTT_data.json` (`{"sentences": [{"video_id", "caption"}, ...], ...}`) -> VideoText.

    Captions are grouped per video in file order. With `video_ids` (e.g. from `read_video_id_list` on
    `MSRVTT_train.9k.csv`), only those videos are kept, in that order; ids without captions count as
    "unknown_video".
    """
    col = _Collector(path, bad)
    data = _load_json(path)
    sentences = data.get("sentences") if isinstance(data, dict) else None
    if not isinstance(sentences, list):
        raise ValueError(f"{path}: expected an object with a 'sentences' list (MSRVTT_data.json)")
    grouped: dict[str, list[str]] = {}
    for sent in sentences:
        if not isinstance(sent, dict):
            col.skip("bad_json")
            continue
        fields = _cleaned(col, sent.get("video_id"), sent.get("caption"))
        if fields is None:
            continue
        video, caption = fields
        grouped.setdefault(video, []).append(caption)
    for video in (video_ids if video_ids is not None else list(grouped)):
        if video not in grouped:
            col.skip("unknown_video")
            continue
        col.add(VideoText(video, grouped[video], split))
    return col.done()


def read_msrvtt_mc_jsonl(path: PathLike, split: str = "test", bad: collections.Counter | None = None) -> Records:
    """MSR-VTT multiple choice JSONL `{qid, clip_name, options: [5 captions], answer: "i"}` -> QAExample.

    `question` is "" (the task ranks captions), `answer` is the correct option's text.
    """
    col = _Collector(path, bad)
    for _, row in _jsonl_rows(path, col):
        video, reason = _clean_id(row.get("clip_name"))
        if reason:
            col.skip(reason)
            continue
        options = row.get("options")
        if not isinstance(options, list) or not options:
            col.skip("missing_field")
            continue
        opts = _cleaned_texts(col, options)
        if opts is None:
            continue
        try:
            index = int(row.get("answer"))
        except (TypeError, ValueError):
            col.skip("bad_value")
            continue
        if not 0 <= index < len(options):
            col.skip("bad_value")
            continue
        col.add(QAExample(video, "", opts[index], opts, index, str(row.get("qid", "")),
                          {"title": row.get("title"), "split": split}))
    return col.done()


def read_msrvtt_qa_jsonl(path: PathLike, split: str = "val", bad: collections.Counter | None = None) -> Records:
    """MSRVTT-QA JSONL, ClipBERT format `{question, answer, video_id, answer_type}` -> QAExample.

    The file has no question ids: qid is "{split}_{line number}".
    """
    col = _Collector(path, bad)
    for lineno, row in _jsonl_rows(path, col):
        qa = _open_ended(row, "video_id", col)
        if qa is None:
            continue
        video, question, answer = qa
        col.add(QAExample(video, question, answer, qid=f"{split}_{lineno}",
                          extra={"answer_type": row.get("answer_type"), "split": split}))
    return col.done()


def _open_ended(row: Mapping, video_key: str, col: _Collector) -> tuple[str, str, str] | None:
    """(video, question, answer) of an open-ended QA row, or None with the reason counted."""
    answer = row.get("answer")
    return _cleaned(col, row.get(video_key), row.get("question"), None if answer is None else str(answer))


def read_ans2label(path: PathLike) -> dict[str, int]:
    """An answer vocabulary `{answer: label}` JSON (MSRVTT-QA `msrvtt_train_ans2label.json`)."""
    data = _load_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ValueError(f"{path}: expected a JSON object mapping answer strings to int labels")
    if sorted(data.values()) != list(range(len(data))):
        raise ValueError(f"{path}: labels must be exactly 0..{len(data) - 1}, each once")
    return dict(data)


# ----------------------------------------------------------------------------- MSVD


def read_msvd_captions(
    path: PathLike,
    video_ids: Sequence[str] | None = None,
    split: str = "all",
    bad: collections.Counter | None = None,
) -> Records:
    """MSVD `captions_msvd.json` (`{clip_name: [captions]}`) -> VideoText per clip.

    With `video_ids` (from `read_video_id_list` on `{train,val,test}_list.txt`) only those clips are
    kept, in that order; ids absent from the JSON count as "unknown_video".
    """
    col = _Collector(path, bad)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{clip_name: [captions]}} (captions_msvd.json)")
    for video in (video_ids if video_ids is not None else list(data)):
        if video not in data:
            col.skip("unknown_video")
            continue
        captions = _clean_caption_list(data[video], col)
        if captions is not None:
            col.add(VideoText(video, captions, split))
    return col.done()


def read_msvd_youtube_mapping(path: PathLike) -> dict[str, str]:
    """`msvd_youtube_mapping.txt` lines `clip_name vidN` -> {"vidN": clip_name}."""
    mapping = {}
    for index, line in enumerate(_read_text(path).splitlines()):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}: line {index + 1} should be 'clip_name vidN', got {line!r}")
        mapping[fields[1]] = fields[0]
    return mapping


def read_msvd_qa(
    path: PathLike,
    mapping_path: PathLike | None = None,
    split: str = "test",
    bad: collections.Counter | None = None,
) -> Records:
    """MSVD-QA JSON list `[{id, video_id: int, question, answer}, ...]` -> QAExample.

    `video` is the clip name when `mapping_path` (msvd_youtube_mapping.txt) is given, else "vid{N}";
    with a mapping, ids it lacks count as "unknown_video". extra["video_index"] keeps the integer id.
    """
    col = _Collector(path, bad)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of QA objects (msvd_*_qa_encode.json)")
    mapping = read_msvd_youtube_mapping(mapping_path) if mapping_path is not None else None
    for row in data:
        if not isinstance(row, dict):
            col.skip("bad_json")
            continue
        try:
            index = int(row["video_id"])
        except KeyError:
            col.skip("missing_field")
            continue
        except (TypeError, ValueError):
            col.skip("bad_value")
            continue
        vid = f"vid{index}"
        if mapping is not None and vid not in mapping:
            col.skip("unknown_video")
            continue
        qa = _open_ended({**row, "video_id": mapping[vid] if mapping else vid}, "video_id", col)
        if qa is None:
            continue
        video, question, answer = qa
        col.add(QAExample(video, question, answer, qid=str(row.get("id", "")),
                          extra={"video_index": index, "split": split}))
    return col.done()


def read_answer_set(path: PathLike) -> dict[str, int]:
    """A one-answer-per-line vocabulary (MSVD-QA `msvd_answer_set.txt`) -> {answer: line index}."""
    answers = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if len(set(answers)) != len(answers):
        dupes = [a for a, n in collections.Counter(answers).items() if n > 1]
        raise ValueError(f"{path}: duplicate answers {dupes[:5]}; an answer set must be unique")
    return {answer: index for index, answer in enumerate(answers)}


# ----------------------------------------------------------------------------- DiDeMo, LSMDC


def read_didemo_json(path: PathLike, split: str = "train", bad: collections.Counter | None = None) -> Records:
    """DiDeMo `{train,val,test}_data.json` -> one VideoText per video with the paragraph as caption.

    Accepts the LocalizingMoments list `[{"video", "description", "times", ...}, ...]` (sentences of a
    video joined in file order) or a mapping `{video: {"sentences": [...], "timestamps": [...]}}`.
    The paragraph is the sentences joined by a space; extra holds "sentences" and "times".
    """
    col = _Collector(path, bad)
    data = _load_json(path)
    grouped: dict[str, dict[str, list]] = {}
    if isinstance(data, list):
        for row in data:
            if not isinstance(row, dict):
                col.skip("bad_json")
                continue
            fields = _cleaned(col, row.get("video"), row.get("description"))
            if fields is None:
                continue
            video, sentence = fields
            entry = grouped.setdefault(video, {"sentences": [], "times": []})
            entry["sentences"].append(sentence)
            entry["times"].append(row.get("times"))
    elif isinstance(data, dict):
        for video, row in data.items():
            if not isinstance(row, dict) or "sentences" not in row:
                col.skip("missing_field")
                continue
            sentences = _clean_caption_list(row["sentences"], col)
            if sentences is not None:
                grouped[video] = {"sentences": sentences, "times": list(row.get("timestamps") or [])}
    else:
        raise ValueError(f"{path}: expected a DiDeMo list of moments or a {{video: {{sentences}}}} object")
    for video, entry in grouped.items():
        col.add(VideoText(video, [" ".join(entry["sentences"])], split, entry))
    return col.done()


def read_lsmdc_tsv(path: PathLike, split: str = "train", bad: collections.Counter | None = None) -> Records:
    """LSMDC16 `clip_id<TAB>start_aligned<TAB>end_aligned<TAB>start<TAB>end<TAB>sentence` -> VideoText.

    Two-column `clip_id<TAB>sentence` lines are accepted too. extra: "movie" (clip id up to its last
    "_"), "relpath" ("{movie}/{clip_id}.avi", the LSMDC release layout) and "times" (the 4 time stamps).
    """
    col = _Collector(path, bad)
    for fields in _tsv_lines(path):
        if len(fields) < 2:
            col.skip("missing_field")
            continue
        cleaned = _cleaned(col, fields[0], fields[-1])
        if cleaned is None:
            continue
        video, caption = cleaned
        movie = video.rsplit("_", 1)[0]
        col.add(VideoText(video, [caption], split, {
            "movie": movie, "relpath": f"{movie}/{video}.avi", "times": fields[1:-1],
        }))
    return col.done()


# ----------------------------------------------------------------------------- TGIF-QA


def tgif_task_from_filename(path: PathLike) -> str:
    """'action' | 'transition' | 'frameqa' | 'count' from a TGIF-QA file name like Train_action_question.csv."""
    name = pathlib.Path(path).name.lower()
    found = [t for t in TGIF_TASKS if t in name]
    if len(found) != 1:
        raise ValueError(f"cannot tell the TGIF-QA task from {name!r}; pass task= one of {TGIF_TASKS}")
    return found[0]


def read_tgif_qa_tsv(
    path: PathLike,
    task: str | None = None,
    split: str = "train",
    bad: collections.Counter | None = None,
) -> Records:
    """TGIF-QA `{Train,Test}_{task}_question.csv` (tab separated, headed) -> QAExample.

    action/transition: `gif_name question a1..a5 answer vid_id key` -> 5 options, answer_index.
    frameqa: `gif_name question answer type vid_id key description` -> open-ended; extra["type"] is
    object/number/color/location. count: `gif_name question answer vid_id key` -> open-ended, extra
    ["count"] is the int. `task` defaults to the one named in the file name; qid is vid_id.
    """
    task = task or tgif_task_from_filename(path)
    if task not in TGIF_TASKS:
        raise ValueError(f"TGIF-QA task must be one of {TGIF_TASKS}, got {task!r}")
    multiple_choice = task in ("action", "transition")
    option_keys = [f"a{i}" for i in range(1, 6)]
    required = ("gif_name", "question", "answer", *(option_keys if multiple_choice else ()))
    col = _Collector(path, bad)
    for row in _csv_rows(path, required=required, delimiter="\t"):
        if None in row:  # more fields than the header
            col.skip("bad_value")
            continue
        extra: dict[str, Any] = {"task": task, "key": row.get("key"), "split": split}
        qid = (row.get("vid_id") or "").strip()
        if multiple_choice:
            example = _tgif_multiple_choice(row, qid, extra, col)
            if example is not None:
                col.add(example)
            continue
        qa = _open_ended(row, "gif_name", col)
        if qa is None:
            continue
        video, question, answer = qa
        if task == "count":
            try:
                extra["count"] = int(answer)
            except ValueError:
                col.skip("bad_value")
                continue
        else:
            try:
                extra["type"] = TGIF_FRAMEQA_TYPES[int((row.get("type") or "").strip())]
            except (ValueError, IndexError):
                col.skip("bad_value")
                continue
            extra["description"] = row.get("description")
        col.add(QAExample(video, question, answer, qid=qid, extra=extra))
    return col.done()


def _tgif_multiple_choice(row: Mapping, qid: str, extra: dict, col: _Collector) -> QAExample | None:
    """A TGIF Action/Transition row (5 options, answer = option index) or None with the reason counted."""
    fields = _cleaned(col, row.get("gif_name"), row.get("question"), *(row.get(f"a{i}") for i in range(1, 6)))
    if fields is None:
        return None
    video, question, *options = fields
    try:
        index = int((row.get("answer") or "").strip())
    except ValueError:
        col.skip("bad_value")
        return None
    if not 0 <= index < 5:
        col.skip("bad_value")
        return None
    return QAExample(video, question, options[index], options, index, qid, extra)


# ----------------------------------------------------------------------------- LSMDC multiple choice, fill-in-the-blank


def _lsmdc_extra(video: str, split: str, times: Sequence[str]) -> dict:
    """extra of an LSMDC QA row: split, time stamps, and the release layout "{movie}/{clip}.avi"."""
    movie = video.rsplit("_", 1)[0]
    return {"split": split, "times": [t.strip() for t in times], "movie": movie, "relpath": f"{movie}/{video}.avi"}


def read_lsmdc_mc_tsv(path: PathLike, split: str = "train", bad: collections.Counter | None = None) -> Records:
    """LSMDC16 multiple choice (headerless, TAB separated) -> QAExample with 5 options, question "".

    Layout per row, by field count: 10 fields `clip_id, 4 time stamps, correct sentence, 4 distractors`
    (train/valid; answer_index 0), or 11 fields `clip_id, 4 time stamps, 5 sentences, answer index 1..5`
    (test_randomized). Other counts: fewer -> "missing_field", more -> "bad_value". Options keep file
    order (the consumer shuffles training options). qid is "{split}_{line number}"; extra holds "split",
    "times" (the 4 time stamps), "movie" and "relpath" (as `read_lsmdc_tsv`).
    """
    col = _Collector(path, bad)
    first_option = 5
    for lineno, fields in _numbered_tsv_lines(path):
        if len(fields) < 10:
            col.skip("missing_field")
            continue
        if len(fields) > 11:
            col.skip("bad_value")
            continue
        video, reason = _clean_id(fields[0])
        if reason:
            col.skip(reason)
            continue
        if not all(_is_valid_utf8(t) for t in fields[1:first_option]):
            col.skip("non_utf8")
            continue
        options = _cleaned_texts(col, fields[first_option:first_option + LSMDC_NUM_OPTIONS])
        if options is None:
            continue
        if len(fields) == 10:
            index = 0
        else:
            try:
                index = int(fields[10].strip()) - 1
            except ValueError:
                col.skip("bad_value")
                continue
            if not 0 <= index < LSMDC_NUM_OPTIONS:
                col.skip("bad_value")
                continue
        col.add(QAExample(video, "", options[index], options, index, f"{split}_{lineno}",
                          _lsmdc_extra(video, split, fields[1:first_option])))
    return col.done()


_BLANK_RUN = re.compile(r"_{3,}")


def _fib_rows(path: PathLike, col: _Collector) -> Iterator[tuple[int, Any, Any, Any, list[str]]]:
    """(row number, video, sentence, answer, time stamps) of a FiB file, JSON/JSONL or TSV by content."""
    text = _read_text(path)
    first = next((line.lstrip() for line in text.splitlines() if line.strip()), "")
    if first.startswith("["):
        data = _load_json(path)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of fill-in-the-blank rows")
        rows: Iterable[tuple[int, Any]] = enumerate(data)
    elif first.startswith("{"):
        rows = _jsonl_rows(path, col)
    else:
        for lineno, fields in _numbered_tsv_lines(path):
            if len(fields) < 3:
                col.skip("missing_field")
                continue
            yield lineno, fields[0], fields[-2], fields[-1], fields[1:-2]
        return
    for number, row in rows:
        if not isinstance(row, dict):
            col.skip("bad_json")
            continue
        video = next((row[k] for k in ("video", "clip_id", "clip_name") if row.get(k) is not None), None)
        sentence = next((row[k] for k in ("question", "sentence") if row.get(k) is not None), None)
        answer = row.get("answer")
        yield number, video, sentence, None if answer is None else str(answer), []


def read_lsmdc_fib(path: PathLike, split: str = "train", bad: collections.Counter | None = None) -> Records:
    """LSMDC fill-in-the-blank (MovieFIB) -> open-ended QAExample whose question holds one blank.

    The release layout is unconfirmed, so two are accepted, chosen by the first non-blank line: JSON
    (a list, or JSONL) rows `{video|clip_id|clip_name, question|sentence, answer}`, or headerless TAB
    rows `clip_id, [any fields, e.g. time stamps], sentence, answer`. The blank is a run of 3+ "_",
    written as exactly "_____" (FIB_BLANK) in `question`. Rows with no blank or several -> "bad_value";
    an empty answer -> "bad_value"; answer "NOTHINGTOBLANK" -> "nothing_to_blank". qid is
    "{split}_{line number}" (list index for a JSON list); extra as `read_lsmdc_mc_tsv` ("times" holds the
    TSV middle fields, empty for JSON).
    """
    col = _Collector(path, bad)
    for number, raw_video, raw_sentence, raw_answer, times in _fib_rows(path, col):
        fields = _cleaned(col, raw_video, raw_sentence)
        if fields is None:
            continue
        video, sentence = fields
        if raw_answer is None:
            col.skip("missing_field")
            continue
        answer, reason = _clean_text(raw_answer)
        if reason == "empty_caption":
            reason = "bad_value"
        elif reason is None and answer.upper() == "NOTHINGTOBLANK":
            reason = "nothing_to_blank"
        if reason:
            col.skip(reason)
            continue
        if not all(_is_valid_utf8(t) for t in times):
            col.skip("non_utf8")
            continue
        if len(_BLANK_RUN.findall(sentence)) != 1:
            col.skip("bad_value")
            continue
        question = _BLANK_RUN.sub(FIB_BLANK, sentence)
        col.add(QAExample(video, question, answer, qid=f"{split}_{number}", extra=_lsmdc_extra(video, split, times)))
    return col.done()


# ----------------------------------------------------------------------------- answer vocabularies


def answer_vocabulary(examples: Iterable[QAExample], top_k: int) -> dict[str, int]:
    """The `top_k` most frequent answers -> labels 0..k-1 (ties broken alphabetically, deterministic)."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    counts = collections.Counter(ex.answer for ex in examples)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return {answer: label for label, (answer, _) in enumerate(ranked)}


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


# ----------------------------------------------------------------------------- one entry point for QA files

_TGIF_SOURCE_TASKS = {"tgif_frame": "frameqa", "tgif_action": "action", "tgif_transition": "transition",
                      "tgif_count": "count"}


def read_qa_examples(
    source: str,
    path: PathLike,
    split: str,
    *,
    mapping_path: PathLike | None = None,
    bad: collections.Counter | None = None,
) -> Records:
    """QAExamples of one QA file of `source` (one of QA_SOURCES), through that source's reader.

    `mapping_path` is msvd_youtube_mapping.txt, used (and only accepted) for "msvd_qa": with it
    MSVD-QA videos are clip names, without it "vid{N}".
    """
    if source not in QA_SOURCES:
        raise ValueError(f"unknown QA source {source!r}; choose one of {QA_SOURCES}")
    if mapping_path is not None and source != "msvd_qa":
        raise ValueError(f"mapping_path is only used by 'msvd_qa' (msvd_youtube_mapping.txt), not {source!r}")
    if source == "msrvtt_qa":
        return read_msrvtt_qa_jsonl(path, split=split, bad=bad)
    if source == "msvd_qa":
        return read_msvd_qa(path, mapping_path=mapping_path, split=split, bad=bad)
    if source in _TGIF_SOURCE_TASKS:
        return read_tgif_qa_tsv(path, task=_TGIF_SOURCE_TASKS[source], split=split, bad=bad)
    if source == "lsmdc_mc":
        return read_lsmdc_mc_tsv(path, split=split, bad=bad)
    if source == "lsmdc_fib":
        return read_lsmdc_fib(path, split=split, bad=bad)
    return read_msrvtt_mc_jsonl(path, split=split, bad=bad)


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
