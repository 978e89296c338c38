"""Each recipe's `,tiny` run on the synthetic dataset: when its evaluator ran and which step <workdir>/best holds.

  python -m benchmarks.recipe_schedules [--keep DIR]

Runs `python -m clover_jax.train` once per recipe (pre-training, retrieval fine-tuning, MSR-VTT multiple
choice, open-ended and multiple-choice QA on the synthetic questions) in a temporary workdir and prints,
from its metrics.jsonl, the steps at which the evaluator ran, the epoch, the selection metric there, and
the step and value in <workdir>/best/best.json. About 5-10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
QA_SYNTHETIC = ["--config.qa.source=synthetic", "--config.qa.dataset=synthetic", "--config.total_epochs=2"]
# (name, config, extra flags); "{mc}" is replaced by an MSR-VTT-style multiple-choice file over the test clips.
RUNS = [
    ("pretrain", "configs/pretrain.py:tiny", []),
    ("retrieval msrvtt", "configs/finetune_retrieval.py:msrvtt,tiny", []),
    ("msrvtt_mc", "configs/finetune_retrieval.py:msrvtt_mc,tiny", ["--config.evals.msrvtt_mc.file={mc}"]),
    ("qa open-ended (msrvtt_qa)", "configs/finetune_qa.py:msrvtt_qa,tiny",
     [*QA_SYNTHETIC, "--config.model.overrides.num_answers=21"]),
    ("qa multiple choice (lsmdc_mc)", "configs/finetune_qa.py:lsmdc_mc,tiny",
     [*QA_SYNTHETIC, "--config.qa.mc_format=caption"]),  # the full format outgrows the tiny text length
]


def _mc_file(cache: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """One 5-option item per synthetic test clip (fixed options, answer i % 5: it exercises the schedule)."""
    from data_pipelines.build.built_splits import split_index

    folder = next(cache.glob("tfds/*/synthetic_*/*"))
    options = ["a red circle moves to the left", "two blue squares spin around", "a green cross stays in place",
               "three white diamonds bounce up and down", "a purple triangle moves upwards"]
    rows = [{"qid": i, "clip_name": v, "options": options, "answer": str(i % 5)}
            for i, v in enumerate(split_index(folder, "test").video_id)]
    out.write_text("\n".join(json.dumps(r) for r in rows))
    return out


def summarize(name: str, workdir: pathlib.Path, stdout: str, metric: str) -> list[str]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if metric in r]
    best = json.loads((workdir / "best" / "best.json").read_text())
    per_epoch = re.search(r"1 epoch = ([\d.]+) steps; (\d+) steps", stdout)
    lines = [f"## {name}: best_metric {metric}; 1 epoch = {per_epoch.group(1)} steps, {per_epoch.group(2)} steps",
             "| step | epoch | " + metric + " |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['epoch']:.2f} | {r[metric]:.4f} |" for r in evaluated]
    kept = sorted(p.name for p in (workdir / "best").iterdir() if p.name.isdigit())
    lines.append(f"<workdir>/best: step {best['step']} ({metric} = {best['value']:.4f}); folders {kept}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default="", help="keep the workdirs under this folder (default: a temp dir)")
    args = parser.parse_args()
    root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="recipe_schedules_"))
    cache = root / "cache"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(cache / "xla"))
    out = []
    for i, (name, spec, extra) in enumerate(RUNS):
        workdir = root / f"run{i}"
        if "{mc}" in " ".join(extra):
            mc = str(_mc_file(cache, root / "msrvtt_mc.jsonl"))
            extra = [e.replace("{mc}", mc) for e in extra]
        cmd = [sys.executable, "-m", "clover_jax.train", f"--config={spec}", f"--workdir={workdir}",
               f"--config.data.cache_dir={cache}", "--config.log_every=1", "--config.checkpoint_every=100", *extra]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        config = json.loads((workdir / "config.json").read_text())
        out += [f"`{' '.join(cmd[2:4] + extra)}`", *summarize(name, workdir, proc.stdout, config["best_metric"]), ""]
        print(f"{name}: done", file=sys.stderr, flush=True)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
