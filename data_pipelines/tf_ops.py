"""tf.data graph ops: frame sampling, JPEG decode, crop, resize, flip, normalisation, caption masking, batching.

TSN segment sampling (train: a random frame per segment; eval: segment centres), decode of only the
sampled frames (`tf.image.decode_and_crop_jpeg`), RandomResizedCrop / centre crop, and the map
functions that turn one generator element (serialized record plus its seeds) into model inputs; text
goes through `text_masking.tf_encode_and_mask`. Everything random takes its stateless seed from the
element, so a replayed element gives the same tensors.
"""
from __future__ import annotations

from typing import Any, Callable

from data_pipelines.input_config import NO_CAPTION_TEXT, InputConfig
from data_pipelines.video_masking import token_grid_size


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


def crop_window(height, width, cfg: InputConfig, train: bool, seed):
    """[y, x, h, w] int32: a RandomResizedCrop box (train) or the centre square (eval)."""
    import tensorflow as tf

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


def decoded_video(ex, cfg: InputConfig, train: bool, aug_seeds):
    """Sampled, decoded, cropped, resized, flipped, normalised float32 (T, S, S, 3) frames of a parsed example
    (`aug_seeds`: 3 stateless seeds for frame sampling, crop and flip); (V, T, S, S, 3) for V eval views."""
    import tensorflow as tf

    views = 1 if train else cfg.num_views
    indices = sample_frame_indices(ex["num_frames"], cfg.num_frames * views, train, aug_seeds[0])
    jpegs = tf.gather(ex["frames"], indices)
    window = crop_window(ex["height"], ex["width"], cfg, train, aug_seeds[1])
    frames = tf.map_fn(
        lambda b: tf.image.decode_and_crop_jpeg(b, window, channels=3),
        jpegs,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )
    video = tf.image.resize(frames, [cfg.image_size, cfg.image_size], method="bilinear")
    if train and cfg.flip_prob > 0:
        flip = tf.random.stateless_uniform([], seed=aug_seeds[2]) < cfg.flip_prob
        video = tf.cond(flip, lambda: tf.reverse(video, axis=[2]), lambda: video)
    video = (video - tf.constant(cfg.mean, tf.float32)) / tf.constant(cfg.std, tf.float32)
    if views > 1:  # frame t*V + v is frame t of view v
        video = tf.transpose(tf.reshape(video, [cfg.num_frames, views, cfg.image_size, cfg.image_size, 3]),
                             [1, 0, 2, 3, 4])
        video.set_shape([views, cfg.num_frames, cfg.image_size, cfg.image_size, 3])
        return video
    video.set_shape([cfg.num_frames, cfg.image_size, cfg.image_size, 3])
    return video


def caption_map_fn(cfg: InputConfig, features: Any, train: bool, include_video: bool,
                   caption_index_out: bool) -> Callable:
    """element (serialized example, caption index, seeds, mask grid) -> decoded video, video mask, masked text."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from data_pipelines.text_masking import tf_encode_and_mask

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
