"""Retrieval on the mesh (`clover_jax/evaluators/mesh_retrieval.py`) equals the numpy reference exactly.

Ranks: float data with planted ties (duplicated clips and captions, zero rows) and near-ties that float32
rounding decides differently in every kernel; the reference takes float64 dot products of the float32 unit rows,
the mesh re-scores its near-ties in double-float. Top-k and the many-ties cases use "exact" embeddings: rows of ±1
and ±3 whose squared norm is exactly 64, so every unit row, product and partial sum is a small multiple of 1/64
and no float32 rounding happens in either path, in any summation order; the ties are then many (129 possible
scores), on top of the planted ones.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clover_jax import partitioning
from clover_jax.evaluators import mesh_retrieval, retrieval

DIM = 64


def exact_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, DIM) float32 rows of 0, ±1, ±3 with squared norm exactly 64."""
    out = np.zeros((n, DIM), np.float32)
    threes = rng.integers(0, 8, n)
    for row, n3 in enumerate(threes):
        where = rng.permutation(DIM)[: n3 + 64 - 9 * n3]
        out[row, where] = np.where(np.arange(where.size) < n3, 3.0, 1.0) * rng.choice([-1.0, 1.0], where.size)
    return out


def perturbed(rng: np.random.Generator, rows: np.ndarray) -> np.ndarray:
    """Each row with a random share of its positions shuffled and re-signed (the squared norm is kept)."""
    out = rows.copy()
    for row in out:
        where = rng.permutation(DIM)[: rng.integers(8, DIM + 1)]
        row[where] = row[rng.permutation(where)] * rng.choice([-1.0, 1.0], where.size)
    return out


def random_split(seed: int = 0, num_videos: int = 5003) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """~4 * num_videos captions of num_videos random float clips (1-7 captions each, shuffled), captions noisy
    enough that ranks spread, with planted ties: 100 duplicated clips, 100 captions copied onto other clips, a
    zero clip and a zero caption (every score 0). 5,003 and ~20k rows are not multiples of 8."""
    rng = np.random.default_rng(seed)
    videos = rng.standard_normal((num_videos, DIM)).astype(np.float32)
    src, dst = rng.choice(num_videos, (2, 100), replace=False)
    videos[dst] = videos[src]
    videos[7] = 0.0
    text_to_video = np.repeat(np.arange(num_videos), rng.integers(1, 8, num_videos))
    text_to_video = text_to_video[rng.permutation(text_to_video.size)]
    texts = videos[text_to_video] + 2.5 * rng.standard_normal((text_to_video.size, DIM)).astype(np.float32)
    a, b = rng.choice(texts.shape[0], (2, 100), replace=False)
    texts[b] = texts[a]
    texts[11] = 0.0
    return videos, texts, text_to_video


@pytest.fixture(scope="module")
def tied_split():
    return random_split()


def mesh_of(devices: int) -> jax.sharding.Mesh:
    axes = {"data": 4, "model": 2} if devices == 8 else {"data": devices}  # 8: the evaluators' kind of mesh
    return partitioning.make_mesh(axes, jax.devices()[:devices])


@pytest.mark.parametrize("devices", [8, 1])
def test_metrics_equal_the_numpy_reference_with_planted_ties(tied_split, devices):
    videos, texts, text_to_video = tied_split
    assert 19_000 < texts.shape[0] < 21_000 and videos.shape[0] % 8 and texts.shape[0] % 8
    reference = retrieval.retrieval_metrics(videos, texts, text_to_video)
    on_mesh = mesh_retrieval.retrieval_metrics_on_mesh(videos, texts, text_to_video, mesh_of(devices))
    assert on_mesh == reference  # every key, exact floats
    assert 1 < reference["t2v_median_rank"] < 100 and 0 < reference["t2v_r1"] < 100  # ranks are spread out


def test_many_exact_ties_rank_as_the_reference(small_split):
    """Exact rows tie by the dozen at every score: the near rows overflow the first pass's slots, and those
    queries run again with more."""
    videos, texts, text_to_video = small_split
    for devices in (8, 1):
        on_mesh = mesh_retrieval.retrieval_metrics_on_mesh(videos, texts, text_to_video, mesh_of(devices))
        assert on_mesh == retrieval.retrieval_metrics(videos, texts, text_to_video)


