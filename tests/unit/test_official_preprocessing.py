"""The official preprocessing on real data: pixel statistics (and "auto" by checkpoint source), the squashed
QA test resize, and the TGIF multi-view test clips of mmaction's SampleFrames on a real GIF."""
import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from clover_jax import pixel_stats, prepare, run_inputs
from configs import finetune_qa, finetune_retrieval, pretrain
from data_pipelines.build import builder, built_splits
from data_pipelines.build.video_io import DecodeConfig, decode_video
from data_pipelines.input import tf_ops
from data_pipelines.input.input_config import InputConfig, pixel_fields
from data_pipelines.input.video_masking import BlockMaskConfig

OFFICIAL_MEAN, OFFICIAL_STD = [103.53, 116.28, 123.675], [57.375, 57.12, 58.395]
IMAGENET_MEAN, IMAGENET_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
GIF = "msvd/gifs/0lh_UWF9ZP4_62_69.gif"  # 210 frames (PyAV's stream.frames, the official total_frames), 320x240


def _example(frames: np.ndarray) -> dict:
    """A parsed example as `tf_ops.decoded_video` reads it: JPEG frames and the stored size."""
    jpegs = tf.stack([tf.io.encode_jpeg(f, quality=95) for f in frames])
    return {"frames": jpegs, "num_frames": tf.constant(len(frames), tf.int64),
            "height": tf.constant(frames.shape[1], tf.int32), "width": tf.constant(frames.shape[2], tf.int32)}


def _video(ex: dict, **kw) -> np.ndarray:
    cfg = InputConfig(image_size=32, mask=BlockMaskConfig(grid=8), **kw)
    seeds = tf.zeros([3, 2], tf.int64)
    return tf_ops.decoded_video(ex, cfg, False, seeds).numpy()


def _resized(ex: dict, index: int, window=None) -> np.ndarray:
    """Frame `index` of `ex` decoded and resized to 32x32 directly (the whole frame, or a [y, x, h, w] window)."""
    if window is None:
        image = tf.io.decode_jpeg(ex["frames"][index], channels=3)
    else:  # libjpeg's cropped decode differs from a slice of the full decode by chroma upsampling at the edge
        image = tf.image.decode_and_crop_jpeg(ex["frames"][index], window, channels=3)
    return tf.image.resize(image, [32, 32], method="bilinear").numpy()


@pytest.fixture(scope="module")
def clip_frames(real_data_dir) -> np.ndarray:
    """8 frames of a real non-square clip (MSVD, 320x240 -> short side 48)."""
    video = decode_video(real_data_dir / "msvd/clips/j2Dhf-xFUxU_13_20.avi", DecodeConfig(fps=1.0, short_side=48))
    assert video.frames.shape[1] != video.frames.shape[2]
    return video.frames[:8]


