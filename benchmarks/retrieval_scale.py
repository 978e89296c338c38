"""Benchmark: retrieval on the mesh against the host numpy path, galleries of 10k / 100k / 1M: time and memory.

  .venv/bin/python -m benchmarks.retrieval_scale [--galleries 10000,100000,1000000] [--queries 10000] [--dim 256]
      [--k 10] [--devices 1,8] [--host-max 100000] [--out benchmarks/results/DATE-retrieval-scale.md]

Synthetic float32 embeddings: standard-normal gallery rows; each query is a noisy copy of a random row (its
positive). Each device count runs in a child process of its own (`XLA_FLAGS=--xla_force_host_platform_device_count=N`,
one mesh over the N virtual CPU devices) which, per gallery size, places the gallery
(`mesh_retrieval.shard_gallery`), warms up (compiles) and times
  * top-k: `mesh_retrieval.top_k` of every query, k results each (what a search runs);
  * ranks: `mesh_retrieval.ranks`, each query's rank of its positive (the evaluator's text->video pass);
and reads XLA's per-device bytes of one query block's program (`memory_analysis()`: arguments = the gallery shard,
its ids and the block; plus outputs and temporaries; the larger of the two programs), to set against the
queries x gallery float32 matrix one device would hold to score every query at once. The host path is today's
numpy `retrieval.top_k` and `retrieval.text_to_video_ranks` (1,024 queries at a time) with its peak traced
allocation (tracemalloc), in a child too; above `--host-max` it is skipped (one 1,024-row block of a 1M gallery
is 4 GiB of scores, plus argpartition's 8 GiB of indices). Where it ran, each mesh run counts the queries whose
ranks or top-k lists differ from the host's (float data: a difference can only come from rounding in a near-tie).
Virtual devices share the host's cores: the 8-device times measure the sharded program, not 8 chips.
"""
from __future__ import annotations

if __name__ == "__main__":  # before jax is imported
    from clover_jax import launch

    launch.prepare_process()  # the XLA flags and the malloc `python -m clover_jax.train` runs with

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1 << 30
NOISE = 2.0  # query = positive row + NOISE * standard normal


