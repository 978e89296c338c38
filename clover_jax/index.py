"""Index CLI: embeds every video under a folder with a run's checkpoint into a searchable index (`video_index`).

  python -m clover_jax.index --workdir=W --videos=DIR --out=INDEX [--checkpoint=best|latest|STEP]
      [--clip-seconds=S] [--fps=4] [--short-side=256] [--batch-size=N] [--workers=2]

Every video under DIR (recursively: mp4, avi, webm, mkv, mov, gif, m4v) is decoded as `prepare` decodes
(`--fps`, `--short-side`), cut into clips of about `--clip-seconds` (default 0: the whole video is one
clip, as evaluation sees a clip) and preprocessed as evaluation does (`video_clips`). A rerun embeds only
new or changed files (by a blake2b digest of their bytes; an index written before digests compares size and
mtime) and drops deleted ones; a build killed at any point continues from its journal. An index built by
another model or other preprocessing is refused in one line. Skipped files (unreadable, undecodable, links
leaving DIR) are counted by reason.
"""
# ruff: noqa: E402  (the XLA flags and the allocator restart below run before the imports)
from __future__ import annotations

if __name__ == "__main__":  # before jax starts: its CPU compiler flags, then a restart under tcmalloc where found
    from clover_jax import launch

    launch.prepare_process(log_native_output=True)  # C++ libraries' lines go to the log file

import collections
import concurrent.futures
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Iterator

import numpy as np

from clover_jax import video_index
from clover_jax.launch import (
    USER_ERRORS,
    OneLineArgumentParser,
    exit_process,
    quiet_third_party_logs,
    report_user_error,
)
from clover_jax.video_clips import Clip, ClipReader, Scan, VideoFile, clip_settings, scan_videos, with_digests

JPEG_QUALITY = 90  # builder.BuildConfig's default: clips are stored as a prepared dataset stores them