def test_pixel_stats_on_a_real_frame(clip_frames):
    ex = _example(clip_frames[:1])
    frame = _resized(ex, 0)  # RGB, 0..255
    official = _video(ex, num_frames=1, eval_crop="squash", **pixel_fields("official"))[0]
    ours = _video(ex, num_frames=1, eval_crop="squash", **pixel_fields("imagenet_rgb"))[0]
    # Official: the decoders reverse RGB to BGR, then Normalize(mean=[103.53, ...], to_rgb=False).
    np.testing.assert_allclose(official, (frame[..., ::-1] - OFFICIAL_MEAN) / OFFICIAL_STD, atol=1e-4)
    np.testing.assert_allclose(ours, (frame - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-4)
    np.testing.assert_allclose(official, ours[..., ::-1], atol=1e-4)  # the same statistics, channels reversed
    assert np.abs(official - ours).max() > 0.5


def _fake_converter_output(folder, source: str):
    folder.mkdir()
    (folder / "params").mkdir()
    (folder / "conversion.json").write_text(json.dumps({"source": source}))
    return folder


def test_auto_pixel_stats_follow_the_checkpoint_source(tmp_path):
    official = _fake_converter_output(tmp_path / "official", "official_clover")
    bert = _fake_converter_output(tmp_path / "bert", "hf_bert")
    config = pretrain.get_config("tiny")
    assert config.pixel_stats == "auto"
    assert pixel_stats.resolve(config) == ("imagenet_rgb", "auto: no official Clover checkpoint (fresh initialisation)")
    config.init_from = str(official)
    name, why = pixel_stats.resolve(config)
    assert name == "official" and "init_from" in why and "official_clover" in why
    assert run_inputs.pixel_stats_name(config) == "official"
    config.init_from = str(bert)
    assert pixel_stats.resolve(config)[0] == "imagenet_rgb"
    # Evaluation: --checkpoint decides.
    assert pixel_stats.resolve(config, checkpoint=official)[0] == "official"
    # A training run that started from the official checkpoint saved its concrete choice; runs and
    # evaluations reading its checkpoints (workdir, step folder) inherit it.
    run = tmp_path / "run"
    (run / "checkpoints" / "7" / "state").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"pixel_stats": "official", "init_from": str(official)}))
    fresh = pretrain.get_config("tiny")
    assert pixel_stats.resolve(fresh, checkpoint=run / "checkpoints" / "7")[0] == "official"
    fresh.init_from = str(run)
    assert pixel_stats.resolve(fresh)[0] == "official"
    assert pixel_stats.resolve(pretrain.get_config("tiny"), workdir=run)[0] == "official"  # resuming it
    # Saved before the switch existed: the pipeline then always used ImageNet RGB statistics.
    (run / "config.json").write_text(json.dumps({"init_from": str(official)}))
    assert pixel_stats.resolve(fresh)[0] == "imagenet_rgb"
    # Set by name: kept whatever the weights.
    config.pixel_stats = "imagenet_rgb"
    assert pixel_stats.resolve(config, checkpoint=official) == ("imagenet_rgb", "set in the config")
    config.pixel_stats = "bgr"
    with pytest.raises(ValueError, match=r"^config.pixel_stats='bgr'; valid: 'auto', 'imagenet_rgb', 'official'$"):
        pixel_stats.resolve(config)


def test_converted_official_checkpoint_selects_official_stats(golden_dir, tmp_path):
    from clover_jax.convert.__main__ import main

    out = tmp_path / "converted"
    assert main(["--source", "official_clover", "--checkpoint",
                 str(golden_dir / "clover_official_tiny" / "weights.safetensors"),
                 "--model", "official_tiny", "--out", str(out)]) == 0
    config = pretrain.get_config("tiny")
    config.init_from = str(out)
    name, why = pixel_stats.resolve(config)
    print(pixel_stats.describe(name, why))
    assert name == "official"
    cfg = run_inputs.train_input(config.data, "unused", pixel_stats=run_inputs.pixel_stats_name(config))
    assert (cfg.mean, cfg.std, cfg.channel_order) == (tuple(OFFICIAL_MEAN), tuple(OFFICIAL_STD), "bgr")


