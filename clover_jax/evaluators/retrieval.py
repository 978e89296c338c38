"""Dual-encoder retrieval metrics (text->video, video->text, MSRVTT-MC) on plain numpy embeddings.

Conventions (clover-reference.md §5.1, `recall_for_video_text_retrieval` in the reference):
  * Similarity is cosine: each row is divided by max(||x||, 1e-8) before the dot product. The ranks take the
    dot products of those (float32) unit rows in float64, so a near-tie with the correct item is decided by the
    exact cosine, not by which float32 kernel rounded last (the mesh path re-scores near-ties to match).
  * Ranks are 1-based. The rank of the correct item is 1 + the number of candidates whose similarity
    is STRICTLY greater than the correct item's. Ties therefore resolve in the query's favour (an
    exact tie with the correct item never pushes it down). The reference argsorts instead, where tie
    order is arbitrary; with float embeddings exact ties do not happen in practice.
  * The reference reports MdR = median(0-based rank) + 1, which equals median(1-based rank): our
    `*_median_rank` is that same number. With an even number of queries it can end in .5.
  * R@k is a percentage: 100 * fraction of queries whose rank <= k.
  * Many captions per video: text->video has one query per caption; video->text has one query per
    video whose rank is the BEST rank among all of its captions (i.e. counted against the caption
    with the highest similarity), as in big_vision's image_text_retrieval and Collaborative Experts.

Memory: the similarity matrix is never materialised whole. Queries are processed `chunk_size` rows at a
time, so peak memory is about chunk_size * num_candidates floats (no per-row argsort). The evaluators rank with
`mesh_retrieval.py` instead (the gallery sharded over the devices); these functions are its test reference.
"""
from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np

RECALL_KS = (1, 5, 10)
DEFAULT_CHUNK_SIZE = 1024
_EPS = 1e-8


def l2_normalize(x: np.ndarray, eps: float = _EPS) -> np.ndarray:
    """x / max(||x||, eps) along the last axis, in at least float32 (float64 stays float64)."""
    x = np.asarray(x)
    x = x.astype(np.promote_types(x.dtype, np.float32), copy=False)
    norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
    return x / np.maximum(norm, eps)


def check_embeddings(name: str, emb: np.ndarray, ndim: int = 2) -> np.ndarray:
    """`emb` as a numpy array; ValueError unless it is a non-empty, finite float array of `ndim` dims."""
    emb = np.asarray(emb)
    if emb.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {emb.dtype}")
    if emb.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {emb.shape}): nothing to evaluate")
    if not np.all(np.isfinite(emb)):
        # NaN compares False with everything, which would silently give rank 1 to every query.
        raise ValueError(f"{name} contains NaN or inf: fix the model / embedding step before evaluating")
    return emb


