"""Self-contained HTML report of text->video retrieval: sampled queries with their top-k clips as thumbnails.

Thumbnails are embedded as base64 PNG data URIs, so the file can be opened or mailed on its own. PIL is
not in the project's environment, so PNGs come from the small numpy + zlib encoder below (8-bit RGB,
filter type 0 on every row, one IDAT chunk).
"""
from __future__ import annotations

import base64
import html
import pathlib
import struct
import zlib
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2}  # channels -> PNG colour type (grey, RGB)

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
.metrics { font-family: monospace; background: #eee; padding: .5em; }
.query { border-top: 1px solid #ccc; padding: .6em 0; }
.caption { font-weight: bold; }
.results { display: flex; flex-wrap: wrap; gap: .6em; }
figure.clip { margin: 0; padding: 3px; border: 3px solid transparent; }
figure.clip.correct { border-color: #1a9e2c; }
figcaption { font-size: 85%; }
.correct-label { color: #1a9e2c; font-weight: bold; }
.miss { color: #b00; }
"""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image shaped (H, W, 3) (RGB) or (H, W) (greyscale)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"encode_png needs uint8 pixels, got {image.dtype}: convert with "
                         "np.clip(x * 255, 0, 255).astype(np.uint8) or similar")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in _COLOR_TYPE or 0 in image.shape[:2]:
        raise ValueError(f"encode_png needs a non-empty (H, W, 3) or (H, W) image, got {image.shape}")
    height, width, channels = image.shape
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE[channels], 0, 0, 0)
    rows = image.reshape(height, width * channels)
    # Every scanline starts with its filter byte; 0 = no filter.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    return (PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(raw, 6))
            + _png_chunk(b"IEND", b""))


def thumbnail_strip(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 frames -> (H, F*W, 3) strip, frames side by side in time order."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0 or frames.dtype != np.uint8:
        raise ValueError(f"thumbnails must be uint8 (F, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    return np.concatenate(list(frames), axis=1)


def png_data_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def sample_query_indices(num_texts: int, num_queries: int, seed: int) -> np.ndarray:
    """Sorted caption indices shown in the report (all of them when num_queries >= num_texts)."""
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    if num_queries >= num_texts:
        return np.arange(num_texts)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_texts, size=num_queries, replace=False))


def videos_for_report(topk: np.ndarray, num_queries: int, seed: int) -> List[int]:
    """Video indices whose thumbnails `write_retrieval_report` will need with the same arguments.

    Lets the caller decode frames only for these videos.
    """
    topk = np.asarray(topk)
    queries = sample_query_indices(topk.shape[0], num_queries, seed)
    return sorted({int(v) for v in topk[queries].ravel()})


def _format_metric(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.2f}"
    return str(value)


def write_retrieval_report(path: Union[str, pathlib.Path], captions: Sequence[str],
                           caption_to_video: Optional[np.ndarray], topk: np.ndarray,
                           thumbnails: Mapping[int, np.ndarray],
                           metrics: Optional[Mapping[str, object]] = None,
                           num_queries: int = 20, seed: int = 0,
                           video_names: Optional[Sequence[str]] = None,
                           title: str = "Text → video retrieval") -> pathlib.Path:
    """Writes one HTML file with `num_queries` sampled captions and their top-k retrieved clips.

    Args:
      path: output .html file (parent folders are created).
      captions: (Nt,) caption strings.
      caption_to_video: (Nt,) int, the correct video of each caption; None marks none (search results).
      topk: (Nt, k) int retrieved video indices, best first (e.g. `retrieval.top_k`).
      thumbnails: video index -> uint8 (F, H, W, 3) frames, needed for every video in
        `videos_for_report(topk, num_queries, seed)`.
      metrics: shown in the header line (e.g. `retrieval.retrieval_metrics(...)`).
      num_queries, seed: how many captions to show and the sampling seed (deterministic).
      video_names: optional (Nv,) labels for the clips (file names); default "video <index>".
    Each retrieved clip is an <img> of its frames side by side; the correct one has a green border
    (class "clip correct") and the label "✓ correct". A query whose correct clip is not in the top-k says so.
    Returns the path written.
    """
    caption_to_video = np.full(len(captions), -1) if caption_to_video is None else np.asarray(caption_to_video)
    topk = np.asarray(topk)
    num_texts = len(captions)
    if caption_to_video.shape != (num_texts,):
        raise ValueError(f"caption_to_video must have shape ({num_texts},) to match captions, "
                         f"got {caption_to_video.shape}")
    if topk.ndim != 2 or topk.shape[0] != num_texts:
        raise ValueError(f"topk must have shape ({num_texts}, k), got {topk.shape}")
    needed = videos_for_report(topk, num_queries, seed)
    missing = [v for v in needed if v not in thumbnails]
    if missing:
        raise ValueError(f"thumbnails lack {len(missing)} retrieved videos, e.g. {missing[:5]}: pass frames "
                         "for every index in videos_for_report(topk, num_queries, seed)")

    def name(video: int) -> str:
        return video_names[video] if video_names is not None else f"video {video}"

    uris: Dict[int, str] = {v: png_data_uri(thumbnail_strip(thumbnails[v])) for v in needed}
    parts = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if metrics:
        line = " · ".join(f"{html.escape(str(k))}: {html.escape(_format_metric(v))}" for k, v in metrics.items())
        parts.append(f'<p class="metrics">{line}</p>')
    for query in sample_query_indices(num_texts, num_queries, seed):
        truth = int(caption_to_video[query])
        parts.append(f'<div class="query" data-query="{query}" data-truth="{truth}">')
        parts.append(f'<p class="caption">#{query}: {html.escape(str(captions[query]))}</p>'
                     '<div class="results">')
        for position, video in enumerate(topk[query].tolist(), start=1):
            is_correct = video == truth
            label = f"{position}. {html.escape(name(video))}"
            if is_correct:
                label += ' <span class="correct-label">✓ correct</span>'
            parts.append(f'<figure class="clip{" correct" if is_correct else ""}" data-video="{video}">'
                         f'<img src="{uris[video]}" alt="{html.escape(name(video))}">'
                         f"<figcaption>{label}</figcaption></figure>")
        parts.append("</div>")
        if truth >= 0 and truth not in topk[query]:
            parts.append(f'<p class="miss">✗ correct clip ({html.escape(name(truth))}) is not in the '
                         f"top {topk.shape[1]}</p>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