def test_squash_resizes_the_whole_frame(clip_frames):
    ex = _example(clip_frames[:1])
    height, width = clip_frames.shape[1:3]
    squash = _video(ex, num_frames=1, eval_crop="squash")[0]
    centre = _video(ex, num_frames=1, eval_crop="centre")[0]
    norm = lambda x: (x - IMAGENET_MEAN) / IMAGENET_STD  # noqa: E731
    np.testing.assert_allclose(squash, norm(_resized(ex, 0)), atol=1e-4)
    side = min(height, width)
    np.testing.assert_allclose(centre, norm(_resized(ex, 0, ((height - side) // 2, (width - side) // 2, side, side))),
                               atol=1e-4)
    assert np.abs(squash - centre).max() > 0.5


def test_recipes_choose_the_official_test_resize_and_views():
    squash = {"msrvtt_qa", "msvd_qa", "tgif_action", "tgif_transition", "lsmdc_mc", "lsmdc_fib", "activitynet_qa"}
    for task in finetune_qa.TASKS:
        c = finetune_qa.get_config(f"{task},tiny")
        assert c.eval.crop == ("squash" if task in squash else "centre"), task
        assert c.eval.view_sampling == ("tgif_clips" if task in ("tgif_action", "tgif_transition") else "interleaved")
        assert c.pixel_stats == "auto"
    for variant in ("msrvtt", "didemo", "lsmdc"):  # retrieval tests: Resize(-1, 224) + CenterCrop(224)
        assert finetune_retrieval.get_config(variant).eval.crop == "centre"
    assert pretrain.get_config("base").eval.crop == "centre"


def _views(num_stored: int, sampling: str = "tgif_clips", views: int = 4, frames: int = 8) -> list[list[int]]:
    return tf_ops.sample_view_indices(tf.constant(num_stored), frames, views, sampling).numpy().tolist()


def test_tgif_clip_views_match_the_official_indices(real_data_dir):
    gif = decode_video(real_data_dir / GIF, DecodeConfig(fps=None, short_side=None))  # every GIF frame
    assert len(gif.frames) == 210
    # SampleFrames(clip_len=4, frame_interval=3, num_clips=8, test_mode=True) on 210 frames:
    # avg = (210 - 12 + 1) / 8 = 24.875; clip c starts at int(24.875 c + 12.4375) = 12, 37, 62, 87, 111,
    # 136, 161, 186; frames start + 0, 3, 6, 9; the 'NCTHW_TSN' reshape (4, 8) makes view r = clips 2r, 2r+1.
    assert _views(len(gif.frames)) == [[12, 15, 18, 21, 37, 40, 43, 46], [62, 65, 68, 71, 87, 90, 93, 96],
                                       [111, 114, 117, 120, 136, 139, 142, 145],
                                       [161, 164, 167, 170, 186, 189, 192, 195]]
    # 10 frames (<= 4*3 - 1): every clip starts at 0; 5 frames: 6 and 9 loop to 1 and 4 (out_of_bound 'loop').
    assert _views(10) == [[0, 3, 6, 9] * 2] * 4
    assert _views(5) == [[0, 3, 1, 4] * 2] * 4
    # 70 frames: avg 7.375, starts 3, 11, 18, 25, 33, 40, 47, 55.
    assert _views(70)[1] == [18, 21, 24, 27, 25, 28, 31, 34]
    # Ours ("interleaved"): view v holds the segment centres v, v+4, ... of 32 segments.
    centres = np.floor((np.arange(32) + 0.5) * 210 / 32).astype(int)
    assert _views(210, "interleaved") == centres.reshape(8, 4).T.tolist()


def test_tgif_views_of_a_real_gif_decode_those_frames(real_data_dir):
    gif = decode_video(real_data_dir / GIF, DecodeConfig(fps=None, short_side=32))
    ex = _example(gif.frames)
    video = _video(ex, num_frames=8, num_views=4, view_sampling="tgif_clips", eval_crop="squash")
    assert video.shape == (4, 8, 32, 32, 3)
    for view, indices in enumerate(_views(len(gif.frames))):
        for t, index in enumerate(indices):
            np.testing.assert_allclose(video[view, t], (_resized(ex, index) - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-4)


def test_prepare_fps_0_keeps_the_gif_rate(real_data_dir, tmp_path):
    annotations = tmp_path / "gif.jsonl"
    annotations.write_text(json.dumps({"video": "Je3V7U5Ctj4_569_576", "text": ["a gif"]}) + "\n")
    assert prepare.main(["--format", "jsonl", "--annotations", str(annotations), "--media",
                         str(real_data_dir / "msvd" / "gifs"), "--out", str(tmp_path / "tfds"), "--split", "test",
                         "--no-tags", "--short-side", "32", "--fps", "0", "--workers", "1"]) == 0
    index = built_splits.split_index(builder.dataset_dir(tmp_path / "tfds", "jsonl"), "test")
    assert index.num_frames.tolist() == [70]  # every frame of the 10 fps GIF (4 fps would store 28)


def test_unknown_eval_modes_fail_in_one_line():
    with pytest.raises(ValueError, match=r"^InputConfig.eval_crop='crop'; valid: 'centre', 'squash'$"):
        InputConfig(eval_crop="crop")
    with pytest.raises(ValueError, match=r"^InputConfig.view_sampling='x'; valid: 'interleaved', 'tgif_clips'$"):
        InputConfig(view_sampling="x")
    with pytest.raises(ValueError, match="pixel_stats='auto'"):
        pixel_fields("auto")
    assert isinstance(ml_collections.ConfigDict(pretrain.get_config().eval.to_dict()).crop, str)