def check_pairs(video_emb: np.ndarray, text_emb: np.ndarray, text_to_video: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(video_emb, text_emb, text_to_video as int64), after checking shapes, dims and index ranges."""
    video_emb = check_embeddings("video_emb", video_emb)
    text_emb = check_embeddings("text_emb", text_emb)
    if video_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"video_emb dim {video_emb.shape[1]} != text_emb dim {text_emb.shape[1]}: "
                         "both must come from the same projection size")
    text_to_video = np.asarray(text_to_video)
    if text_to_video.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_video must have shape ({text_emb.shape[0]},) (one video index per "
                         f"caption), got {text_to_video.shape}")
    if not np.issubdtype(text_to_video.dtype, np.integer):
        raise ValueError(f"text_to_video must be integer video indices, got dtype {text_to_video.dtype}")
    bad = (text_to_video < 0) | (text_to_video >= video_emb.shape[0])
    if np.any(bad):
        raise ValueError(f"text_to_video has {int(bad.sum())} indices outside [0, {video_emb.shape[0]}), "
                         f"e.g. {text_to_video[bad][:5].tolist()}")
    return video_emb, text_emb, text_to_video.astype(np.int64)


def _chunks(n: int, chunk_size: int) -> Iterator[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def text_to_video_ranks(video_emb: np.ndarray, text_emb: np.ndarray, text_to_video: np.ndarray,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """(Nt,) int64 1-based rank of each caption's own video among all videos (ties: strictly greater)."""
    video_emb, text_emb, text_to_video = check_pairs(video_emb, text_emb, text_to_video)
    videos = l2_normalize(video_emb).astype(np.float64)
    texts = l2_normalize(text_emb).astype(np.float64)
    ranks = np.empty(texts.shape[0], dtype=np.int64)
    for rows in _chunks(texts.shape[0], chunk_size):
        sims = texts[rows] @ videos.T  # (chunk, Nv)
        # The correct similarity is read from the same matrix, so equal inputs compare equal exactly.
        correct = sims[np.arange(sims.shape[0]), text_to_video[rows]]
        ranks[rows] = 1 + np.count_nonzero(sims > correct[:, None], axis=1)
    return ranks


def check_captions(text_to_video: np.ndarray, num_videos: int) -> np.ndarray:
    """(num_videos,) captions per video; ValueError when a video has none (its video->text rank is undefined)."""
    captions_per_video = np.bincount(text_to_video, minlength=num_videos)
    if np.any(captions_per_video == 0):
        missing = np.flatnonzero(captions_per_video == 0)
        raise ValueError(f"{missing.size} videos have no caption in text_to_video (e.g. indices "
                         f"{missing[:5].tolist()}): video->text rank is undefined for them; drop those "
                         "videos from video_emb and re-index text_to_video")
    return captions_per_video


def video_to_text_ranks(video_emb: np.ndarray, text_emb: np.ndarray, text_to_video: np.ndarray,
                        chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """(Nv,) int64 1-based best rank, over all of a video's captions, among all captions.

    Equivalently 1 + the number of captions more similar to the video than its most similar own caption.
    Every video needs at least one caption; a video without one raises (drop it from video_emb).
    """
    video_emb, text_emb, text_to_video = check_pairs(video_emb, text_emb, text_to_video)
    num_videos = video_emb.shape[0]
    captions_per_video = check_captions(text_to_video, num_videos)
    videos = l2_normalize(video_emb).astype(np.float64)
    texts = l2_normalize(text_emb).astype(np.float64)
    caption_order = np.argsort(text_to_video, kind="stable")  # captions grouped by video
    group_start = np.concatenate([[0], np.cumsum(captions_per_video)])
    ranks = np.empty(num_videos, dtype=np.int64)
    for rows in _chunks(num_videos, chunk_size):
        sims = videos[rows] @ texts.T  # (chunk, Nt)
        own = caption_order[group_start[rows.start]:group_start[rows.stop]]
        own_sims = sims[text_to_video[own] - rows.start, own]
        best = np.full(sims.shape[0], -np.inf, dtype=sims.dtype)
        np.maximum.at(best, text_to_video[own] - rows.start, own_sims)
        ranks[rows] = 1 + np.count_nonzero(sims > best[:, None], axis=1)
    return ranks


def rank_summary(ranks: np.ndarray, prefix: str, ks: Tuple[int, ...] = RECALL_KS) -> Dict[str, float]:
    """R@k (percent), median and mean of 1-based ranks, keyed `{prefix}_r{k}`, `{prefix}_median_rank`, ..."""
    ranks = np.asarray(ranks)
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    return out


def retrieval_metrics(video_emb: np.ndarray, text_emb: np.ndarray, text_to_video: np.ndarray,
                      chunk_size: int = DEFAULT_CHUNK_SIZE) -> Dict[str, float]:
    """Text->video and video->text retrieval metrics for a whole split.

    Args:
      video_emb: (Nv, D) video embeddings (any scale; cosine is used).
      text_emb: (Nt, D) caption embeddings.
      text_to_video: (Nt,) int, the video index of each caption (several captions may share a video).
      chunk_size: query rows per similarity block.

    Returns a dict of floats:
      t2v_r1, t2v_r5, t2v_r10 (percent), t2v_median_rank (= the reference's MdR), t2v_mean_rank,
      v2t_r1, v2t_r5, v2t_r10, v2t_median_rank, v2t_mean_rank,
      sum_recall = t2v R@1+R@5+R@10, recall_all = sum_recall - t2v MdR (the reference's
      `Recall@all`, its pretrain best-checkpoint key), num_videos, num_texts.
    """
    t2v = text_to_video_ranks(video_emb, text_emb, text_to_video, chunk_size)
    v2t = video_to_text_ranks(video_emb, text_emb, text_to_video, chunk_size)
    return metrics_from_ranks(t2v, v2t)


def metrics_from_ranks(t2v_ranks: np.ndarray, v2t_ranks: np.ndarray) -> Dict[str, float]:
    """`retrieval_metrics`' dict from the (Nt,) text->video and (Nv,) video->text 1-based ranks."""
    metrics = {**rank_summary(t2v_ranks, "t2v"), **rank_summary(v2t_ranks, "v2t")}
    metrics["sum_recall"] = metrics["t2v_r1"] + metrics["t2v_r5"] + metrics["t2v_r10"]
    metrics["recall_all"] = metrics["sum_recall"] - metrics["t2v_median_rank"]
    metrics["num_videos"] = int(len(v2t_ranks))
    metrics["num_texts"] = int(len(t2v_ranks))
    return metrics


def multiple_choice_accuracy(video_emb: np.ndarray, option_emb: np.ndarray, answer: np.ndarray) -> float:
    """MSRVTT-MC with the dual encoder: percent of videos whose highest-cosine option is the answer.

    Args:
      video_emb: (N, D); option_emb: (N, K, D) the K candidate captions of each video; answer: (N,) int
      in [0, K). An exact tie between options goes to the lowest option index (argmax).
    Note: the reference `acc_for_msrvtt_mc` (default use_sim=False) takes raw dot products and returns a
    fraction; this uses cosine (as the retrieval metrics do) and returns a percentage.
    """
    video_emb = check_embeddings("video_emb", video_emb)
    option_emb = check_embeddings("option_emb", option_emb, ndim=3)
    n, k, d = option_emb.shape
    if video_emb.shape != (n, d):
        raise ValueError(f"video_emb shape {video_emb.shape} does not match option_emb {option_emb.shape}: "
                         f"expected ({n}, {d})")
    answer = _check_choice_answers(answer, n, k)
    scores = np.einsum("nd,nkd->nk", l2_normalize(video_emb), l2_normalize(option_emb))
    return float(100.0 * np.mean(np.argmax(scores, axis=1) == answer))


def _check_choice_answers(answer: np.ndarray, n: int, k: int) -> np.ndarray:
    answer = np.asarray(answer)
    if answer.shape != (n,) or not np.issubdtype(answer.dtype, np.integer):
        raise ValueError(f"answer must be an int array of shape ({n},), got {answer.dtype} {answer.shape}")
    if np.any((answer < 0) | (answer >= k)):
        raise ValueError(f"answer indices must lie in [0, {k}), got min {answer.min()} max {answer.max()}")
    return answer


def top_k(video_emb: np.ndarray, text_emb: np.ndarray, k: int,
          chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """(Nt, k) int64 video indices, most similar first, for each caption (cosine).

    Within the k, equal similarities are ordered by video index; which of several videos tied at the
    k-th place gets in is unspecified.
    """
    video_emb = check_embeddings("video_emb", video_emb)
    text_emb = check_embeddings("text_emb", text_emb)
    if video_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"video_emb dim {video_emb.shape[1]} != text_emb dim {text_emb.shape[1]}")
    num_videos = video_emb.shape[0]
    if not 1 <= k <= num_videos:
        raise ValueError(f"k must be in [1, {num_videos}] (the number of videos), got {k}")
    videos = l2_normalize(video_emb)
    texts = l2_normalize(text_emb)
    out = np.empty((texts.shape[0], k), dtype=np.int64)
    for rows in _chunks(texts.shape[0], chunk_size):
        sims = texts[rows] @ videos.T
        if k < num_videos:
            candidates = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            candidates = np.broadcast_to(np.arange(num_videos), sims.shape)
        cand_sims = np.take_along_axis(sims, candidates, axis=1)
        # Sort by similarity descending, then by video index ascending.
        order = np.lexsort((candidates, -cand_sims), axis=1)
        out[rows] = np.take_along_axis(candidates, order, axis=1)
    return out
