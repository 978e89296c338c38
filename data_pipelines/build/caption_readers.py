"""Readers of the caption files (WebVid, CC3M, MSR-VTT, MSVD, DiDeMo, LSMDC, generic JSONL) -> VideoText records."""
from __future__ import annotations

import collections
from typing import Iterator, Sequence

from data_pipelines.build.annotation_rows import (
    PathLike,
    Records,
    VideoText,
    _clean_caption_list,
    _clean_id,
    _clean_text,
    _cleaned,
    _Collector,
    _csv_rows,
    _is_valid_utf8,
    _jsonl_rows,
    _load_json,
    _parse_duration,
    _read_text,
    _tsv_lines,
)


def iter_webvid_csv(path: PathLike, split: str = "train", bad: collections.Counter | None = None
                    ) -> Iterator[VideoText]:
    """WebVid-2M/10M CSV `videoid,contentUrl,duration,page_dir,name` -> VideoText per row, as a stream.

    `video` is the videoid; extra holds `relpath` ("{page_dir}/{videoid}.mp4", the layout of the
    common download scripts), `content_url`, `page_dir` and `duration` in seconds (None if unparsable).
    Skipped rows are counted into `bad` as they are met.
    """
    col = _Collector(path, bad)
    for row in _csv_rows(path, required=("videoid", "name")):
        fields = _cleaned(col, row.get("videoid"), row.get("name"))
        if fields is None:
            continue
        video, caption = fields
        page_dir = (row.get("page_dir") or "").strip()
        col.streamed += 1
        yield VideoText(video, [caption], split, {
            "relpath": f"{page_dir}/{video}.mp4" if page_dir else f"{video}.mp4",
            "content_url": row.get("contentUrl"),
            "page_dir": page_dir,
            "duration": _parse_duration(row.get("duration")),
        })
    col.done()


def iter_cc3m_tsv(path: PathLike, split: str = "train", bad: collections.Counter | None = None
                  ) -> Iterator[VideoText]:
    """CC3M TSV `caption<TAB>url-or-path` (no header; a `caption<TAB>url` header line is skipped), as a stream.

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
        col.streamed += 1
        yield VideoText(video, [caption], split, {"is_image": True, "num_frames": 1, "row": index})
    col.done()


def iter_generic_jsonl(
    path: PathLike,
    split: str = "train",
    bad: collections.Counter | None = None,
    video_key: str = "video",
    text_key: str = "text",
) -> Iterator[VideoText]:
    """JSONL with one `{"video": ..., "text": str | [str, ...]}` per line -> VideoText, as a stream.

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
        col.streamed += 1
        yield VideoText(video, captions, split, extra)
    col.done()


def _collected(stream_fn, path: PathLike, bad: collections.Counter | None, **kwargs) -> Records:
    """All records of a streaming reader as Records; `.bad` counts its skipped rows (also added to `bad`)."""
    own = collections.Counter()
    records = Records(stream_fn(path, bad=own, **kwargs), bad=own)
    if bad is not None:
        bad.update(own)
    return records


def read_webvid_csv(path: PathLike, split: str = "train", bad: collections.Counter | None = None) -> Records:
    """All rows of a WebVid CSV (`iter_webvid_csv`) as Records; `.bad` counts the skipped rows."""
    return _collected(iter_webvid_csv, path, bad, split=split)


def read_cc3m_tsv(path: PathLike, split: str = "train", bad: collections.Counter | None = None) -> Records:
    """All rows of a CC3M TSV (`iter_cc3m_tsv`) as Records; `.bad` counts the skipped rows."""
    return _collected(iter_cc3m_tsv, path, bad, split=split)


def read_generic_jsonl(
    path: PathLike,
    split: str = "train",
    bad: collections.Counter | None = None,
    video_key: str = "video",
    text_key: str = "text",
) -> Records:
    """All rows of a generic JSONL (`iter_generic_jsonl`) as Records; `.bad` counts the skipped rows."""
    return _collected(iter_generic_jsonl, path, bad, split=split, video_key=video_key, text_key=text_key)


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

