"""Model passes over a whole eval split: embeddings of every clip and caption, scores of every QA item.

Each pass runs on every process with the batch sharded over the mesh; the last batch is padded with
`valid=False` rows, never dropped, and results come back in split order on every process, except for
retrieval's embeddings (`embed_split_on_mesh`), which stay on the devices of the process that embedded them.
The jitted functions are built once per `SplitPasses` and reused by every evaluation of a run.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from clover_jax import tasks
from clover_jax.models.clover import CloverConfig
from data_pipelines.input.device_transfer import to_global
from data_pipelines.input.input_config import InputConfig
from data_pipelines.input.input_pipeline import make_eval_dataset
from data_pipelines.input.qa_inputs import make_qa_eval_dataset

THUMB_FRAMES = 4
THUMB_SIZE = 64
QA_MODEL_INPUTS = ("video", "text_ids", "text_mask", "option_ids", "option_mask")


def thumbnails(video: np.ndarray, cfg: InputConfig) -> np.ndarray:
    """Normalised (B, T, H, W, 3) -> uint8 (B, <=4, <=64, <=64, 3) frames for the report."""
    frames = video[:, np.linspace(0, video.shape[1] - 1, min(THUMB_FRAMES, video.shape[1])).astype(int)]
    frames = frames * np.asarray(cfg.std, np.float32) + np.asarray(cfg.mean, np.float32)
    if cfg.channel_order == "bgr":
        frames = frames[..., ::-1]
    stride = max(1, video.shape[2] // THUMB_SIZE)
    return np.clip(frames[:, :, ::stride, ::stride], 0, 255).astype(np.uint8)


class SplitPasses:
    """The jitted predict functions of one model on one batch sharding (outputs replicated)."""

    def __init__(self, model_config: CloverConfig, batch_sharding: Any, qa_task: str = ""):
        self.batch_sharding = batch_sharding
        self.replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
        self.video_fn = jax.jit(tasks.video_embedding_fn(model_config), out_shardings=self.replicated)
        self.text_fn = jax.jit(tasks.text_embedding_fn(model_config), out_shardings=self.replicated)
        self.qa_fn = (jax.jit(tasks.qa_predict_fn(model_config, qa_task), out_shardings=self.replicated)
                      if qa_task else None)
        self._identity = jax.jit(lambda x: x, out_shardings=self.replicated)

    def gather(self, local: np.ndarray) -> np.ndarray:
        """This process's rows of a batch -> the global batch, on every process."""
        return np.asarray(jax.device_get(self._identity(to_global({"x": local}, self.batch_sharding)["x"])))

    def embed_split(self, params: Any, cfg: InputConfig, *, with_thumbnails: bool = False,
                    captions: bool = True) -> dict[str, Any]:
        """Embeds every clip and every caption of `cfg.split`; numpy arrays on every process: clip_ids,
        video_emb (Nclips, E), text_emb (Ncaptions, E), text_to_video (Ncaptions,), text_ids (token ids),
        and, with `with_thumbnails`, uint8 thumbnail strips of every clip (gathered from all processes)."""
        clips: dict[int, np.ndarray] = {}
        thumbs: dict[int, np.ndarray] = {}
        for batch in make_eval_dataset(cfg, mode="clips", include_video=True):
            video = to_global({"v": batch["video"]}, self.batch_sharding)["v"]
            emb = np.asarray(jax.device_get(self.video_fn(params, video)))
            index, valid = self.gather(batch["clip_index"]), self.gather(batch["valid"])
            clips.update((int(i), e) for i, ok, e in zip(index, valid, emb) if ok)
            if with_thumbnails:
                # The report may show any clip, not only this process's: gather them like the indices.
                strips = self.gather(thumbnails(batch["video"], cfg))
                thumbs.update((int(i), t) for i, ok, t in zip(index, valid, strips) if ok)
        texts: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        for batch in make_eval_dataset(cfg, mode="pairs", include_video=False) if captions else ():
            g = to_global({"i": batch["text_ids"], "m": batch["text_mask"]}, self.batch_sharding)
            emb = np.asarray(jax.device_get(self.text_fn(params, g["i"], g["m"])))
            clip, cap, valid, ids = (self.gather(batch[k]) for k in ("clip_index", "caption_index", "valid",
                                                                      "text_ids"))
            texts += [(int(c), int(k), e, t) for c, k, ok, e, t in zip(clip, cap, valid, emb, ids) if ok]
        order = sorted(clips)
        position = {c: n for n, c in enumerate(order)}
        texts.sort(key=lambda x: (x[0], x[1]))
        return dict(
            clip_ids=np.asarray(order),
            video_emb=np.stack([clips[c] for c in order]),
            text_emb=np.stack([t[2] for t in texts]) if texts else None,
            text_to_video=np.asarray([position[t[0]] for t in texts]),
            text_ids=np.stack([t[3] for t in texts]) if texts else None,
            thumbnails={position[c]: v for c, v in thumbs.items()},
        )

    def _own_rows(self, batch: dict[str, np.ndarray], out: Any, keys: tuple[str, ...]
                  ) -> list[tuple[tuple[int, ...], np.ndarray]]:
        """(key, output row) of this process's valid rows of a batch whose global outputs are replicated."""
        mine = {tuple(int(batch[k][n]) for k in keys) for n in np.flatnonzero(batch["valid"])}
        keys_all = np.stack([self.gather(batch[k]) for k in keys], axis=1)
        valid = self.gather(batch["valid"])
        rows = np.flatnonzero(valid)
        out = np.asarray(out.addressable_data(0))  # replicated: the global batch's rows (one batch, not the split)
        return [(key, out[n]) for n in rows if (key := tuple(int(x) for x in keys_all[n])) in mine]

    def embed_split_on_mesh(self, params: Any, cfg: InputConfig, *, with_thumbnails: bool = False
                            ) -> dict[str, Any]:
        """`embed_split` for retrieval with the embeddings left sharded: `videos` and `texts` are
        `mesh_gallery.ShardedGallery`s built from each process's own rows (the eval pass's contiguous chunk of
        the split), so no process holds either whole. On every process: clip_ids, text_to_video (metadata,
        O(N) ints), and with `with_thumbnails` the report's text_ids and thumbnail strips (gathered)."""
        from clover_jax.evaluators.mesh_gallery import gallery_from_local

        clips: dict[int, np.ndarray] = {}
        all_clips: list[int] = []
        thumbs: dict[int, np.ndarray] = {}
        for batch in make_eval_dataset(cfg, mode="clips", include_video=True):
            video = to_global({"v": batch["video"]}, self.batch_sharding)["v"]
            clips.update((key[0], e) for key, e in self._own_rows(batch, self.video_fn(params, video),
                                                                  ("clip_index",)))
            index, valid = self.gather(batch["clip_index"]), self.gather(batch["valid"])
            all_clips += [int(i) for i in index[valid.astype(bool)]]
            if with_thumbnails:
                strips = self.gather(thumbnails(batch["video"], cfg))
                thumbs.update((int(i), t) for i, ok, t in zip(index, valid, strips) if ok)
        texts: dict[tuple[int, int], np.ndarray] = {}
        all_texts: list[tuple[int, int]] = []
        text_ids: dict[tuple[int, int], np.ndarray] = {}
        for batch in make_eval_dataset(cfg, mode="pairs", include_video=False):
            g = to_global({"i": batch["text_ids"], "m": batch["text_mask"]}, self.batch_sharding)
            texts.update(self._own_rows(batch, self.text_fn(params, g["i"], g["m"]), ("clip_index", "caption_index")))
            clip, cap, valid = (self.gather(batch[k]) for k in ("clip_index", "caption_index", "valid"))
            all_texts += [(int(c), int(k)) for c, k, ok in zip(clip, cap, valid) if ok]
            if with_thumbnails:
                ids = self.gather(batch["text_ids"])
                text_ids.update(((int(c), int(k)), t) for c, k, ok, t in zip(clip, cap, valid, ids) if ok)
        order, text_order = sorted(all_clips), sorted(all_texts)
        position = {c: n for n, c in enumerate(order)}
        text_position = {t: n for n, t in enumerate(text_order)}
        mesh = self.batch_sharding.mesh

        def gallery(rows: dict[Any, np.ndarray], place: dict[Any, int]) -> Any:
            keys = sorted(rows)
            emb = np.stack([rows[k] for k in keys]) if keys else np.zeros((0, self._dim(params, cfg)), np.float32)
            return gallery_from_local(emb, np.asarray([place[k] for k in keys], np.int64), mesh)

        return dict(
            clip_ids=np.asarray(order),
            videos=gallery(clips, position),
            texts=gallery(texts, text_position),
            text_to_video=np.asarray([position[t[0]] for t in text_order]),
            text_ids=np.stack([text_ids[t] for t in text_order]) if text_ids else None,
            thumbnails={position[c]: v for c, v in thumbs.items()},
        )

    def _dim(self, params: Any, cfg: InputConfig) -> int:
        """E of the text embeddings (traced, not run): a process with no rows still shapes its (0, E) part."""
        tokens = jax.ShapeDtypeStruct((self.batch_sharding.mesh.size, cfg.text.max_length), np.int32)
        return int(jax.eval_shape(self.text_fn, params, tokens, tokens).shape[-1])

    def embed_texts(self, params: Any, ids: np.ndarray, mask: np.ndarray, batch_size: int) -> np.ndarray:
        """Text embeddings of host arrays in fixed-size chunks (one compile; the tail is padded)."""
        chunks = []
        for start in range(0, len(ids), batch_size):
            i, m = ids[start:start + batch_size], mask[start:start + batch_size]
            pad = batch_size - len(i)
            i, m = np.pad(i, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)))
            out = self.text_fn(params, jax.device_put(i, self.replicated), jax.device_put(m, self.replicated))
            chunks.append(np.asarray(jax.device_get(out))[: batch_size - pad])
        return np.concatenate(chunks)

    def qa_scores(self, params: Any, cfg: InputConfig, items: Any) -> np.ndarray:
        """Answer logits (N, num_answers) or option scores (N, K) of every QA item, in item order. With
        `cfg.num_views` > 1 each clip is seen as that many views whose Swin features are averaged."""
        scores: dict[int, np.ndarray] = {}
        for batch in make_qa_eval_dataset(cfg, items):
            inputs = {k: v for k, v in batch.items() if k in QA_MODEL_INPUTS}
            out = np.asarray(jax.device_get(self.qa_fn(params, to_global(inputs, self.batch_sharding))))
            index, valid = self.gather(batch["item_index"]), self.gather(batch["valid"])
            scores.update((int(i), row) for i, ok, row in zip(index, valid, out) if ok)
        if sorted(scores) != list(range(len(items))):
            raise RuntimeError(f"QA eval scored {len(scores)} of {len(items)} items: the eval pass lost some")
        return np.stack([scores[i] for i in range(len(items))])
