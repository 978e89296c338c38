"""The compile table: one markdown row per `python -m clover_jax.compile --json` result of `compile_table.sh`.

  .venv/bin/python -m benchmarks.compile_table [benchmarks/results/tpu_compile]

Per cell: chip and clips per chip, video batching, remat policy, microbatches and mesh, per-chip peak against
the chip's HBM, XLA's FLOP count and the analytic model matmul FLOPs (their ratio shows the recompute where XLA
counts every op; a scanned encoder is counted once per loop body), bytes accessed, the roofline lower bound and
the compile time.
"""
from __future__ import annotations

import json
import pathlib
import sys

GIB = 2**30
COLUMNS = ("cell", "chip", "clips/chip", "video batching", "remat", "microbatches", "mesh", "args GiB", "temps GiB",
           "peak GiB / HBM", "XLA TFLOP", "model TFLOP", "GB accessed", "roofline ms", "compile s")

# (report key, divisor, decimals) of the numeric columns after the peak
NUMBERS = (("xla_flops", 1e12, 2), ("analytic_flops", 1e12, 2), ("bytes_accessed", 1e9, 0), ("roofline_s", 1e-3, 0))


def row(name: str, r: dict) -> list[str]:
    """The table cells of one result."""
    mesh = "x".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
    return [name, f"{r['topology']}", f"{r['clips_per_chip']:g}", r["model"]["video_batching"], r["model"]["remat"],
            str(r["model"]["microbatches"]), mesh, _number(r["arguments"], GIB, 2), f"{r['temporaries'] / GIB:.2f}",
            (f"**> {r['peak'] / GIB:.2f}** / {r['hbm'] / GIB:.0f} (refused by the compiler)" if r.get("refused")
             else f"**{r['peak'] / GIB:.2f}** / {r['hbm'] / GIB:.0f}" + ("" if r["fits"] else " (does not fit)")),
            *(_number(r[k], scale, digits) for k, scale, digits in NUMBERS),
            f"{r['compile_s']:.0f}"]


def _number(value, scale: float, digits: int) -> str:
    """value / scale, or "—" where the report has none (JSON null: a refused compile)."""
    return "—" if value is None else f"{value / scale:.{digits}f}"


def main() -> None:
    folder = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/tpu_compile")
    results = sorted(folder.glob("*.json"))
    if not results:
        raise SystemExit(f"no *.json results in {folder}: run benchmarks/compile_table.sh first")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for path in results:
        print("| " + " | ".join(row(path.stem, json.loads(path.read_text()))) + " |")


if __name__ == "__main__":
    main()
