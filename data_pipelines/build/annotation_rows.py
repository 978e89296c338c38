"""Row cleaning shared by the annotation readers: record types, bad-row counting, text and file-row helpers.

Every reader returns a `Records` list (a plain `list` subclass) whose `.bad` attribute is a
`collections.Counter` of skipped rows by reason, so bad rows (empty caption, non-UTF-8 bytes, missing
fields, unparsable values) never crash a build and never vanish silently; each reader also logs one
warning line per file that had bad rows. Pass `bad=<Counter>` to accumulate several files into one.

Reasons used: "empty_caption", "non_utf8", "missing_field", "bad_json", "bad_value",
"unknown_video" (a QA or split id with no annotation), "no_valid_caption" (a video whose captions
were all bad; its captions were counted too), "nothing_to_blank" (an LSMDC fill-in-the-blank row whose
answer is the release's "NOTHINGTOBLANK" placeholder).

Files are read as bytes and decoded with `surrogateescape`, so one undecodable byte only marks the
row or caption it sits in.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
import pathlib
import re
import unicodedata
from typing import Any, Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

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
        self.streamed = 0  # records a streaming reader yielded instead of adding

    def skip(self, reason: str) -> None:
        self.records.bad[reason] += 1

    def add(self, record: Any) -> None:
        self.records.append(record)

    def done(self) -> Records:
        if self.records.bad:
            logger.warning(
                "%s: kept %d records, skipped %d rows: %s",
                self.path, len(self.records) + self.streamed, sum(self.records.bad.values()), dict(self.records.bad),
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


def clean_caption_text(text: str) -> str:
    """`text` stripped and without control and invisible format characters (NUL, zero-width space and
    joiners, BOM, soft hyphen: Unicode categories Cc and Cf); whitespace characters are kept."""
    return "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf")).strip()


def _clean_text(value: Any) -> tuple[str | None, str | None]:
    """(cleaned text, None) or (None, bad-row reason) for a caption/question/answer field.

    Control and zero-width characters are removed (`clean_caption_text`) before the emptiness check.
    """
    if value is None:
        return None, "missing_field"
    if not isinstance(value, str):
        return None, "bad_value"
    if not _is_valid_utf8(value):
        return None, "non_utf8"
    value = clean_caption_text(value)
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


def _text_lines(path: PathLike) -> Iterator[str]:
    """The lines of `_read_text(path).splitlines()`, read as a stream (a BOM at the start dropped)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f):
            text = raw.decode("utf-8", errors="surrogateescape")
            yield from (text[1:] if number == 0 and text.startswith("\ufeff") else text).splitlines()


def _jsonl_rows(path: PathLike, col: _Collector) -> Iterator[tuple[int, dict]]:
    """(line number, parsed object) per non-blank line; bad lines are counted, not yielded."""
    for lineno, line in enumerate(_text_lines(path)):
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
    # Read as a stream: a 2.5M-row WebVid CSV is never held whole.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        first = f.read(1)
        if first != "\ufeff":
            f.seek(0)
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
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
    for lineno, line in enumerate(_text_lines(path)):
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

