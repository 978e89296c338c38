"""Tests for clover_jax.evaluators: retrieval ranks/recalls, MC and QA accuracies, the HTML report."""
import base64
import html.parser
import math
import struct
import zlib

import numpy as np
import pytest

from clover_jax.evaluators import qa_metrics, report, retrieval

# ---------------------------------------------------------------- helpers

def _naive_ranks(video_emb, text_emb, text_to_video):
    """Full-matrix argsort reference (valid when there are no exact ties)."""
    v = video_emb / np.linalg.norm(video_emb, axis=1, keepdims=True)
    t = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    sims = t @ v.T
    t2v = np.array([np.flatnonzero(np.argsort(-row) == g)[0] + 1 for row, g in zip(sims, text_to_video)])
    v2t = []
    for j, row in enumerate(sims.T):
        order = np.argsort(-row)
        v2t.append(np.flatnonzero(text_to_video[order] == j)[0] + 1)
    return t2v, np.array(v2t)


def _random_split(seed, num_videos, captions_per_video, dim):
    rng = np.random.default_rng(seed)
    video_emb = rng.normal(size=(num_videos, dim))
    text_to_video = rng.permutation(np.repeat(np.arange(num_videos), captions_per_video))
    text_emb = rng.normal(size=(text_to_video.size, dim)) + 0.7 * video_emb[text_to_video]
    return video_emb, text_emb, text_to_video