def test_ranks_equal_the_reference_ranks_for_any_query_block(tied_split):
    videos, texts, text_to_video = tied_split
    mesh = mesh_of(8)
    texts_part, t2v_part = texts[:3000], text_to_video[:3000]
    t2v = mesh_retrieval.ranks(mesh_retrieval.shard_gallery(videos, mesh), texts_part, t2v_part, query_block=24)
    np.testing.assert_array_equal(t2v, retrieval.text_to_video_ranks(videos, texts_part, t2v_part))
    v2t = mesh_retrieval.ranks(mesh_retrieval.shard_gallery(texts, mesh), videos, np.arange(len(videos)),
                               text_to_video, query_block=1000)
    np.testing.assert_array_equal(v2t, retrieval.video_to_text_ranks(videos, texts, text_to_video))


@pytest.fixture(scope="module")
def near_tie_split():
    """1,000 captions of 250 random 256-d clips, plus 250 twins: each clip nudged by ~1e-7, so a caption's score
    for its clip and for the twin differ by about float32's rounding of a 256-term dot product."""
    rng = np.random.default_rng(2)
    clips = rng.standard_normal((250, 256)).astype(np.float32)
    twins = clips + 1e-7 * rng.standard_normal(clips.shape).astype(np.float32)
    videos = np.concatenate([clips, twins])[rng.permutation(500)]
    text_to_video = rng.integers(0, 500, 1000)
    texts = videos[text_to_video] + 0.5 * rng.standard_normal((1000, 256)).astype(np.float32)
    text_to_video[:500] = np.arange(500)  # every clip captioned
    texts[:500] = videos[:500] + 0.5 * rng.standard_normal((500, 256)).astype(np.float32)
    return videos, texts, text_to_video


@pytest.mark.parametrize("devices", [8, 1])
def test_near_ties_rank_by_the_exact_cosine(near_tie_split, devices, monkeypatch):
    videos, texts, text_to_video = near_tie_split
    t2v = retrieval.text_to_video_ranks(videos, texts, text_to_video)  # float64 dot products of the unit rows
    unit_v, unit_t = retrieval.l2_normalize(videos), retrieval.l2_normalize(texts)
    float32 = unit_t @ unit_v.T
    float32_ranks = 1 + np.sum(float32 > float32[np.arange(1000), text_to_video][:, None], axis=1)
    assert np.sum(float32_ranks != t2v) >= 3  # float32 rounding alone would move some ranks
    monkeypatch.setattr(mesh_retrieval, "NEAR_SLOTS", 1)  # twins overflow one slot: those blocks run again
    reference = retrieval.retrieval_metrics(videos, texts, text_to_video)
    assert mesh_retrieval.retrieval_metrics_on_mesh(videos, texts, text_to_video, mesh_of(devices)) == reference
    gallery = mesh_retrieval.shard_gallery(videos, mesh_of(devices))
    np.testing.assert_array_equal(mesh_retrieval.ranks(gallery, texts, text_to_video, query_block=64), t2v)


