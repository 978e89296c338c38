"""tf.data graph ops: frame sampling, JPEG decode, crop, resize, flip, normalisation, caption masking, batching.

TSN segment sampling (train: a random frame per segment; eval: segment centres), eval views
(`sample_view_indices`), decode of only the sampled frames (`tf.image.decode_and_crop_jpeg`),
RandomResizedCrop / centre crop / squash, RGB or BGR normalisation, and the map
functions that turn one generator element (serialized record plus its seeds) into model inputs; text
goes through `text_masking.tf_encode_and_mask`. Everything random takes its stateless seed from the
element, so a replayed element gives the same tensors.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from data_pipelines.input.input_config import NO_CAPTION_TEXT, InputConfig
from data_pipelines.input.video_masking import token_grid_size


def sample_frame_indices(num_stored, num_frames: int, train: bool, seed):
    """TSN segment sampling (train: a random frame per segment; eval: segment centres), int32 (T,).

    Clips with fewer stored frames than segments repeat frames (indices are floor'ed and clipped).
    """
    import tensorflow as tf

    n = tf.cast(num_stored, tf.float32)
    segment = n / num_frames
    starts = tf.range(num_frames, dtype=tf.float32) * segment
    if train:
        offsets = tf.random.stateless_uniform([num_frames], seed=seed, dtype=tf.float32) * segment
    else:
        offsets = tf.fill([num_frames], 0.5) * segment
    indices = tf.cast(tf.floor(starts + offsets), tf.int32)
    return tf.clip_by_value(indices, 0, tf.maximum(tf.cast(num_stored, tf.int32) - 1, 0))


def mmaction_train_frame_indices(num_stored, num_frames: int, seed):
    """int32 (T,): mmaction's `SampleFrames(clip_len=1, num_clips=T)` train mode on N = `num_stored` frames.

    avg = N // T (integer). avg > 0: frame i*avg + randint(avg), so the last N - T*avg frames are never
    sampled; avg = 0 (N < T): frame round(i * N / T) (half to even), repeats included.
    """
    import tensorflow as tf

    n = tf.cast(num_stored, tf.int32)
    avg = n // num_frames
    base = tf.range(num_frames, dtype=tf.int32)
    jitter = tf.random.stateless_uniform([num_frames], seed=seed, minval=0, maxval=tf.maximum(avg, 1),
                                         dtype=tf.int32)
    spread = tf.cast(tf.round(tf.cast(base, tf.float64) * tf.cast(n, tf.float64) / num_frames), tf.int32)
    indices = tf.where(avg > 0, base * avg + jitter, spread)
    return tf.clip_by_value(indices, 0, tf.maximum(n - 1, 0))


def train_frame_indices(num_stored, cfg: InputConfig, seed):
    """int32 (T,) training frame indices as `cfg.frame_sampling` says (see FRAME_SAMPLINGS)."""
    if cfg.frame_sampling == "mmaction":
        return mmaction_train_frame_indices(num_stored, cfg.num_frames, seed)
    return sample_frame_indices(num_stored, cfg.num_frames, True, seed)


# TGIF test clips: frames `frame_interval` apart within a clip (official SampleFrames(frame_interval=3)).
TGIF_FRAME_INTERVAL = 3


def official_test_clip_indices(num_stored, clip_len: int, num_clips: int, frame_interval: int):
    """int32 (num_clips, clip_len): mmaction's `SampleFrames(clip_len, frame_interval, num_clips,
    test_mode=True)` (default out_of_bound_opt="loop") on a clip of N = `num_stored` frames.

    The span of one clip is L = clip_len * frame_interval; avg = (N - L + 1) / num_clips (a float). When
    N > L - 1, clip c starts at int(c * avg + avg / 2) (truncated), else every clip starts at 0. Frame j of
    clip c is start_c + j * frame_interval, taken modulo N ("loop": indices past the end wrap to the start).
    The official PyAV decode then reads the decoded frames at these indices (modulo their count again).
    """
    import tensorflow as tf

    n = tf.cast(num_stored, tf.float64)
    span = clip_len * frame_interval
    avg = (n - span + 1) / num_clips
    starts = tf.cast(tf.range(num_clips, dtype=tf.float64) * avg + avg / 2, tf.int32)
    starts = tf.where(n > span - 1, starts, tf.zeros_like(starts))
    indices = starts[:, None] + tf.range(clip_len, dtype=tf.int32)[None, :] * frame_interval
    return tf.math.floormod(indices, tf.maximum(tf.cast(num_stored, tf.int32), 1))


def sample_view_indices(num_stored, num_frames: int, num_views: int, sampling: str):
    """int32 (V, T) eval frame indices of V views of T frames.

    "interleaved": the T*V segment centres of `sample_frame_indices`; view v holds frames v, v+V, ...
    "tgif_clips" (the official TGIF multi-view test): `official_test_clip_indices` with clip_len = V,
    frame_interval 3 and num_clips = T, whose clip-major T*V frames are cut into V consecutive runs of T
    (the official FormatShape 'NCTHW_TSN' reshape): with V=4, T=8, view r is clips 2r and 2r+1, four frames
    3 apart each, so every view covers one temporal quarter of the clip.
    """
    import tensorflow as tf

    if sampling == "tgif_clips":
        clips = official_test_clip_indices(num_stored, num_views, num_frames, TGIF_FRAME_INTERVAL)
        return tf.reshape(clips, [num_views, num_frames])
    flat = sample_frame_indices(num_stored, num_frames * num_views, False, None)
    return tf.transpose(tf.reshape(flat, [num_frames, num_views]))


def mmaction_crop_box(height, width, area_range, aspect_range, seed, attempts: int = 10):
    """[y, x, h, w] int32: mmaction's RandomResizedCrop box. `attempts` candidates draw area uniformly in
    area_range (fraction of the frame) and w/h log-uniformly in aspect_range; w = round(sqrt(area * aspect)),
    h = round(sqrt(area / aspect)) (half to even, as numpy); the first that fits gets a uniform integer
    offset, and when none fits the centre square of side min(height, width) is used."""
    import tensorflow as tf

    s_aspect, s_area, s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    h_img, w_img = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    log_lo, log_hi = float(np.log(aspect_range[0])), float(np.log(aspect_range[1]))
    aspect = tf.exp(tf.random.stateless_uniform([attempts], s_aspect, log_lo, log_hi, tf.float64))
    area = tf.random.stateless_uniform([attempts], s_area, area_range[0], area_range[1], tf.float64)
    area = area * tf.cast(h_img * w_img, tf.float64)
    crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
    fits = (crop_h <= h_img) & (crop_w <= w_img) & (crop_h > 0) & (crop_w > 0)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    side = tf.minimum(h_img, w_img)
    found = tf.reduce_any(fits)
    h = tf.where(found, crop_h[first], side)
    w = tf.where(found, crop_w[first], side)
    y_rand = tf.random.stateless_uniform([], s_y, 0, h_img - h + 1, tf.int32)
    x_rand = tf.random.stateless_uniform([], s_x, 0, w_img - w + 1, tf.int32)
    y = tf.where(found, y_rand, (h_img - side) // 2)
    x = tf.where(found, x_rand, (w_img - side) // 2)
    return tf.stack([y, x, h, w])


def crop_window(height, width, cfg: InputConfig, train: bool, seed):
    """[y, x, h, w] int32: a RandomResizedCrop box (train, drawn as `cfg.crop_sampler` says), or the whole
    frame for `train_crop="squash"`; eval: the centre square, or the whole frame for `eval_crop="squash"`
    (resized to a square without keeping the aspect ratio)."""
    import tensorflow as tf

    squash = cfg.train_crop == "squash" if train else cfg.eval_crop == "squash"
    if squash:
        return tf.stack([0, 0, tf.cast(height, tf.int32), tf.cast(width, tf.int32)])
    if train and cfg.crop_sampler == "mmaction":
        return mmaction_crop_box(height, width, cfg.crop_area, cfg.crop_aspect, seed)
    if train:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            image_size=tf.stack([height, width, 3]),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=cfg.crop_aspect,
            area_range=cfg.crop_area,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        return tf.stack([begin[0], begin[1], size[0], size[1]])
    side = tf.minimum(height, width)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def eval_frame_indices(num_stored, cfg: InputConfig):
    """int32 (V*T,) the stored frames an eval read decodes (no randomness), view-major for V > 1 views."""
    import tensorflow as tf

    if cfg.num_views > 1:
        return tf.reshape(sample_view_indices(num_stored, cfg.num_frames, cfg.num_views, cfg.view_sampling), [-1])
    return sample_frame_indices(num_stored, cfg.num_frames, False, None)


def decoded_video(ex, cfg: InputConfig, train: bool, aug_seeds):
    """Sampled, decoded, cropped, resized, flipped, normalised float32 (T, S, S, 3) frames of a parsed example
    (`aug_seeds`: 3 stateless seeds for frame sampling, crop and flip); (V, T, S, S, 3) for V eval views."""
    import tensorflow as tf

    views = 1 if train else cfg.num_views
    if train:
        indices = train_frame_indices(ex["num_frames"], cfg, aug_seeds[0])
    else:
        indices = eval_frame_indices(ex["num_frames"], cfg)
    jpegs = tf.gather(ex["frames"], indices)
    window = crop_window(ex["height"], ex["width"], cfg, train, aug_seeds[1])
    frames = tf.map_fn(
        lambda b: tf.image.decode_and_crop_jpeg(b, window, channels=3),
        jpegs,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )
    video = tf.image.resize(frames, [cfg.image_size, cfg.image_size], method=cfg.resize_method)
    if train and cfg.flip_prob > 0:
        flip = tf.random.stateless_uniform([], seed=aug_seeds[2]) < cfg.flip_prob
        video = tf.cond(flip, lambda: tf.reverse(video, axis=[2]), lambda: video)
    if cfg.channel_order == "bgr":
        video = video[..., ::-1]
    video = (video - tf.constant(cfg.mean, tf.float32)) / tf.constant(cfg.std, tf.float32)
    if views > 1:  # view-major: frames v*T .. v*T+T-1 are view v
        video = tf.reshape(video, [views, cfg.num_frames, cfg.image_size, cfg.image_size, 3])
        video.set_shape([views, cfg.num_frames, cfg.image_size, cfg.image_size, 3])
        return video
    video.set_shape([cfg.num_frames, cfg.image_size, cfg.image_size, 3])
    return video


def caption_map_fn(cfg: InputConfig, features: Any, train: bool, include_video: bool,
                   caption_index_out: bool) -> Callable:
    """element (serialized example, caption index, seeds, mask grid) -> decoded video, video mask, masked text."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from data_pipelines.input.text_masking import tf_encode_and_mask

    tokens = token_grid_size(cfg.image_size, cfg.mask)
    cell = tokens // cfg.mask.grid
    placeholder_tags = {
        "word_start": [0], "word_end": [len(NO_CAPTION_TEXT)], "candidate": [0], "stop": [1],
    }

    def fn(elem):
        ex = features.deserialize_example(elem["serialized"], decoders={"frames": tfds.decode.SkipDecoding()})
        out = {}
        aug_seeds = tf.random.experimental.stateless_split(tf.cast(elem["aug_seed"], tf.int64), 3)
        if include_video:
            out["video"] = decoded_video(ex, cfg, train, aug_seeds)
            grid = tf.cast(elem["mask_grid"], tf.float32)
            out["video_mask"] = tf.repeat(tf.repeat(grid, cell, axis=0), cell, axis=1)
        # Caption -1 (clip without captions) selects the appended placeholder row.
        num_caps = tf.shape(ex["captions"])[0]
        cap = tf.where(elem["caption_index"] < 0, num_caps, elem["caption_index"])
        caption = tf.concat([ex["captions"], [NO_CAPTION_TEXT]], axis=0)[cap]
        tags = {
            k: tf.concat([ex[k], tf.ragged.constant([v], dtype=tf.int32)], axis=0)[cap]
            for k, v in placeholder_tags.items()
        }
        text = tf_encode_and_mask(
            caption, tags["word_start"], tags["word_end"], tags["candidate"], tags["stop"], elem["text_seed"], cfg.text
        )
        out.update(text)
        out["valid"] = elem["valid"]
        out["clip_index"] = elem["clip_index"]
        if caption_index_out:
            out["caption_index"] = elem["caption_index"]
        return out

    return fn


def qa_map_fn(cfg: InputConfig, features: Any, train: bool, multiple_choice: bool) -> Callable:
    """QA element (serialized example, question or option texts, seeds) -> decoded video and the texts."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    prefix = "option" if multiple_choice else "text"

    def fn(elem):
        ex = features.deserialize_example(elem["serialized"], decoders={"frames": tfds.decode.SkipDecoding()})
        aug_seeds = tf.random.experimental.stateless_split(tf.cast(elem["aug_seed"], tf.int64), 3)
        out = {"video": decoded_video(ex, cfg, train, aug_seeds),
               f"{prefix}_ids": elem["text_ids"], f"{prefix}_mask": elem["text_mask"]}
        out.update({k: elem[k] for k in ("answer_index", "valid", "clip_index", "item_index")})
        return out

    return fn


def finish(ds: Any, cfg: InputConfig, map_fn: Callable, local_batch: int) -> Any:
    """Deterministic parallel map, drop-remainder batches of `local_batch`, prefetch."""
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    if cfg.threads:
        options.threading.private_threadpool_size = cfg.threads
    ds = ds.with_options(options)
    ds = ds.map(map_fn, num_parallel_calls=cfg.num_parallel_calls, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.prefetch(cfg.prefetch)