def host_data(n: int, queries: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gallery (n, dim), queries (queries, dim), positives (queries,)), the same in every process."""
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n, dim), dtype=np.float32)
    positives = rng.integers(0, n, queries)
    return gallery, gallery[positives] + NOISE * rng.standard_normal((queries, dim), dtype=np.float32), positives


def run_host(args: argparse.Namespace, n: int) -> dict[str, Any]:
    from clover_jax.evaluators import retrieval

    gallery, queries, positives = host_data(n, args.queries, args.dim)
    tracemalloc.start()
    start = time.perf_counter()
    indices = retrieval.top_k(gallery, queries, args.k)
    top_k_s = time.perf_counter() - start
    start = time.perf_counter()
    ranks = retrieval.text_to_video_ranks(gallery, queries, positives)
    ranks_s = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.savez(pathlib.Path(args.scratch) / f"host_{n}.npz", indices=indices, ranks=ranks)
    return dict(path="host numpy", devices=1, gallery=n, top_k_s=top_k_s, ranks_s=ranks_s, peak_bytes=peak)


def run_mesh(args: argparse.Namespace, n: int) -> dict[str, Any]:
    import jax

    from clover_jax import partitioning
    from clover_jax.evaluators import mesh_retrieval

    mesh = partitioning.make_mesh({"data": -1})
    start = time.perf_counter()
    if n <= args.host_max:
        gallery, queries, positives = host_data(n, args.queries, args.dim)
        sharded = mesh_retrieval.shard_gallery(gallery, mesh)
        del gallery
    else:  # generated on the devices: the host never holds the gallery
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names), None))
        raw = jax.jit(lambda key: jax.random.normal(key, (n, args.dim)), out_shardings=rows)(jax.random.key(0))
        rng = np.random.default_rng(0)
        positives = rng.integers(0, n, args.queries)
        queries = np.asarray(raw[positives]) + NOISE * rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        sharded = mesh_retrieval.shard_gallery(raw, mesh)
        del raw
    jax.block_until_ready(sharded.embeddings)
    shard_s = time.perf_counter() - start
    block = mesh_retrieval.query_block_size(args.queries, sharded.rows_per_device)
    start = time.perf_counter()
    mesh_retrieval.top_k(sharded, queries[:block], args.k)
    mesh_retrieval.ranks(sharded, queries[:block], positives[:block])
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    _, indices = mesh_retrieval.top_k(sharded, queries, args.k)
    top_k_s = time.perf_counter() - start
    start = time.perf_counter()
    ranks = mesh_retrieval.ranks(sharded, queries, positives)
    ranks_s = time.perf_counter() - start
    memory = [mesh_retrieval.block_memory(sharded, args.queries, k) for k in (args.k, None)]
    out = dict(path="mesh", devices=mesh.size, gallery=n, block=block, shard_s=shard_s, compile_s=compile_s,
               top_k_s=top_k_s, ranks_s=ranks_s,
               peak_bytes=max(m["argument"] + m["output"] + m["temp"] for m in memory),
               shard_bytes=sharded.rows_per_device * args.dim * 4, temp_bytes=max(m["temp"] for m in memory),
               rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    host = pathlib.Path(args.scratch) / f"host_{n}.npz"
    if host.exists():
        ref = np.load(host)
        out["differ_top_k"] = int(np.sum(np.any(ref["indices"] != indices, axis=1)))
        out["differ_ranks"] = int(np.sum(ref["ranks"] != ranks))
    return out


def child(args: argparse.Namespace) -> None:
    for n in args.galleries:
        if args.child == "host" and n > args.host_max:
            continue
        result = run_host(args, n) if args.child == "host" else run_mesh(args, n)
        print(json.dumps(result), flush=True)


def spawn(args: argparse.Namespace, kind: str, devices: int) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "benchmarks.retrieval_scale", "--child", kind, "--scratch", args.scratch,
            "--galleries", ",".join(map(str, args.galleries)), "--queries", str(args.queries), "--dim", str(args.dim),
            "--k", str(args.k), "--host-max", str(args.host_max)]
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                                     f"--xla_force_host_platform_device_count={devices}")
    results = []
    with subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith("{"):
                results.append(json.loads(line))
                print(f"  {results[-1]}", file=sys.stderr, flush=True)
    if proc.returncode:
        raise SystemExit(f"the {kind} child with {devices} devices failed (exit {proc.returncode})")
    return results


def table(rows: list[dict[str, Any]], queries: int, k: int) -> str:
    lines = [f"| gallery | path | devices | top-{k} s | ranks s | queries/s (top-k) | per-device peak GiB (shard) "
             f"| {queries:,} x gallery f32 GiB | differs from host (top-k / ranks) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["gallery"], r["path"] != "host numpy", r["devices"])):
        full = queries * r["gallery"] * 4 / GIB
        if r["path"] == "host numpy":
            memory, differs = f"{r['peak_bytes'] / GIB:.2f} (host, traced)", "-"
        else:
            memory = f"{r['peak_bytes'] / GIB:.3f} ({r['shard_bytes'] / GIB:.3f})"
            differs = f"{r['differ_top_k']} / {r['differ_ranks']}" if "differ_ranks" in r else "host skipped"
        lines.append(f"| {r['gallery']:,} | {r['path']} | {r['devices']} | {r['top_k_s']:.2f} | {r['ranks_s']:.2f} "
                     f"| {queries / r['top_k_s']:,.0f} | {memory} | {full:.2f} | {differs} |")
    return "\n".join(lines)


def header(command: str) -> str:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    cpu = next((line.split(":", 1)[1].strip() for line in run(["lscpu"]).splitlines()
                if line.startswith("Model name")), "unknown")
    commit = run(["git", "rev-parse", "--short", "HEAD"]).strip() or "unknown"
    dirty = " (with uncommitted changes)" if run(["git", "status", "--porcelain", "--untracked-files=no"]) else ""
    return (f"Host: {cpu}, {os.cpu_count()} cores. Commit: {commit}{dirty}.\n\n"
            f"```bash\n{command}\n```\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--galleries", default="10000,100000,1000000")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--devices", default="1,8", help="virtual CPU device counts, one child process each")
    p.add_argument("--host-max", type=int, default=100_000, help="largest gallery the host numpy path runs on")
    p.add_argument("--out", default="", help="also write the header and table to this Markdown file")
    p.add_argument("--child", choices=("host", "mesh"), help=argparse.SUPPRESS)
    p.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.galleries = [int(x) for x in args.galleries.split(",")]
    if args.child:
        return child(args)
    command = "python -m benchmarks.retrieval_scale " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="retrieval_scale_") as scratch:
        args.scratch = scratch
        rows = spawn(args, "host", 1)
        for devices in (int(d) for d in args.devices.split(",")):
            rows += spawn(args, "mesh", devices)
    text = table(rows, args.queries, args.k)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(f"# Retrieval at scale: the mesh path against host numpy\n\n"
                                          f"{header(command)}\n{text}\n")


if __name__ == "__main__":
    main()