def reference_top_k(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = retrieval.l2_normalize(queries) @ retrieval.l2_normalize(gallery).T
    rows = np.arange(gallery.shape[0])
    order = np.stack([np.lexsort((rows, -s))[:k] for s in sims])  # score descending, then row ascending
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture(scope="module")
def tied_gallery():
    rng = np.random.default_rng(1)
    gallery = exact_rows(rng, 3001)
    gallery[rng.choice(3001, 300)] = gallery[rng.choice(3001, 300)]
    gallery[5] = 0.0
    queries = perturbed(rng, gallery[rng.choice(3001, 150)])
    queries[0] = 0.0  # every score 0: the top k are rows 0..k-1
    return gallery, queries


@pytest.mark.parametrize("devices", [8, 1])
@pytest.mark.parametrize("k", [1, 10, 500, 3001])
def test_top_k_equals_a_stable_sort_with_ties(tied_gallery, devices, k):
    gallery, queries = tied_gallery
    sharded = mesh_retrieval.shard_gallery(gallery, mesh_of(devices))
    scores, indices = mesh_retrieval.top_k(sharded, queries, k)  # k=500, 3001 > the 376 rows of one of 8 devices
    want_scores, want_indices = reference_top_k(gallery, queries, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(indices[0], np.arange(k))


def test_a_device_array_gallery_gives_the_same_results(tied_gallery):
    gallery, queries = tied_gallery
    mesh = mesh_of(8)
    from_host = mesh_retrieval.top_k(mesh_retrieval.shard_gallery(gallery, mesh), queries, 20)
    from_device = mesh_retrieval.top_k(mesh_retrieval.shard_gallery(jnp.asarray(gallery), mesh), queries, 20)
    np.testing.assert_array_equal(from_host[1], from_device[1])
    np.testing.assert_array_equal(from_host[0], from_device[0])


def test_the_gallery_is_split_over_every_device_and_one_block_stays_small(tied_gallery):
    gallery, queries = tied_gallery
    sharded = mesh_retrieval.shard_gallery(gallery, mesh_of(8))
    assert sharded.num_valid == 3001 and sharded.rows_per_device == 376
    assert {s.data.shape for s in sharded.embeddings.addressable_shards} == {(376, DIM)}
    assert len({s.device for s in sharded.embeddings.addressable_shards}) == 8
    ids = np.asarray(sharded.ids)
    np.testing.assert_array_equal(ids, np.r_[np.arange(3001), [-1] * 7])
    memory = mesh_retrieval.block_memory(sharded, len(queries))  # the ranks program of one query block
    assert memory["argument"] < gallery.nbytes / 4  # one eighth of the gallery and the block
    # At most three (block, 376) matrices (the scores, masks, counts) and the near rows re-scored in double-float:
    # (block, slots, 64) floats gathered, and a few such arrays of products and sums; no (block, 3001) matrix.
    slots = mesh_retrieval.NEAR_SLOTS
    assert memory["temp"] <= 3.1 * memory["block"] * 376 * 4 + 5 * memory["block"] * slots * DIM * 4


def test_query_block_sizes():
    assert mesh_retrieval.query_block_size(1, 1000) == 8
    assert mesh_retrieval.query_block_size(100, 1000) == 128
    assert mesh_retrieval.query_block_size(10_000, 1000) == 1024
    assert mesh_retrieval.query_block_size(10_000, 125_000) == 2**25 // 125_000  # the per-device score budget
    assert mesh_retrieval.query_block_size(10_000, 10**8) == 8
    assert mesh_retrieval.query_block_size(10_000, 1000, query_block=5) == 5


def test_empty_queries_give_empty_results(tied_gallery):
    sharded = mesh_retrieval.shard_gallery(tied_gallery[0], mesh_of(8))
    scores, indices = mesh_retrieval.top_k(sharded, np.zeros((0, DIM), np.float32), 3)
    assert scores.shape == indices.shape == (0, 3)


def test_bad_input_stops_with_one_line():
    mesh = mesh_of(8)
    gallery = mesh_retrieval.shard_gallery(np.eye(4, 8, dtype=np.float32), mesh)
    cases = [
        (lambda: mesh_retrieval.top_k(gallery, np.ones((2, 8), np.float32), 5), r"k must be in \[1, 4\]"),
        (lambda: mesh_retrieval.top_k(gallery, np.ones((2, 8), np.float32), 0), r"k must be in \[1, 4\]"),
        (lambda: mesh_retrieval.top_k(gallery, np.ones((2, 7), np.float32), 1), r"queries must be \(Q, 8\)"),
        (lambda: mesh_retrieval.top_k(gallery, np.full((1, 8), np.nan, np.float32), 1), "NaN"),
        (lambda: mesh_retrieval.shard_gallery(np.zeros((0, 8), np.float32), mesh), "empty"),
        (lambda: mesh_retrieval.shard_gallery(np.zeros(8, np.float32), mesh), "2 dims"),
        (lambda: mesh_retrieval.shard_gallery(np.full((3, 8), np.inf, np.float32), mesh), "NaN or inf"),
        (lambda: mesh_retrieval.shard_gallery(jnp.zeros((0, 8)), mesh), "non-empty"),
        (lambda: mesh_retrieval.ranks(gallery, np.ones((2, 8), np.float32), np.arange(3)), "positives must be"),
        (lambda: mesh_retrieval.retrieval_metrics_on_mesh(np.eye(3), np.eye(3), np.array([0, 0, 1]), mesh),
         "no caption"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def small_split():
    """2,000 captions of 500 clips (4 each, fed in shuffled order) with planted ties: 20 duplicated clips, 20
    captions copied onto other clips, a zero clip and a zero caption; 500 rows is not a multiple of 8."""
    rng = np.random.default_rng(5)
    videos = exact_rows(rng, 500)
    src, dst = rng.choice(500, (2, 20), replace=False)
    videos[dst] = videos[src]
    videos[3] = 0.0
    text_to_video = np.repeat(np.arange(500), 4)
    texts = perturbed(rng, videos[text_to_video])
    a, b = rng.choice(2000, (2, 20), replace=False)
    texts[b] = texts[a]
    texts[9] = 0.0
    return videos, texts, text_to_video


def test_galleries_from_local_rows_rank_as_the_reference(small_split, monkeypatch):
    """Rows given in any order with their ids (as a process gives its own chunk) make a gallery of N/8 rows a
    device whose ranks, metrics and top-k equal the host paths and the numpy reference."""
    videos, texts, text_to_video = small_split
    mesh = mesh_of(8)
    monkeypatch.setattr(mesh_retrieval, "shard_gallery", None)  # nothing here may place a host gallery
    rng = np.random.default_rng(1)
    v_order, t_order = rng.permutation(500), rng.permutation(2000)
    v_gallery = mesh_retrieval.gallery_from_local(videos[v_order], v_order, mesh)
    t_gallery = mesh_retrieval.gallery_from_local(texts[t_order], t_order, mesh)
    for gallery, n in ((v_gallery, 500), (t_gallery, 2000)):
        assert isinstance(gallery.embeddings, jax.Array) and gallery.num_valid == n
        assert {s.data.shape for s in gallery.embeddings.addressable_shards} == {(-(-n // 8), DIM)}
        assert len({s.device for s in gallery.embeddings.addressable_shards}) == 8
        assert sorted(np.asarray(gallery.ids)[np.asarray(gallery.ids) >= 0]) == list(range(n))
    # A block of query rows reaches every device without any device receiving the whole query gallery.
    gather = mesh_retrieval._gather_fn(mesh, (0.0, -1)).lower(np.arange(64, dtype=np.int32), t_gallery.embeddings,
                                                              t_gallery.ids).compile()
    assert gather.memory_analysis().temp_size_in_bytes < t_gallery.embeddings.nbytes / 8
    reference = retrieval.retrieval_metrics(videos, texts, text_to_video)
    metrics = mesh_retrieval.retrieval_metrics_of_galleries(v_gallery, t_gallery, text_to_video, query_block=64)
    assert metrics == reference
    np.testing.assert_array_equal(mesh_retrieval.ranks(v_gallery, t_gallery, text_to_video),
                                  retrieval.text_to_video_ranks(videos, texts, text_to_video))
    scores, indices = mesh_retrieval.top_k(v_gallery, t_gallery, 7)  # queries taken block by block from the mesh
    want_scores, want_indices = reference_top_k(videos, texts, 7)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)


def test_an_opened_index_reads_only_each_device_rows(small_split, tmp_path, monkeypatch):
    """`Index.open` reads nothing; its first search reads the tensorstore array one device shard at a time
    (8 row ranges of N/8), never whole, and ranks as the numpy reference does."""
    from clover_jax import video_index

    videos, texts, _ = small_split
    gallery = np.concatenate([texts, videos])  # 2,500 rows: 313 a device, the last one padded
    video_index.write_embeddings(tmp_path / "embeddings-000001", gallery)
    manifest = dict(format=video_index.FORMAT, version=video_index.VERSION, array="embeddings-000001",
                    videos_root=str(tmp_path), videos=[dict(path=f"v{i:04d}.mp4", clips=[[0.0, 1.0]])
                                                       for i in range(len(gallery))])
    (tmp_path / video_index.MANIFEST).write_text(__import__("json").dumps(manifest))
    reads = []
    real_read = video_index.read_rows
    monkeypatch.setattr(video_index, "read_rows", lambda array, a, b: reads.append((a, b)) or real_read(array, a, b))
    monkeypatch.setattr(video_index, "read_embeddings", None)
    index = video_index.Index.open(tmp_path)
    assert reads == [] and len(index) == 2500
    queries = videos[:40]
    hits = index.search_embeddings(queries, 5)
    assert sorted(reads) == [(313 * d, min(313 * (d + 1), 2500)) for d in range(8)]
    assert {s.data.shape for s in index._gallery.embeddings.addressable_shards} == {(313, DIM)}
    _, want = reference_top_k(gallery, queries, 5)
    assert [[h.row for h in q] for q in hits] == want.tolist()
    index.search_embeddings(queries, 5)
    assert len(reads) == 8  # the placed gallery is reused


def test_the_retrieval_evaluator_ranks_on_its_mesh(small_split, tmp_path, monkeypatch):
    """`entries.RetrievalEvaluator.run` with the real `embed_split_on_mesh` (the model and the input pipeline
    stubbed: batches fed out of order, the last one padded) keeps every embedding sharded and reports the
    reference's metrics and a page."""
    import types

    from clover_jax.evaluators import entries, split_passes

    videos, texts, text_to_video = small_split
    mesh = mesh_of(8)
    passes = object.__new__(split_passes.SplitPasses)
    passes.batch_sharding = partitioning.batch_sharding(mesh)
    passes.replicated = partitioning.replicated(mesh)
    passes._identity = jax.jit(lambda x: x, out_shardings=passes.replicated)
    table = jnp.asarray(texts)
    passes.video_fn = jax.jit(lambda p, v: v[:, 0, 0, 0], out_shardings=passes.replicated)
    passes.text_fn = jax.jit(lambda p, i, m: table[i[:, 1] - 1000], out_shardings=passes.replicated)
    caption_index = np.arange(2000) % 4

    def batches(cfg, mode, include_video):
        order = np.random.default_rng(2).permutation(500 if mode == "clips" else 2000)
        for start in range(0, len(order), 16):
            items = np.pad(order[start:start + 16], (0, 16 - len(order[start:start + 16])))
            valid = np.arange(16) < len(order) - start
            if mode == "clips":
                yield dict(clip_index=items, valid=valid, video=videos[items][:, None, None, None])
            else:
                ids = np.stack([np.full(16, 101), 1000 + items, np.full(16, 102)], axis=1)
                yield dict(clip_index=text_to_video[items], caption_index=caption_index[items], valid=valid,
                           text_ids=ids, text_mask=np.ones_like(ids))

    monkeypatch.setattr(split_passes, "make_eval_dataset", batches)
    monkeypatch.setattr(split_passes, "thumbnails", lambda video, cfg: np.zeros((len(video), 2, 4, 4, 3), np.uint8))
    monkeypatch.setattr(mesh_retrieval, "shard_gallery", None)
    emb = passes.embed_split_on_mesh(None, None, with_thumbnails=True)
    for gallery, n in ((emb["videos"], 500), (emb["texts"], 2000)):
        assert {s.data.shape for s in gallery.embeddings.addressable_shards} == {(-(-n // 8), DIM)}
    np.testing.assert_array_equal(emb["text_to_video"], text_to_video)
    calls = []
    monkeypatch.setattr(mesh_retrieval, "_ranks_fn", _counting(mesh_retrieval._ranks_fn, calls))
    evaluator = object.__new__(entries.RetrievalEvaluator)
    evaluator.name, evaluator.out_dir = "retrieval", tmp_path
    evaluator.settings = types.SimpleNamespace(report_queries=5)
    evaluator.cfg = types.SimpleNamespace(split="test", dataset="/data/synthetic/1.0.0")
    evaluator.passes = passes
    metrics = evaluator.run(params=None, step=3)
    reference = retrieval.retrieval_metrics(videos, texts, text_to_video)
    assert {k: metrics[k] for k in reference} == reference and len(calls) >= 2 and set(calls) == {mesh}
    assert (tmp_path / "retrieval_step3.html").exists() and (tmp_path / "retrieval_step3.json").exists()


def _counting(builder, calls):
    def wrapped(mesh, *args):
        calls.append(mesh)
        return builder(mesh, *args)
    return wrapped