def main(argv: list[str] | None = None) -> int:
    """CLI: build or update the index of a folder of videos."""
    parser = OneLineArgumentParser(prog="python -m clover_jax.index", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the training workdir (holds config.json, checkpoints/)")
    parser.add_argument("--videos", required=True, help="the folder of videos to index (searched recursively)")
    parser.add_argument("--out", required=True, help="the index folder (created, or updated when it exists)")
    parser.add_argument("--checkpoint", default="latest", help="best, latest, a step number or a checkpoint folder")
    parser.add_argument("--clip-seconds", type=float, default=0.0, help="clip length; 0: one clip per video")
    parser.add_argument("--fps", type=float, default=4.0, help="decode rate, as prepare's --fps (0: the source's)")
    parser.add_argument("--short-side", type=int, default=256, help="decode size, as prepare's --short-side")
    parser.add_argument("--batch-size", type=int, default=0, help="clips per model call (0: config.eval.batch_size)")
    parser.add_argument("--workers", type=int, default=2, help="threads decoding videos")
    args = parser.parse_args(argv)
    try:
        return build(args)
    except USER_ERRORS as err:
        return report_user_error(err)


def _check_args(args: Any) -> None:
    if args.clip_seconds < 0 or args.fps < 0 or args.short_side < 2 or args.batch_size < 0 or args.workers < 1:
        raise ValueError("--clip-seconds and --fps must be >= 0, --short-side >= 2, --batch-size >= 0 and "
                         "--workers >= 1")


def build(args: Any) -> int:
    from data_pipelines.build.video_io import DecodeConfig

    _check_args(args)
    videos = pathlib.Path(os.path.realpath(args.videos))
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos={args.videos} is not a folder")
    index = pathlib.Path(args.out).absolute()
    if index.exists() and not index.is_dir():
        raise NotADirectoryError(f"--out={args.out} is a file, not an index folder")
    manifest = video_index.read_manifest(index)  # a broken manifest stops before the model loads
    if manifest is not None and manifest["videos_root"] != str(videos):
        raise ValueError(f"--out={index} indexes {manifest['videos_root']}, not {videos}: pass that folder as "
                         "--videos, or another --out")
    index.mkdir(parents=True, exist_ok=True)
    quiet_third_party_logs(index, "index")
    model = video_index.load_model(args.workdir, args.checkpoint, args.batch_size)
    decode = DecodeConfig(fps=args.fps or None, short_side=args.short_side)
    clips = clip_settings(model.input_cfg, decode, args.clip_seconds, JPEG_QUALITY)
    settings = dict(model=video_index.model_settings(model), clips=clips)
    identity = dict(config_hash=video_index.settings_hash(settings), weights_hash=model.weights)
    if manifest is not None:
        video_index.check_identity(manifest["identity"], identity, f"--out={index}")
    journal = index / video_index.JOURNAL
    if (journal / "identity.json").exists():
        video_index.check_identity(json.loads((journal / "identity.json").read_text()), identity,
                          f"--out={index} (an unfinished build in {journal})")
    else:
        journal.mkdir(exist_ok=True)
        video_index.write_atomic(journal / "identity.json", json.dumps(identity).encode())
    scan = scan_videos(videos)
    scan.files = with_digests(videos, scan.files, args.workers)
    reader = ClipReader(model.input_cfg, decode, args.clip_seconds, JPEG_QUALITY)
    plan = _plan(scan, manifest, video_index.journal_shards(index))
    start_seq = len(list(journal.glob("*.npz")))
    print(f"clover_jax: {len(scan.files)} video files under {videos}: {len(plan['kept'])} unchanged, "
          f"{len(plan['resumed'])} resumed from an interrupted build, {len(plan['todo'])} to embed, "
          f"{len(plan['dropped'])} gone", flush=True)
    embedded = _embed(model, reader, videos, index, plan["todo"], start_seq, args.workers)
    new = {**plan["resumed"], **embedded}
    if (manifest is not None and not new and not plan["dropped"] and not plan["refused_changed"]
            and not plan["restamped"]):
        shutil.rmtree(journal, ignore_errors=True)
        print(f"index: up to date, {manifest['num_clips']} clips of {len(manifest['videos'])} videos -> {index}")
        _print_skips(manifest)
        return 0
    written = _finalise(index, manifest, model, settings, identity, scan, plan["kept"], new, args)
    clips_now = sum(len(e["clips"]) for e, _ in embedded.values())
    print(f"index: {written['num_clips']} clips of {len(written['videos'])} videos, step {model.step} -> {index}")
    print(f"this run: {clips_now} clips embedded ({len(embedded)} files new or changed), "
          f"{sum(len(e['clips']) for e, _ in plan['resumed'].values())} clips resumed from an interrupted build, "
          f"{len(plan['kept'])} files unchanged, {len(plan['dropped'])} dropped", flush=True)
    _print_skips(written)
    return 0


def _print_skips(manifest: dict[str, Any]) -> None:
    reasons = collections.Counter(s["reason"] for s in manifest["skipped"])
    reasons.update(manifest["refused"].values())
    if reasons:
        print(f"skipped {sum(reasons.values())} files by reason: {dict(sorted(reasons.items()))}", flush=True)


def _plan(scan: Scan, manifest: dict[str, Any] | None, shards: list) -> dict[str, Any]:
    """Which files keep their manifest entry, which an interrupted build already embedded, which to embed
    and which are gone."""
    old = {}
    if manifest is not None:
        old = {v["path"]: v for v in manifest["videos"]}
        old.update({s["path"]: s for s in manifest["skipped"]})
    journaled = {}
    for files, emb in shards:
        row = 0
        for entry in files:
            journaled[entry["path"]] = (entry, emb[row:row + len(entry["clips"])])
            row += len(entry["clips"])
    kept, resumed, todo, restamped = [], {}, [], []
    for f in scan.files:
        if f.path in old and _same_file(old[f.path], f):
            kept.append(f.path)
            if _stamp(old[f.path]) != _stamp(f):  # touched, or listed before digests: the manifest is updated
                restamped.append(f.path)
        elif f.path in journaled and _same_file(journaled[f.path][0], f):
            resumed[f.path] = journaled[f.path]
        else:
            todo.append(f)
    present = {f.path for f in scan.files}
    dropped = sorted(p for p in old if p not in present)
    refused_changed = manifest is None or manifest["refused"] != scan.refused
    return dict(kept=kept, resumed=resumed, todo=todo, dropped=dropped, refused_changed=refused_changed,
                restamped=restamped)


def _stamp(entry: dict[str, Any] | VideoFile) -> tuple[int, int, str]:
    if isinstance(entry, VideoFile):
        return (entry.size, entry.mtime_ns, entry.digest)
    return (entry["size"], entry["mtime_ns"], entry.get("digest", ""))


def _same_file(entry: dict[str, Any], f: VideoFile) -> bool:
    """Whether a manifest or journal entry still describes `f`: the same bytes (digest), or, for an entry
    written before digests, the same size and mtime."""
    if entry.get("digest") and f.digest:
        return entry["digest"] == f.digest
    return (entry["size"], entry["mtime_ns"]) == (f.size, f.mtime_ns)


def _decoded(reader: ClipReader, videos: pathlib.Path, todo: list[VideoFile], workers: int) -> Iterator:
    """(file, skip reason, clips) in `todo` order, decoded `workers` files at a time, a few files ahead."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        ahead: collections.deque = collections.deque()
        files = iter(todo)
        for f in files:
            ahead.append((f, pool.submit(reader.read, videos / f.path)))
            if len(ahead) >= 2 * workers:
                f0, future = ahead.popleft()
                yield (f0, *future.result())
        while ahead:
            f0, future = ahead.popleft()
            yield (f0, *future.result())


class _Progress:
    """One stderr line per journal shard: files, clips, clips/s and ETA (redrawn in place on a terminal)."""

    def __init__(self, total_files: int):
        self.total, self.start, self.tty = total_files, time.monotonic(), sys.stderr.isatty()

    def update(self, files: int, clips: int) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-6)
        eta = (self.total - files) * elapsed / max(files, 1)
        line = (f"index: {files}/{self.total} files, {clips} clips, {clips / elapsed:.1f} clips/s, "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        print(f"\r{line}" if self.tty else line, end="" if self.tty and files < self.total else "\n",
              file=sys.stderr, flush=True)


def _embed(model: video_index.Model, reader: ClipReader, videos: pathlib.Path, index: pathlib.Path,
           todo: list[VideoFile], seq: int, workers: int) -> dict[str, tuple[dict, np.ndarray]]:
    """Embeds the clips of `todo` in batches; after each batch, the files whose clips are all embedded go to
    a journal shard. Returns path -> (entry, embeddings)."""
    done: dict[str, tuple[dict, np.ndarray]] = {}
    waiting: list[dict] = []  # entries of decoded files whose embeddings are not all in `rows` yet
    clips: list[Clip] = []  # decoded, waiting for a batch (JPEGs: preprocessed only when their batch is embedded)
    rows: list[np.ndarray] = []
    progress = _Progress(len(todo))
    clip_count = 0

    def flush(final: bool) -> None:
        nonlocal seq, clip_count
        batch = model.batch_size
        while len(clips) >= batch or (final and clips):
            rows.extend(model.embed_videos(np.stack([c.video for c in clips[:batch]])))
            del clips[:batch]
        count = used = 0
        for entry in waiting:
            if used + len(entry["clips"]) > len(rows):
                break
            used, count = used + len(entry["clips"]), count + 1
        if count == 0:
            return
        emb = np.stack(rows[:used]) if used else np.zeros((0, 0), np.float32)
        video_index.write_journal_shard(index, seq, waiting[:count], emb)
        row = 0
        for entry in waiting[:count]:
            done[entry["path"]] = (entry, emb[row:row + len(entry["clips"])])
            row += len(entry["clips"])
        seq, clip_count = seq + 1, clip_count + used
        del waiting[:count], rows[:used]
        progress.update(len(done), clip_count)

    for f, reason, decoded in _decoded(reader, videos, todo, workers):
        waiting.append(dict(path=f.path, size=f.size, mtime_ns=f.mtime_ns, digest=f.digest,
                            clips=[[c.start, c.end] for c in decoded], skip=reason))
        clips.extend(decoded)
        flush(final=False)
    flush(final=True)
    return done


def _finalise(index: pathlib.Path, manifest: dict[str, Any] | None, model: video_index.Model, settings: dict[str, Any],
              identity: dict[str, str], scan: Scan, kept: list[str], new: dict[str, tuple[dict, np.ndarray]],
              args: Any) -> dict[str, Any]:
    """Writes the next generation of the embeddings and then the manifest (the commit point), and removes the
    journal and the previous generation. Rows follow the scan's (sorted) file order, so a build that was
    interrupted and resumed writes what an uninterrupted one writes."""
    old_entries, old_emb, kept_paths = {}, None, set(kept)
    if manifest is not None:
        old_entries = {v["path"]: dict(v, skip=None) for v in manifest["videos"]}
        old_entries.update({s["path"]: dict(s, clips=[], skip=s["reason"]) for s in manifest["skipped"]})
        if any(p in old_entries and old_entries[p]["clips"] for p in kept):
            old_emb = video_index.read_embeddings(index / manifest["array"])
    videos_out, skipped_out, parts, rows = [], [], [], 0
    for f in scan.files:
        if f.path in new:
            entry, emb = new[f.path]
        elif f.path in kept_paths:
            entry = old_entries[f.path]
            emb = old_emb[entry["first_row"]:entry["first_row"] + len(entry["clips"])] if entry["clips"] else None
        else:
            continue
        if entry["skip"]:
            skipped_out.append(dict(path=f.path, size=f.size, mtime_ns=f.mtime_ns, digest=f.digest,
                                    reason=entry["skip"]))
            continue
        videos_out.append(dict(path=f.path, size=f.size, mtime_ns=f.mtime_ns, digest=f.digest, first_row=rows,
                               clips=entry["clips"]))
        parts.append(np.asarray(emb, np.float32))
        rows += len(entry["clips"])
    dim = _embedding_dim(model)
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    generation = (manifest["generation"] + 1) if manifest is not None else 1
    array = f"embeddings-{generation:06d}"
    video_index.write_embeddings(index / array, embeddings)
    written = dict(format=video_index.FORMAT, version=video_index.VERSION, generation=generation, array=array,
                   videos_root=str(pathlib.Path(os.path.realpath(args.videos))),
                   model=dict(workdir=str(model.workdir), checkpoint=model.checkpoint, step=model.step),
                   identity=identity, settings=settings, embedding_dim=dim, num_clips=int(embeddings.shape[0]),
                   videos=videos_out, skipped=skipped_out, refused=dict(sorted(scan.refused.items())))
    video_index.write_atomic(index / video_index.MANIFEST, json.dumps(written, indent=1, sort_keys=True).encode())
    shutil.rmtree(index / video_index.JOURNAL, ignore_errors=True)
    for stale in index.glob("embeddings-*"):
        if stale.name != array:
            shutil.rmtree(stale, ignore_errors=True)
    return written


def _embedding_dim(model: video_index.Model) -> int:
    """E of the model's video embeddings (traced, not run)."""
    import jax

    cfg = model.input_cfg
    clip = jax.ShapeDtypeStruct((model.batch_size, cfg.num_frames, cfg.image_size, cfg.image_size, 3), np.float32)
    return int(jax.eval_shape(model.passes.video_fn, model.params, clip).shape[-1])


if __name__ == "__main__":
    exit_process(main())