def _decode_png(data: bytes) -> np.ndarray:
    """Minimal PNG reader for 8-bit RGB/grey, filter 0 (what report.encode_png writes); checks every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and interlace == 0
    channels = {0: 1, 2: 3}[color]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * channels)
    assert np.all(rows[:, 0] == 0), "reader only handles filter type 0"
    return rows[:, 1:].reshape(height, width, channels)


# ---------------------------------------------------------------- retrieval

def test_identical_embeddings_give_perfect_recall():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 16)).astype(np.float32)
    m = retrieval.retrieval_metrics(emb, emb * 3.0, np.arange(50))
    for direction in ("t2v", "v2t"):
        assert m[f"{direction}_r1"] == 100.0 and m[f"{direction}_r10"] == 100.0
        assert m[f"{direction}_median_rank"] == 1.0 and m[f"{direction}_mean_rank"] == 1.0
    assert m["sum_recall"] == 300.0 and m["recall_all"] == 299.0
    assert (m["num_videos"], m["num_texts"]) == (50, 50)


def test_shuffled_captions_with_matching_labels_are_all_rank_one():
    rng = np.random.default_rng(1)
    video_emb = rng.normal(size=(40, 8))
    perm = rng.permutation(40)
    ranks = retrieval.text_to_video_ranks(video_emb, video_emb[perm], perm)
    np.testing.assert_array_equal(ranks, np.ones(40))


def test_hand_built_similarity_matrix_gives_known_ranks():
    # Videos are the basis vectors, so each caption's similarities are its entries / sqrt(14)
    # (all captions are permutations of (1, 2, 3) and share that norm: column order is preserved too).
    video_emb = np.eye(3)
    text_emb = np.array([[3, 2, 1], [3, 2, 1], [1, 2, 3], [1, 3, 2]], dtype=np.float64)
    text_to_video = np.array([0, 1, 0, 2])
    np.testing.assert_array_equal(retrieval.text_to_video_ranks(video_emb, text_emb, text_to_video),
                                  [1, 2, 3, 2])
    # v0's captions are t0 (3) and t2 (1): best is 3, nothing beats it (t1 ties) -> 1.
    # v1: own t1 = 2, t3 = 3 beats it -> 2.  v2: own t3 = 2, t2 = 3 beats it -> 2.
    np.testing.assert_array_equal(retrieval.video_to_text_ranks(video_emb, text_emb, text_to_video),
                                  [1, 2, 2])
    m = retrieval.retrieval_metrics(video_emb, text_emb, text_to_video)
    assert m["t2v_r1"] == 25.0 and m["t2v_r5"] == 100.0
    assert m["t2v_median_rank"] == 2.0 and m["t2v_mean_rank"] == 2.0
    assert m["v2t_r1"] == pytest.approx(100 / 3) and m["v2t_median_rank"] == 2.0
    assert m["v2t_mean_rank"] == pytest.approx(5 / 3)
    assert m["sum_recall"] == 225.0


def test_angles_on_a_line_give_exact_ranks_for_a_permuted_labelling():
    # Video m sits at 5m degrees, caption i at 5i+1 degrees (all within 90 degrees, so cosine falls
    # with angular distance). Expected rank from integer distances only.
    n = 12
    video_deg = 5 * np.arange(n)
    text_deg = video_deg + 1

    def as_vec(deg):
        return np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], axis=1)

    labels = np.random.default_rng(2).permutation(n)
    ranks = retrieval.text_to_video_ranks(as_vec(video_deg), as_vec(text_deg), labels)
    expected = [1 + np.sum(np.abs(video_deg - text_deg[i]) < abs(video_deg[labels[i]] - text_deg[i]))
                for i in range(n)]
    np.testing.assert_array_equal(ranks, expected)
    assert len(set(expected)) > 4  # the labelling really spreads the ranks


def test_ties_count_only_strictly_greater_similarities():
    video_emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # videos 0 and 1 are identical
    text_emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    text_to_video = np.array([0, 1, 2])
    # Each of t0/t1 ties with the other's video: both rank 1. t2: cos 0.8 vs 0.6 -> rank 1.
    np.testing.assert_array_equal(retrieval.text_to_video_ranks(video_emb, text_emb, text_to_video), [1, 1, 1])
    np.testing.assert_array_equal(retrieval.video_to_text_ranks(video_emb, text_emb, text_to_video), [1, 1, 1])
    # A strictly closer distractor does push it down.
    np.testing.assert_array_equal(
        retrieval.text_to_video_ranks(video_emb, np.array([[0.6, 0.8]]), np.array([0])), [2])


def test_multiple_captions_per_video_match_naive_argsort_both_ways():
    video_emb, text_emb, text_to_video = _random_split(3, num_videos=30, captions_per_video=4, dim=8)
    t2v, v2t = _naive_ranks(video_emb, text_emb, text_to_video)
    np.testing.assert_array_equal(retrieval.text_to_video_ranks(video_emb, text_emb, text_to_video), t2v)
    np.testing.assert_array_equal(retrieval.video_to_text_ranks(video_emb, text_emb, text_to_video), v2t)
    # The video rank is the best of its captions' ranks in the video's own row, never worse than any.
    assert v2t.max() < t2v.size


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_unchunked(chunk_size):
    video_emb, text_emb, text_to_video = _random_split(4, num_videos=50, captions_per_video=3, dim=16)
    whole = retrieval.retrieval_metrics(video_emb, text_emb, text_to_video, chunk_size=10_000)
    chunked = retrieval.retrieval_metrics(video_emb, text_emb, text_to_video, chunk_size=chunk_size)
    assert chunked == whole
    np.testing.assert_array_equal(retrieval.top_k(video_emb, text_emb, 5, chunk_size=chunk_size),
                                  retrieval.top_k(video_emb, text_emb, 5, chunk_size=10_000))


def test_random_embeddings_give_chance_recall():
    num_videos, per_video = 200, 10
    rng = np.random.default_rng(5)
    video_emb = rng.normal(size=(num_videos, 32)).astype(np.float32)
    text_emb = rng.normal(size=(num_videos * per_video, 32)).astype(np.float32)
    text_to_video = np.arange(num_videos * per_video) % num_videos
    m = retrieval.retrieval_metrics(video_emb, text_emb, text_to_video)
    num_texts = text_to_video.size
    for k in (1, 5, 10):
        p = k / num_videos  # one correct video among num_videos
        assert abs(m[f"t2v_r{k}"] - 100 * p) < 4 * 100 * math.sqrt(p * (1 - p) / num_texts)
        # At least one of the video's 10 captions in the top k of num_texts captions.
        q = 1 - math.comb(num_texts - per_video, k) / math.comb(num_texts, k)
        assert abs(m[f"v2t_r{k}"] - 100 * q) < 4 * 100 * math.sqrt(q * (1 - q) / num_videos) + 1e-9
    # Uniform 1..Nv rank: mean (Nv+1)/2, sd of the mean ~ Nv/sqrt(12 Nt).
    assert abs(m["t2v_mean_rank"] - (num_videos + 1) / 2) < 4 * num_videos / math.sqrt(12 * num_texts)
    assert abs(m["t2v_median_rank"] - (num_videos + 1) / 2) < 10


def test_top_k_matches_full_sort_and_orders_ties_by_index():
    video_emb, text_emb, _ = _random_split(6, num_videos=20, captions_per_video=2, dim=8)
    sims = retrieval.l2_normalize(text_emb) @ retrieval.l2_normalize(video_emb).T
    np.testing.assert_array_equal(retrieval.top_k(video_emb, text_emb, 4), np.argsort(-sims, axis=1)[:, :4])
    np.testing.assert_array_equal(retrieval.top_k(video_emb, text_emb, 20), np.argsort(-sims, axis=1))
    tied = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_array_equal(retrieval.top_k(tied, np.array([[0.0, 1.0]]), 3), [[0, 2, 3]])


def test_multiple_choice_accuracy_uses_cosine_not_dot_product():
    rng = np.random.default_rng(7)
    cosines = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    n, k = 4, 5
    video_emb = np.zeros((n, 3))
    video_emb[:, 0] = rng.uniform(0.5, 2.0, size=n)
    option_emb = np.zeros((n, k, 3))
    best = np.empty(n, dtype=np.int64)
    for i in range(n):
        order = rng.permutation(k)
        option_emb[i, :, 0] = cosines[order]
        option_emb[i, :, 1] = np.sqrt(1 - cosines[order] ** 2)
        best[i] = np.argmax(cosines[order])
        runner_up = int(np.flatnonzero(cosines[order] == 0.7)[0])
        option_emb[i, runner_up] *= 100.0  # would win on raw dot product, not on cosine
    answer = best.copy()
    answer[3] = (best[3] + 1) % k
    assert retrieval.multiple_choice_accuracy(video_emb, option_emb, answer) == 75.0
    assert retrieval.multiple_choice_accuracy(video_emb, option_emb, best) == 100.0


def test_retrieval_rejects_bad_inputs():
    emb = np.ones((3, 4))
    with pytest.raises(ValueError, match="NaN"):
        retrieval.retrieval_metrics(emb, np.full((3, 4), np.nan), np.arange(3))
    with pytest.raises(ValueError, match="outside"):
        retrieval.retrieval_metrics(emb, emb, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="no caption"):
        retrieval.video_to_text_ranks(emb, emb, np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="dim"):
        retrieval.retrieval_metrics(emb, np.ones((3, 5)), np.arange(3))


# ---------------------------------------------------------------- QA

def test_open_ended_accuracy_counts_out_of_vocab_as_wrong():
    logits = np.array([[0.1, 2.0, 0.3], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    answer = np.array([1, 0, 0, -1, -1])  # 2 right, 1 wrong, 2 out of vocabulary
    result = qa_metrics.open_ended_accuracy(logits, answer)
    assert result == {"accuracy": 40.0, "num": 5, "num_out_of_vocab": 2}
    with pytest.raises(ValueError, match="out-of-vocab"):
        qa_metrics.open_ended_accuracy(logits, np.array([1, 0, 0, 3, -2]))


def test_multiple_choice_qa_accuracy_and_view_averaging():
    view_a = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    view_b = np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 1.0]])
    averaged = qa_metrics.average_views([view_a, view_b])
    np.testing.assert_allclose(averaged, [[0.0, 0.5, 1.5], [1.0, 0.0, 0.5]])
    np.testing.assert_allclose(qa_metrics.average_views(np.stack([view_a, view_b])), averaged)
    answer = np.array([1, 0])
    assert qa_metrics.multiple_choice_qa_accuracy(view_a, answer) == 100.0
    assert qa_metrics.multiple_choice_qa_accuracy(averaged, answer) == 50.0
    with pytest.raises(ValueError, match="same"):
        qa_metrics.average_views([view_a, view_b[:1]])


def test_majority_baseline_counts_unseen_answers_wrong():
    result = qa_metrics.majority_baseline(["dog", "cat", "dog", "man"], ["dog", "zebra", "cat", "dog"])
    assert result == {"accuracy": 50.0, "answer": "dog", "num": 4}
    assert qa_metrics.majority_baseline(["b", "a", "a", "b"], ["a"])["answer"] == "b"  # tie: first seen wins


# ---------------------------------------------------------------- report

class _ReportParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.queries, self._figure = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "query":
            self.queries.append({"truth": int(attrs["data-truth"]), "clips": []})
        elif tag == "figure":
            self._figure = {"video": int(attrs["data-video"]), "classes": attrs["class"].split(), "text": ""}
            self.queries[-1]["clips"].append(self._figure)
        elif tag == "img":
            self._figure["src"] = attrs["src"]

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None

    def handle_data(self, data):
        if self._figure is not None:
            self._figure["text"] += data


def test_retrieval_report_embeds_decodable_thumbnails_and_marks_the_correct_clip(tmp_path):
    rng = np.random.default_rng(8)
    num_videos, num_texts, k, frames, height, width = 6, 8, 3, 3, 4, 5
    thumbnails = {v: rng.integers(0, 256, size=(frames, height, width, 3), dtype=np.uint8)
                  for v in range(num_videos)}
    caption_to_video = np.arange(num_texts) % num_videos
    topk = np.stack([np.roll(np.arange(num_videos), -int(t))[:k] for t in caption_to_video])
    topk[2] = [4, 5, 0]  # caption 2's video (2) is missed
    topk[5] = [0, 1, 5]  # caption 5's video found at position 3
    captions = [f"a <b>clip</b> & caption {i}" for i in range(num_texts)]
    metrics = {"t2v_r1": 12.3456, "num_texts": num_texts}

    path = report.write_retrieval_report(tmp_path / "sub" / "report.html", captions, caption_to_video, topk,
                                         thumbnails, metrics=metrics, num_queries=num_texts, seed=0)
    text = path.read_text(encoding="utf-8")
    assert "t2v_r1: 12.35" in text and "num_texts: 8" in text
    assert "a &lt;b&gt;clip&lt;/b&gt; &amp; caption 3" in text
    parser = _ReportParser()
    parser.feed(text)
    assert len(parser.queries) == num_texts
    assert text.count("<img ") == num_texts * k
    for query_index, query in enumerate(parser.queries):
        assert [clip["video"] for clip in query["clips"]] == topk[query_index].tolist()
        for clip in query["clips"]:
            is_correct = clip["video"] == query["truth"]
            assert ("correct" in clip["classes"]) == is_correct
            assert ("✓ correct" in clip["text"]) == is_correct
            assert clip["src"].startswith("data:image/png;base64,")
            pixels = _decode_png(base64.b64decode(clip["src"].split(",", 1)[1]))
            assert pixels.shape == (height, frames * width, 3)
            np.testing.assert_array_equal(pixels, np.concatenate(list(thumbnails[clip["video"]]), axis=1))
    assert text.count("✓ correct") == num_texts - 1
    assert text.count('class="miss"') == 1


def test_report_samples_queries_deterministically_and_needs_their_thumbnails(tmp_path):
    topk = np.arange(40).reshape(20, 2) % 7
    needed = report.videos_for_report(topk, num_queries=5, seed=3)
    assert needed == report.videos_for_report(topk, num_queries=5, seed=3)
    thumbs = {v: np.zeros((2, 3, 3, 3), np.uint8) for v in needed}
    path = report.write_retrieval_report(tmp_path / "r.html", [f"c{i}" for i in range(20)], np.zeros(20, int),
                                         topk, thumbs, num_queries=5, seed=3)
    assert path.read_text(encoding="utf-8").count("<img ") == 10
    del thumbs[needed[0]]
    with pytest.raises(ValueError, match="videos_for_report"):
        report.write_retrieval_report(tmp_path / "r2.html", [f"c{i}" for i in range(20)], np.zeros(20, int),
                                      topk, thumbs, num_queries=5, seed=3)


def test_encode_png_greyscale_round_trip():
    image = np.arange(35, dtype=np.uint8).reshape(5, 7)
    np.testing.assert_array_equal(_decode_png(report.encode_png(image))[:, :, 0], image)
    with pytest.raises(ValueError, match="uint8"):
        report.encode_png(image.astype(np.float32))


def test_recall_all_on_a_hand_made_similarity_matrix():
    """`recall_all` is the reference's `Recall@all` (its pre-training best-checkpoint key): t2v R@1 + R@5 +
    R@10 - MdR, MdR = median(0-based rank) + 1 (`recall_for_video_text_retrieval`)."""
    want_ranks = [1, 1, 1, 2, 3, 4, 6, 8, 11, 12, 5, 1]
    n = len(want_ranks)
    sims = np.full((n, n), 0.1) - 0.001 * np.arange(n)  # distinct values: no ties
    for i, r in enumerate(want_ranks):
        sims[i, i] = 0.5
        others = [j for j in range(n) if j != i][: r - 1]
        sims[i, others] = 0.9 - 0.01 * np.arange(r - 1)
    # Videos are the basis vectors: each caption's cosines are its row over its norm (order kept).
    m = retrieval.retrieval_metrics(np.eye(n), sims, np.arange(n))
    # By hand: 4 ranks <= 1, 8 <= 5, 10 <= 10 of 12; sorted ranks 1,1,1,1,2,3,4,5,6,8,11,12 -> MdR (3+4)/2.
    assert m["t2v_median_rank"] == 3.5
    assert m["recall_all"] == pytest.approx(100 * (4 + 8 + 10) / 12 - 3.5)  # 179.8333
    # The reference's computation, line for line (argsort of -scores, text rows).
    ind = np.where(np.argsort(-sims, axis=1) == np.arange(n)[:, None])[1]
    official = sum(100 * np.sum(ind < k) / n for k in (1, 5, 10)) - (np.median(ind) + 1)
    assert m["recall_all"] == pytest.approx(official)
