"""Search CLI: the videos of an index (`python -m clover_jax.index`) that best match a text, with clip times.

  python -m clover_jax.search --index=INDEX "a man slicing bread" ["another query" ...] [--top 10] [--html out.html]

Loads the index and the model that built it (its workdir and checkpoint, from the manifest; refused when
the weights changed since), embeds each query as evaluation embeds captions and ranks the clips on the
device mesh (`evaluators.mesh_retrieval`). Prints, per query, the top videos (each once, at its best clip)
with the clip's time range and cosine score. `--html` writes a page of thumbnail strips of every hit,
in the evaluation report's style (`evaluators.report`). From Python: `video_index.Index.open(path).search(...)`.
"""
# ruff: noqa: E402  (the XLA flags and the allocator restart below run before the imports)
from __future__ import annotations

if __name__ == "__main__":  # before jax starts: its CPU compiler flags, then a restart under tcmalloc where found
    from clover_jax import launch

    launch.prepare_process(log_native_output=True)  # C++ libraries' lines go to the log file

import pathlib
import time
from typing import Any, Sequence

import numpy as np

from clover_jax.launch import (
    USER_ERRORS,
    OneLineArgumentParser,
    exit_process,
    quiet_third_party_logs,
    report_user_error,
)
from clover_jax.video_index import Hit, Index


def main(argv: list[str] | None = None) -> int:
    """CLI: print (and optionally render) the best videos of an index for each query."""
    parser = OneLineArgumentParser(prog="python -m clover_jax.search", description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="an index folder written by python -m clover_jax.index")
    parser.add_argument("queries", nargs="+", help="the text(s) to search for")
    parser.add_argument("--top", type=int, default=10, help="videos per query")
    parser.add_argument("--html", default="", help="also write an HTML page of thumbnail strips here")
    args = parser.parse_args(argv)
    try:
        return search(args)
    except USER_ERRORS as err:
        return report_user_error(err)


def format_hits(query: str, hits: Sequence[Hit]) -> str:
    """The printed block of one query: rank, score, video path and clip times."""
    lines = [f"query: {query!r}"]
    lines += [f"{n:3d}. {h.score:7.4f}  {h.video}  {h.start:.2f}-{h.end:.2f} s" for n, h in enumerate(hits, 1)]
    return "\n".join(lines)


def search(args: Any) -> int:
    if args.top < 1:
        raise ValueError(f"--top={args.top} must be >= 1")
    index = Index.open(args.index)
    quiet_third_party_logs(index.path, "search")
    start = time.perf_counter()
    model = index.model
    loaded = time.perf_counter()
    queries = model.embed_texts(args.queries)
    embedded = time.perf_counter()
    results = index.search_embeddings(queries, args.top)
    ranked = time.perf_counter()
    results = index.search_embeddings(queries, args.top)  # once compiled: the time a warm service sees
    warm = time.perf_counter() - ranked
    for query, hits in zip(args.queries, results):
        print(format_hits(query, hits))
    step = index.manifest["model"]["step"]
    print(f"search: {len(index)} clips of {len(index.manifest['videos'])} videos (step {step}); "
          f"model loaded in {loaded - start:.1f} s, {len(queries)} queries embedded in "
          f"{1e3 * (embedded - loaded):.0f} ms, ranked in {1e3 * (ranked - embedded):.0f} ms "
          f"({1e3 * warm:.1f} ms warm)", flush=True)
    if args.html:
        path = write_html(index, args.queries, results, pathlib.Path(args.html))
        print(f"search: thumbnails of every hit in {path}", flush=True)
    return 0


def write_html(index: Index, queries: Sequence[str], results: Sequence[Sequence[Hit]],
               path: pathlib.Path) -> pathlib.Path:
    """The evaluation report's page for search results: each query's hits as thumbnail strips, labelled
    with the video, clip times and score; frames are decoded again from the videos folder."""
    from clover_jax.evaluators.report import write_retrieval_report
    from clover_jax.evaluators.split_passes import thumbnails
    from clover_jax.video_clips import ClipReader, relative_inside
    from data_pipelines.build.video_io import DecodeConfig

    clips = index.manifest["settings"]["clips"]
    cfg = index.model.input_cfg
    decode = DecodeConfig(fps=clips["fps"], short_side=clips["short_side"], truncated_policy=clips["truncated_policy"])
    reader = ClipReader(cfg, decode, clips["clip_seconds"], clips["jpeg_quality"])
    strips: dict[tuple[str, float, float], np.ndarray] = {}
    names, thumbs, topk = [], {}, []
    for hits in results:
        row = []
        for hit in hits:
            key = (hit.video, hit.start, hit.end)
            if key not in strips:
                _, decoded = reader.read(relative_inside(index.videos_root, hit.video), [(hit.start, hit.end)])
                # A file changed or removed since indexing gets a grey tile instead of its frames.
                strips[key] = (thumbnails(decoded[0].video[None], cfg)[0] if decoded
                               else np.full((1, 16, 16, 3), 128, np.uint8))
            thumbs[len(names)] = strips[key]
            row.append(len(names))
            names.append(f"{hit.video} {hit.start:.1f}-{hit.end:.1f} s · {hit.score:.3f}")
        topk.append(row)
    return write_retrieval_report(path, list(queries), None, np.asarray(topk, np.int64).reshape(len(queries), -1),
                                  thumbs, metrics={"clips": len(index), "videos": len(index.manifest["videos"])},
                                  num_queries=len(queries), video_names=names,
                                  title=f"Search of {index.path.name}")


if __name__ == "__main__":
    exit_process(main())
