"""Block masks, batch contract, determinism, exact resume, per-host sharding, eval padding, mixtures."""
import numpy as np
import pytest

from data_pipelines.build import built_splits, synthetic
from data_pipelines.input import input_pipeline as ip
from data_pipelines.input import mixtures
from data_pipelines.input.device_transfer import numpy_batches
from data_pipelines.input.video_masking import BlockMaskConfig, block_mask, block_mask_grid, token_grid_size

CONTRACT = {"video", "video_mask", "text_ids", "text_mask", "text_ids_masked", "mlm_labels", "valid", "clip_index"}
SYN = synthetic.SyntheticConfig(seed=5, num_train=8, num_test=5, num_frames=8, size=32)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    folder = synthetic.build_synthetic(tmp_path_factory.mktemp("syn"), SYN)
    # 28 px -> 7x7 patch tokens -> one token per mask cell; 4 frames; global batch 4.
    return ip.InputConfig(dataset=str(folder), split="train", batch_size=4, num_frames=4, image_size=28, seed=11,
                          flip_prob=0.5)


def take(cfg, steps, start_step=0, process_index=0, process_count=1):
    it = numpy_batches(ip.make_train_dataset(cfg, start_step, process_index, process_count))
    return [next(it) for _ in range(steps)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- block masks


def test_block_masks_have_exactly_n_cells():
    cfg = BlockMaskConfig()
    counts, shortfalls = [], 0
    for seed in range(500):
        grid = block_mask_grid(np.random.default_rng(seed), cfg)
        counts.append(int(grid.sum()))
    # How often plain BEiT (no top-up) would fall short, for the record.
    for seed in range(500):
        from data_pipelines.input.video_masking import _try_block

        rng, mask, n = np.random.default_rng(seed), np.zeros((7, 7), bool), 0
        while n < 10 and (added := _try_block(mask, 10 - n, rng, cfg)):
            n += added
        shortfalls += n < 10
    print(f"500 masks: cell counts {set(counts)}; the BEiT loop alone fell short in {shortfalls}/500 (topped up)")
    assert set(counts) == {10}
    for n in (1, 5, 20, 49):
        assert int(block_mask_grid(np.random.default_rng(0), BlockMaskConfig(num_masked=n)).sum()) == n


def test_block_mask_resolution_and_determinism():
    m = block_mask(7, 224)
    assert m.shape == (56, 56) and m.dtype == np.float32 and m.sum() == 10 * 64
    cells = m.reshape(7, 8, 7, 8)
    assert (cells.min(axis=(1, 3)) == cells.max(axis=(1, 3))).all()  # each cell is a whole 8x8 token block
    np.testing.assert_array_equal(m, block_mask(7, 224))
    assert not np.array_equal(m, block_mask(8, 224))
    assert token_grid_size(112, BlockMaskConfig()) == 28
    with pytest.raises(ValueError, match="does not divide"):
        token_grid_size(192, BlockMaskConfig())  # 48 tokens, grid 7
    with pytest.raises(ValueError, match="does not divide"):
        ip.InputConfig(image_size=192)


# ----------------------------------------------------------------------------- training stream


def test_batch_contract(cfg):
    (batch,) = take(cfg, 1)
    assert set(batch) == CONTRACT
    b = cfg.batch_size
    assert batch["video"].shape == (b, 4, 28, 28, 3) and batch["video"].dtype == np.float32
    assert batch["video_mask"].shape == (b, 7, 7) and batch["video_mask"].dtype == np.float32
    for k in ("text_ids", "text_mask", "text_ids_masked", "mlm_labels"):
        assert batch[k].shape == (b, 30) and batch[k].dtype == np.int32
    assert batch["valid"].dtype == bool and batch["valid"].all()
    assert batch["clip_index"].dtype == np.int32
    # One spatial mask per clip (no time axis: the same mask for every frame), exactly 10 cells.
    np.testing.assert_array_equal(batch["video_mask"].sum(axis=(1, 2)), [10] * b)
    assert set(np.unique(batch["video_mask"])) == {0.0, 1.0}
    assert (batch["mlm_labels"] != -100).any(axis=1).all()  # every caption got some masked words
    v = batch["video"]
    print(f"video mean {v.mean():.3f} std {v.std():.3f}; first text ids {batch['text_ids'][0][:12]}")
    assert -3 < v.mean() < 3 and v.std() > 0.3


def test_same_seed_same_stream_and_other_seed_differs(cfg):
    first = take(cfg, 3)
    assert_batches_equal(first, take(cfg, 3))
    other = take(cfg.replace(seed=12), 3)
    assert not all(np.array_equal(a["clip_index"], o["clip_index"]) for a, o in zip(first, other))


def test_resume_at_step_k_matches_uninterrupted_run(cfg):
    full = take(cfg, 5)
    assert_batches_equal(full[3:], take(cfg, 2, start_step=3))


def test_two_processes_cover_each_example_once_per_epoch(cfg):
    n, b = SYN.num_train, cfg.batch_size
    single = take(cfg, 2 * n // b)  # two epochs
    per_process = [take(cfg, 2 * n // b, process_index=p, process_count=2) for p in (0, 1)]
    for step, batch in enumerate(single):  # local batches concatenate to the single-process global batch
        for k in batch:
            np.testing.assert_array_equal(np.concatenate([per_process[0][step][k], per_process[1][step][k]]), batch[k])
    steps_per_epoch = n // b
    orders = []
    for epoch in range(2):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        seen = np.concatenate([pp[s]["clip_index"] for s in steps
                               for pp in per_process])
        print(f"epoch {epoch}: clips seen by the 2 processes {sorted(seen.tolist())}")
        assert sorted(seen.tolist()) == list(range(n))
        orders.append(seen.tolist())
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_fresh_caption_and_masks_each_epoch(cfg):
    n, b = SYN.num_train, cfg.batch_size
    batches = take(cfg, 2 * n // b)
    rows = {}
    for epoch_batches, epoch in ((batches[: n // b], 0), (batches[n // b:], 1)):
        for batch in epoch_batches:
            for i, clip in enumerate(batch["clip_index"]):
                rows[(epoch, int(clip))] = (batch["text_ids_masked"][i], batch["video_mask"][i])
    changed_text = sum(not np.array_equal(rows[(0, c)][0], rows[(1, c)][0]) for c in range(n))
    changed_mask = sum(not np.array_equal(rows[(0, c)][1], rows[(1, c)][1]) for c in range(n))
    print(f"clips whose masked text / video mask changed between epochs: {changed_text}/{n}, {changed_mask}/{n}")
    assert changed_text >= n // 2 and changed_mask >= n // 2


# ----------------------------------------------------------------------------- evaluation


def test_eval_pads_and_keeps_every_clip_once(cfg):
    ecfg = cfg.replace(split="test")
    runs = [ip.make_eval_dataset(ecfg, "clips", process_index=p, process_count=2) for p in (0, 1)]
    batches = [list(r) for r in runs]
    assert runs[0].num_batches == runs[1].num_batches == len(batches[0]) == len(batches[1])
    valid_clips, padded = [], 0
    for process_batches in batches:
        for batch in process_batches:
            assert set(batch) == CONTRACT | {"caption_index"}
            assert batch["video_mask"].sum() == 0  # no masking at eval
            valid_clips += batch["clip_index"][batch["valid"]].tolist()
            padded += int((~batch["valid"]).sum())
    print(f"eval over {SYN.num_test} clips on 2 processes: {runs[0].num_batches} batches each, {padded} padded rows")
    assert sorted(valid_clips) == list(range(SYN.num_test)) and padded == 2 * runs[0].num_batches * 2 - SYN.num_test
    # Eval is deterministic: centre crop, segment-centre frames.
    again = list(ip.make_eval_dataset(ecfg, "clips", process_index=0, process_count=2))
    assert_batches_equal(batches[0], again)


def test_eval_pairs_cover_every_caption_once(cfg):
    ecfg = cfg.replace(split="test", batch_size=4)
    pairs = []
    for p in (0, 1):
        run = ip.make_eval_dataset(ecfg, "pairs", include_video=False, process_index=p, process_count=2)
        for batch in run:
            assert "video" not in batch
            valid = batch["valid"]
            pairs += list(zip(batch["clip_index"][valid].tolist(), batch["caption_index"][valid].tolist()))
    expected = [(c, k) for c in range(SYN.num_test) for k in range(SYN.captions_per_clip)]
    assert sorted(pairs) == expected


# ----------------------------------------------------------------------------- global arrays, mixtures


def test_global_arrays_on_a_batch_sharding(cfg):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    gcfg = cfg.replace(batch_size=8, num_frames=2)
    it = ip.make_train_iterator(gcfg, sharding, process_index=0, process_count=1)
    batch = next(it)
    local = take(gcfg, 1)[0]
    assert set(batch) == CONTRACT
    for k, v in batch.items():
        assert isinstance(v, jax.Array) and v.shape[0] == 8 and len(v.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(v), local[k])
    assert batch["video"].sharding.is_equivalent_to(sharding, batch["video"].ndim)


def test_mixture_schedule_and_resume(cfg):
    images = cfg.replace(num_frames=1, seed=3)  # CC3M-like: one frame per example
    alt = mixtures.MixtureConfig((mixtures.MixtureSource("webvid", cfg), mixtures.MixtureSource("cc3m", images)),
                                 mode="alternate")
    assert mixtures.mixture_schedule(alt, 0, 6).tolist() == [0, 1, 0, 1, 0, 1]
    weighted = mixtures.MixtureConfig(
        (mixtures.MixtureSource("webvid", cfg, 3.0), mixtures.MixtureSource("cc3m", images, 1.0)), mode="weighted",
        seed=1
    )
    sched = mixtures.mixture_schedule(weighted, 0, 20000)
    print(f"weighted 3:1 schedule: {np.mean(sched == 0):.3f} webvid")
    assert abs(np.mean(sched == 0) - 0.75) < 0.02
    np.testing.assert_array_equal(mixtures.mixture_schedule(weighted, 4090, 4100), sched[4090:4100])  # across chunks
    for mix in (alt, weighted):
        it = mixtures.make_mixture_iterator(mix, 0, process_index=0, process_count=1)
        full = [next(it) for _ in range(5)]
        it = mixtures.make_mixture_iterator(mix, 3, process_index=0, process_count=1)
        resumed = [next(it) for _ in range(2)]
        assert [n for n, _ in full[3:]] == [n for n, _ in resumed]
        assert_batches_equal([b for _, b in full[3:]], [b for _, b in resumed])
        for name, batch in full:
            assert batch["video"].shape[1] == (4 if name == "webvid" else 1)


def test_official_semantic_masking_refuses_tags_of_the_previous_rule(cfg, tmp_path):
    import json
    import shutil

    from data_pipelines.build import build_store
    from data_pipelines.input.text_masking import TextMaskingConfig

    assert built_splits.stored_tag_rule(cfg.dataset) == "wordpiece_lower"
    old = tmp_path / "old_build"
    shutil.copytree(cfg.dataset, old)
    key = json.loads((old / build_store.KEY_FILE).read_text())
    del key["tag_rule"]  # a folder prepared before the tag rule was part of the build key
    (old / build_store.KEY_FILE).write_text(json.dumps(key))
    assert built_splits.stored_tag_rule(old) == "cased_caption"
    with pytest.raises(ValueError, match="previous rule.*--overwrite.*semantic_dedup"):
        ip.make_train_dataset(cfg.replace(dataset=str(old)), 0, 0, 1)
    for mode in ("semantic_dedup", "none"):
        ip.check_tag_rule(cfg.replace(dataset=str(old), text=TextMaskingConfig(mode=mode)))


def test_truncated_official_tags_need_their_text_length(cfg, tmp_path):
    """`prepare --tag-rule wordpiece_lower_max30` (spaCy on the caption cut at length 30, as the official masker)."""
    import json
    import shutil

    from data_pipelines.build import build_store
    from data_pipelines.input.text_masking import TextMaskingConfig

    cut = tmp_path / "cut_build"
    shutil.copytree(cfg.dataset, cut)
    key = json.loads((cut / build_store.KEY_FILE).read_text())
    (cut / build_store.KEY_FILE).write_text(json.dumps({**key, "tag_rule": "wordpiece_lower_max30"}))
    with pytest.raises(ValueError, match="for text length 30; set data.text_length=30"):
        ip.check_tag_rule(cfg.replace(dataset=str(cut), text=TextMaskingConfig(max_length=16)))
    ip.check_tag_rule(cfg.replace(dataset=str(cut), text=TextMaskingConfig(max_length=30)))
    ip.check_tag_rule(cfg.replace(dataset=str(cut), text=TextMaskingConfig(max_length=16, mode="none")))


def _reference_runner_epoch(batches_per_epoch):
    """`MyEpochBasedMultiDatasetRunner.train` of the reference, line for line, on lists of (source, batch)."""
    from itertools import zip_longest

    loaders = [[(j, t) for t in range(n)] for j, n in enumerate(batches_per_epoch)]
    steps, short_loader = [], None
    for batch_idx, data_batchs in enumerate(zip_longest(*loaders)):
        for loader_idx, data_batch in enumerate(data_batchs):
            if short_loader is None and data_batch is None:
                short_loader = iter(loaders[loader_idx])
                data_batch = next(short_loader)
            elif short_loader is not None:
                data_batch = next(short_loader)
            steps.append(data_batch)
        if batch_idx >= max(len(loader) - 1 for loader in loaders):
            break
    return steps


def test_official_alternation_is_the_reference_runners_epoch():
    for lengths in [(3, 2), (2, 3), (4, 4), (5, 4), (6, 5, 4), (1, 1)]:
        got = [tuple(d) for d in mixtures.official_epoch_draws(lengths).tolist()]
        assert got == _reference_runner_epoch(lengths), lengths
    # WebVid (source 0, 2 batches) first; once it runs out, BOTH slots take its fresh pass (CC3M's 3rd batch
    # is dropped), and the epoch lasts 2 x the longest source's batches.
    assert mixtures.official_epoch_draws((2, 3)).tolist() == [[0, 0], [1, 0], [0, 1], [1, 1], [0, 0], [0, 1]]
    # The reference raises StopIteration when the fresh pass runs out too; here it starts over.
    assert mixtures.official_epoch_draws((2, 4)).tolist()[4:] == [[0, 0], [0, 1], [0, 0], [0, 1]]


def test_official_alternation_streams_and_resume(cfg):
    images = cfg.replace(num_frames=1, seed=3)
    sources = (mixtures.MixtureSource("webvid", cfg), mixtures.MixtureSource("cc3m", images))
    official = mixtures.MixtureConfig(sources, mode="alternate_official", batches_per_epoch=(2, 3))
    ours = mixtures.MixtureConfig(sources, mode="alternate")
    # Epoch e of a source is batches [e * L, (e + 1) * L) of its own stream; the fresh pass replays them.
    ids, batch = mixtures.mixture_draws(official, 0, 12)
    assert ids.tolist() == [0, 1, 0, 1, 0, 0] * 2
    assert batch.tolist() == [0, 0, 1, 1, 0, 1, 2, 3, 3, 4, 2, 3]
    ids, batch = mixtures.mixture_draws(ours, 0, 6)  # ours: 1:1 for ever, each stream in order
    assert ids.tolist() == [0, 1, 0, 1, 0, 1] and batch.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="batches_per_epoch"):
        mixtures.mixture_schedule(mixtures.MixtureConfig(sources, mode="alternate_official"), 0, 4)
    it = mixtures.make_mixture_iterator(official, 0, process_index=0, process_count=1)
    full = [next(it) for _ in range(8)]
    assert [n for n, _ in full] == ["webvid", "cc3m", "webvid", "cc3m", "webvid", "webvid", "webvid", "cc3m"]
    assert_batches_equal([b for _, b in full[4:6]], [b for _, b in full[0:3:2]])  # the fresh pass
    resumed = mixtures.make_mixture_iterator(official, 5, process_index=0, process_count=1)
    assert_batches_equal([next(resumed)[1] for _ in range(3)], [b for _, b in full[5:8]])
