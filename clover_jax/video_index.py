"""A searchable index of a user's videos: the on-disk format (manifest, tensorstore embeddings, build journal),
the model that fills it, and the Python API `Index.open(path).search(texts, k)`.

INDEX/ holds
  manifest.json      the videos (path relative to the videos folder, size, mtime, blake2b digest of the
                     bytes, clip time ranges, first row), skipped files, the model (workdir, checkpoint,
                     step) and the identity: a hash of the model config + preprocessing and a hash of the
                     weights. Written last, through a temp file and a rename: the commit point of every build.
  embeddings-<gen>/  float32 (N, E) L2-normalised clip embeddings, a zarr array in chunks of rows
                     (tensorstore), rows in manifest order (videos by path, clips by time).
  journal/           only while a build runs: identity.json and one .npz per embedded batch of whole
                     files, each written atomically, so a build killed at any point (kill -9) continues
                     where it stopped and ends with the index an uninterrupted build writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
from typing import Any, Sequence

import numpy as np

FORMAT = "clover_jax.video_index"
VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "journal"
ROWS_PER_CHUNK = 16384


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to a temp file beside `path`, then renames it over `path` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def settings_hash(settings: dict[str, Any]) -> str:
    """sha256 (16 hex digits) of the canonical JSON of `settings`."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(params: Any) -> str:
    """sha256 (16 hex digits) over every parameter's name, dtype, shape and bytes."""
    import jax

    from clover_jax.param_paths import flatten

    digest = hashlib.sha256()
    for name, leaf in sorted(flatten(jax.device_get(params)).items()):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{name}:{leaf.dtype}:{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


def check_identity(found: dict[str, str], ours: dict[str, str], what: str) -> None:
    """ValueError (one line) when `what` was built by another model or other preprocessing."""
    for key, label in (("config_hash", "model config + preprocessing"), ("weights_hash", "weights")):
        if found.get(key) != ours[key]:
            raise ValueError(f"{what} was built by another model ({label} {found.get(key)}, this run's "
                             f"{ours[key]}): pass another --out, or delete it to rebuild")


def read_manifest(index: pathlib.Path) -> dict[str, Any] | None:
    """The manifest of INDEX, None when there is none; ValueError when it is not an index's."""
    path = index / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable index manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} has index version {manifest.get('version')}; this code reads {VERSION}")
    return manifest


def write_embeddings(path: pathlib.Path, emb: np.ndarray) -> None:
    """float32 (N, E) as a zarr array at `path` (replaced), chunked by `ROWS_PER_CHUNK` rows."""
    import tensorstore as ts

    if path.exists():
        shutil.rmtree(path)
    rows, dim = emb.shape
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": [rows, dim], "chunks": [max(1, min(rows, ROWS_PER_CHUNK)), dim],
                         "dtype": "<f4", "compressor": None}}
    array = ts.open(spec, create=True, delete_existing=True).result()
    if rows:
        array.write(np.ascontiguousarray(emb, np.float32)).result()


def open_embeddings(path: pathlib.Path) -> Any:
    """The (N, E) tensorstore array at `path`, opened, nothing read."""
    import tensorstore as ts

    if not path.is_dir():
        raise FileNotFoundError(f"the index's embeddings {path} are missing")
    return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}, open=True).result()


def read_rows(array: Any, start: int, stop: int) -> np.ndarray:
    """float32 rows [start, stop) of an opened embeddings array."""
    return np.asarray(array[start:stop].read().result(), np.float32)


def read_embeddings(path: pathlib.Path) -> np.ndarray:
    """The whole (N, E) array (the indexer's rewrite; search reads per device shard instead)."""
    array = open_embeddings(path)
    return read_rows(array, 0, array.shape[0])


