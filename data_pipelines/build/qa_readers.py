"""Readers of the VideoQA files (MSRVTT-QA/MC, MSVD-QA, TGIF-QA, LSMDC MC/FiB) -> QAExample records."""
from __future__ import annotations

import collections
import pathlib
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

from data_pipelines.build.annotation_rows import (
    PathLike,
    QAExample,
    Records,
    _clean_id,
    _clean_text,
    _cleaned,
    _cleaned_texts,
    _Collector,
    _csv_rows,
    _is_valid_utf8,
    _jsonl_rows,
    _load_json,
    _numbered_tsv_lines,
    _read_text,
)

TGIF_TASKS = ("action", "transition", "frameqa", "count")
TGIF_FRAMEQA_TYPES = ("object", "number", "color", "location")
LSMDC_NUM_OPTIONS = 5
FIB_BLANK = "_____"  # the one spelling of the blank in QAExample.question of LSMDC-FiB


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



# ----------------------------------------------------------------------------- ActivityNet-QA

ACTIVITYNET_QA_TYPES = ("motion", "spatial", "temporal", "yes_no", "color", "object", "location", "number", "other")


def activitynet_answers_path(questions_path: PathLike) -> pathlib.Path:
    """The answer file of an ActivityNet-QA question file: `{split}_q.json` -> `{split}_a.json` beside it."""
    path = pathlib.Path(questions_path)
    if not path.name.endswith("_q.json"):
        raise ValueError(f"{path}: an ActivityNet-QA question file is named {{split}}_q.json "
                         f"(its answers are read from {{split}}_a.json beside it)")
    return path.with_name(path.name[: -len("_q.json")] + "_a.json")


def read_activitynet_qa(
    path: PathLike,
    split: str = "test",
    bad: collections.Counter | None = None,
    answers_path: PathLike | None = None,
) -> Records:
    """ActivityNet-QA `{split}_q.json` `[{question, video_name, question_id}]` joined with `{split}_a.json`
    `[{answer, type, question_id}]` by question id -> open-ended QAExample.

    `video` is "v_" + video_name (the clip file name of the ActivityNet release) unless it already starts
    with "v_"; a question without an answer row counts as "missing_field". extra: "type" (the
    ACTIVITYNET_QA_TYPES name, or None for an unknown code) and "split".
    """
    answers_path = pathlib.Path(answers_path) if answers_path is not None else activitynet_answers_path(path)
    if not answers_path.is_file():
        raise FileNotFoundError(f"{answers_path} (the answers of {path}) does not exist")
    questions, answers = _load_json(path), _load_json(answers_path)
    for name, data in ((path, questions), (answers_path, answers)):
        if not isinstance(data, list):
            raise ValueError(f"{name}: expected a JSON list of ActivityNet-QA rows")
    col = _Collector(path, bad)
    by_qid: dict[str, Mapping] = {}
    for row in answers:
        if isinstance(row, dict) and row.get("question_id") is not None:
            by_qid[str(row["question_id"])] = row
    for row in questions:
        if not isinstance(row, dict):
            col.skip("bad_json")
            continue
        qid = str(row.get("question_id", ""))
        answer_row = by_qid.get(qid)
        if answer_row is None:
            col.skip("missing_field")
            continue
        name = row.get("video_name")
        video = name if name is None or str(name).startswith("v_") else f"v_{name}"
        qa = _open_ended({"video": video, "question": row.get("question"), "answer": answer_row.get("answer")},
                         "video", col)
        if qa is None:
            continue
        code = answer_row.get("type")
        kind = ACTIVITYNET_QA_TYPES[code] if isinstance(code, int) and 0 <= code < len(ACTIVITYNET_QA_TYPES) else None
        col.add(QAExample(*qa, qid=qid, extra={"type": kind, "split": split}))
    return col.done()
