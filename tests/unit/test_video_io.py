"""PyAV decoding: containers/codecs of the real clips, fps resampling, short side, loop/pad, skip reasons."""
import dataclasses
import json
import wave

import numpy as np
import pytest

from data_pipelines.build.video_io import DecodeConfig, VideoDecodeError, decode_video, output_size

# One file per container/codec family: H.264 AVI, GIF, portrait H.264 MP4, MPEG-4 AVI with audio,
# MPEG-4 Part 2 MP4 at 5 fps.
SAMPLES = (
    "msvd/clips/j2Dhf-xFUxU_13_20.avi",
    "msvd/gifs/Je3V7U5Ctj4_569_576.gif",
    "demo_clips/languagebind_1.mp4",
    "demo_clips/mmaction2_test.avi",
    "demo_clips/internvid_example1.mp4",
)
FAST = DecodeConfig(fps=2.0, short_side=32)


@pytest.fixture(scope="module")
def manifest(real_data_dir):
    return {row["path"]: row for row in map(json.loads, (real_data_dir / "manifest.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("relpath", SAMPLES)
def test_real_clip_decodes_every_frame(real_data_dir, manifest, relpath):
    info = manifest[relpath]
    clip = decode_video(real_data_dir / relpath, FAST)
    t, h, w, c = clip.frames.shape
    duration = info["frames_decoded"] / info["fps"]
    print(f"{relpath}: {info['width']}x{info['height']} {info['fps']}fps {info['frames_decoded']} frames "
          f"-> {clip.frames.shape}")
    assert clip.frames.dtype == np.uint8 and c == 3
    assert clip.source_frames == info["frames_decoded"]  # decoded start to finish
    assert min(h, w) == 32 and (h > w) == (info["height"] > info["width"])  # portrait stays portrait
    assert abs(t - duration * 2.0) <= 2.0 + 0.1 * duration * 2.0
    assert clip.frames.std() > 5  # real content, not a blank frame


def test_fps_resampling_down_and_up(real_data_dir):
    path = real_data_dir / "demo_clips/internvid_example1.mp4"  # 5 fps, 40 frames, 8 s
    native = decode_video(path, DecodeConfig(fps=None, short_side=16))
    down = decode_video(path, DecodeConfig(fps=2.5, short_side=16))
    up = decode_video(path, DecodeConfig(fps=10.0, short_side=16))
    print("native/down/up frames:", len(native.frames), len(down.frames), len(up.frames))
    assert len(native.frames) == 40 and native.fps == pytest.approx(5.0)
    assert len(down.frames) == 20
    np.testing.assert_array_equal(down.frames, native.frames[::2])
    assert len(up.frames) == 79  # 40 frames spanning 7.8 s at 10 fps: each source frame twice, minus the tail
    np.testing.assert_array_equal(up.frames[::2], native.frames)


def test_output_size_keeps_aspect():
    assert output_size(720, 1280, 256) == (256, 456)
    assert output_size(1024, 576, 256) == (456, 256)
    assert output_size(240, 320, None) == (240, 320)


def _write_image(path, array):
    import tensorflow as tf

    encode = tf.io.encode_png if str(path).endswith(".png") else tf.io.encode_jpeg
    path.write_bytes(encode(array).numpy())


def test_image_is_one_frame_clip_and_short_clip_policies(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    _write_image(tmp_path / "a.png", image)
    _write_image(tmp_path / "b.jpg", image)
    png = decode_video(tmp_path / "a.png", DecodeConfig(fps=4, short_side=None))
    np.testing.assert_array_equal(png.frames[0], image)  # PNG is lossless
    assert png.frames.shape == (1, 40, 60, 3)
    assert decode_video(tmp_path / "b.jpg", DecodeConfig(short_side=20)).frames.shape == (1, 20, 30, 3)
    looped = decode_video(tmp_path / "a.png", DecodeConfig(short_side=None, min_frames=4, short_clip_policy="loop"))
    assert looped.frames.shape[0] == 4 and (looped.frames == image).all()
    with pytest.raises(VideoDecodeError) as err:
        decode_video(tmp_path / "a.png", DecodeConfig(min_frames=2, short_clip_policy="fail"))
    assert err.value.reason == "too_few_frames"


def test_loop_and_pad_fill_short_video(real_data_dir):
    path = real_data_dir / "demo_clips/internvid_example1.mp4"
    base = decode_video(path, DecodeConfig(fps=0.5, short_side=16)).frames  # 4 frames
    loop = decode_video(path, DecodeConfig(fps=0.5, short_side=16, min_frames=10, short_clip_policy="loop")).frames
    pad = decode_video(path, DecodeConfig(fps=0.5, short_side=16, min_frames=10, short_clip_policy="pad")).frames
    n = len(base)
    assert n == 4 and len(loop) == len(pad) == 10
    np.testing.assert_array_equal(loop, base[np.arange(10) % n])
    np.testing.assert_array_equal(pad[n:], np.repeat(base[-1:], 10 - n, axis=0))


def test_skip_reasons(tmp_path, real_data_dir):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    (tmp_path / "truncated.mp4").write_bytes((real_data_dir / "demo_clips/languagebind_0.mp4").read_bytes()[:2048])
    with wave.open(str(tmp_path / "audio.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.zeros(800, np.int16).tobytes())
    cases = {
        "missing.mp4": "missing_file",
        "empty.mp4": "empty_file",
        "garbage.mp4": "corrupt",
        "truncated.mp4": "corrupt",
        "audio.wav": "no_video_stream",
    }
    for name, reason in cases.items():
        with pytest.raises(VideoDecodeError) as err:
            decode_video(tmp_path / name, FAST)
        print(name, "->", err.value.reason)
        assert err.value.reason == reason
    with pytest.raises(ValueError, match="short_clip_policy"):
        DecodeConfig(short_clip_policy="repeat")


def test_webm_roundtrip(tmp_path):
    import av

    frames = np.zeros((6, 32, 48, 3), np.uint8)
    for t in range(6):
        frames[t, :, t * 8 : t * 8 + 8] = 255
    path = tmp_path / "clip.webm"
    with av.open(str(path), mode="w", format="webm") as container:
        stream = container.add_stream("libvpx", rate=6)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = decode_video(path, DecodeConfig(fps=None, short_side=None))
    assert clip.frames.shape == (6, 32, 48, 3) and clip.fps == pytest.approx(6.0)
    assert np.abs(clip.frames.astype(int) - frames).mean() < 20
    assert decode_video(path, DecodeConfig(fps=3.0, short_side=16)).frames.shape == (3, 16, 24, 3)


def test_mp4_cut_after_its_front_index_is_truncated_and_skipped_by_default(tmp_path):
    """An MP4 with its index (moov) at the front, cut at 30% of its bytes, still opens and decodes its
    first frames: the decode ends well before the stated duration, so it is `truncated`."""
    import av

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)  # noise: every frame costs bytes
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.3)])
    keep_all = DecodeConfig(fps=None, short_side=None)
    assert decode_video(whole, keep_all).frames.shape[0] == 40
    with pytest.raises(VideoDecodeError) as err:
        decode_video(cut, keep_all)
    assert err.value.reason == "truncated"
    kept = decode_video(cut, dataclasses.replace(keep_all, truncated_policy="keep"))
    assert 0 < kept.frames.shape[0] < 20