def journal_shards(index: pathlib.Path) -> list[tuple[list[dict[str, Any]], np.ndarray]]:
    """(file entries, their clip embeddings) of every finished journal shard, in write order."""
    shards = []
    for path in sorted((index / JOURNAL).glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            shards.append((json.loads(str(data["files"])), np.asarray(data["emb"], np.float32)))
    return shards


def write_journal_shard(index: pathlib.Path, seq: int, files: list[dict[str, Any]], emb: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, files=np.asarray(json.dumps(files)), emb=np.asarray(emb, np.float32))
    write_atomic(index / JOURNAL / f"{seq:06d}.npz", buffer.getvalue())


@dataclasses.dataclass
class Model:
    """A run's checkpoint, ready to embed clips and texts the way its evaluation does."""

    workdir: pathlib.Path
    checkpoint: str  # what `--checkpoint` reloads these weights with (a step number where there is one)
    step: int
    config: Any
    run: Any
    params: Any
    input_cfg: Any  # data_pipelines InputConfig of evaluation
    passes: Any  # evaluators.split_passes.SplitPasses
    weights: str

    @property
    def batch_size(self) -> int:
        return int(self.config.eval.batch_size)

    def embed_videos(self, videos: np.ndarray) -> np.ndarray:
        """(n <= batch_size, T, S, S, 3) normalised clips -> (n, E) L2-normalised embeddings (one compile)."""
        import jax

        from clover_jax.evaluators.retrieval import l2_normalize
        from data_pipelines.input.device_transfer import to_global

        n = len(videos)
        padded = np.concatenate([videos, np.zeros((self.batch_size - n, *videos.shape[1:]), videos.dtype)])
        out = self.passes.video_fn(self.params, to_global({"v": padded}, self.run.batch_sharding)["v"])
        return l2_normalize(np.asarray(jax.device_get(out))[:n]).astype(np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, E) L2-normalised text embeddings, tokenised as evaluation does (cut to eval.text_length)."""
        from clover_jax.evaluators.retrieval import l2_normalize
        from data_pipelines.input.text_masking import load_tokenizer

        tok, length = load_tokenizer(), int(self.config.eval.text_length)
        tokens = []
        for text in texts:
            ids = tok.tokenize(" ".join(str(text).split()))[0][: length - 2]
            if not len(ids):
                raise ValueError(f"query {text!r} has no words to search for")
            tokens.append(ids)
        ids, mask = tok.pack(tokens, length)
        return l2_normalize(self.passes.embed_texts(self.params, ids, mask, self.batch_size)).astype(np.float32)


def load_model(workdir: str | os.PathLike, checkpoint: str = "latest", batch_size: int = 0) -> Model:
    """The model of a training workdir at `checkpoint` (best, latest, a step or a folder), loaded as
    `clover_jax.eval` loads it; `batch_size` > 0 replaces `config.eval.batch_size`."""
    from clover_jax import pixel_stats, run_inputs, run_setup
    from clover_jax.evaluators.split_passes import SplitPasses

    workdir = pathlib.Path(workdir).absolute()
    if not workdir.is_dir():
        raise FileNotFoundError(f"--workdir={workdir} does not exist (pass a training run's workdir)")
    config = run_setup.load_run_config(workdir)
    if batch_size:
        config.eval.batch_size = batch_size
    path = run_setup.checkpoint_path(workdir, checkpoint)
    config.pixel_stats, _ = pixel_stats.resolve(config, checkpoint=path)
    run = run_setup.setup_run(config)
    params, step = run_setup.load_params_for_eval(run, path)
    if checkpoint in ("", "latest") or checkpoint.isdigit():
        checkpoint = str(step)  # `latest` moves on as training continues; the step stays
    elif checkpoint != "best":
        checkpoint = str(path.absolute())
    cfg = run_inputs.eval_input(config.eval, config.data, "", config.pixel_stats)
    return Model(workdir, checkpoint, step, config, run, params, cfg, SplitPasses(run.model_config, run.batch_sharding),
                 weights_hash(params))


def model_settings(model: Model) -> dict[str, Any]:
    """What fixes the model's outputs besides its weights: the model config and the sizes it was built for."""
    return dict(model=model.config.model.to_dict(), data_num_frames=model.config.data.num_frames,
                data_image_size=model.config.data.image_size, text_length=model.config.eval.text_length,
                pixel_stats=model.config.pixel_stats)


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: a clip of a video (path relative to the videos folder), its times and cosine score."""

    video: str
    start: float
    end: float
    score: float
    row: int


def rank(embeddings: Any, queries: np.ndarray, k: int, mesh: Any = None,
         gallery: Any = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """(scores (Q, k), rows (Q, k), the sharded gallery for reuse) of the `k` rows most similar to each query,
    through the mesh retrieval (`evaluators.mesh_retrieval`). `embeddings`: an opened tensorstore array (each
    process reads only the row ranges of its own devices) or a numpy array."""
    from clover_jax.evaluators import mesh_retrieval

    if gallery is None:
        if mesh is None:
            from clover_jax.partitioning import make_mesh

            mesh = make_mesh({"data": -1})
        if isinstance(embeddings, np.ndarray):
            gallery = mesh_retrieval.shard_gallery(embeddings, mesh)
        else:
            gallery = mesh_retrieval.shard_gallery_from_reader(lambda a, b: read_rows(embeddings, a, b),
                                                               tuple(embeddings.shape), mesh)
    scores, rows = mesh_retrieval.top_k(gallery, np.asarray(queries, np.float32), k)
    return np.asarray(scores), np.asarray(rows), gallery


class Index:
    """A built index, opened read-only. `search(texts, k)` loads the manifest's model on first use."""

    def __init__(self, path: pathlib.Path, manifest: dict[str, Any], embeddings: Any):
        self.path, self.manifest, self.embeddings = path, manifest, embeddings
        self.videos_root = pathlib.Path(manifest["videos_root"])
        rows = [(v["path"], s, e) for v in manifest["videos"] for s, e in v["clips"]]
        self.clip_video = [r[0] for r in rows]
        self.clip_times = np.asarray([(r[1], r[2]) for r in rows], np.float64).reshape(-1, 2)
        self._model: Model | None = None
        self._gallery = None
        if embeddings.shape[0] != len(rows):
            raise ValueError(f"{path}: {embeddings.shape[0]} embeddings for the manifest's {len(rows)} clips")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Index":
        path = pathlib.Path(path).absolute()
        manifest = read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"--index={path} holds no {MANIFEST}: build it with python -m clover_jax.index")
        # Opened, not read: the first search reads each device's rows onto it (`rank`).
        return cls(path, manifest, open_embeddings(path / manifest["array"]))

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def model(self) -> Model:
        """The manifest's model; ValueError when its weights are no longer the ones the index was built with."""
        if self._model is None:
            m = self.manifest["model"]
            model = load_model(m["workdir"], m["checkpoint"])
            settings = dict(model=model_settings(model), clips=self.manifest["settings"]["clips"])
            check_identity(self.manifest["identity"], dict(config_hash=settings_hash(settings),
                                                           weights_hash=model.weights),
                           f"{self.path} (its workdir {m['workdir']} changed since)")
            self._model = model
        return self._model

    def search(self, texts: str | Sequence[str], k: int = 10) -> list[list[Hit]]:
        """The `k` best videos for each text (each video once, at its best clip), best first."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.search_embeddings(self.model.embed_texts(texts), k)

    def search_embeddings(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """`search` for (Q, E) query embeddings (any scale; cosine)."""
        from clover_jax.evaluators.retrieval import l2_normalize

        if len(self) == 0:
            raise ValueError(f"{self.path} holds no clips: index some videos first")
        if k < 1:
            raise ValueError(f"--top={k} must be >= 1")
        per_video = max(len(v["clips"]) for v in self.manifest["videos"])
        wanted = min(len(self), k * per_video)  # enough clips for k distinct videos
        mesh = self._model.run.mesh if self._model is not None else None
        scores, rows, self._gallery = rank(self.embeddings, l2_normalize(queries), wanted, mesh, self._gallery)
        out = []
        for query_scores, query_rows in zip(scores, rows):
            hits, seen = [], set()
            for score, row in zip(query_scores.tolist(), query_rows.tolist()):
                video = self.clip_video[row]
                if video in seen:
                    continue
                seen.add(video)
                start, end = self.clip_times[row]
                hits.append(Hit(video, float(start), float(end), float(score), int(row)))
                if len(hits) == k:
                    break
            out.append(hits)
        return out
