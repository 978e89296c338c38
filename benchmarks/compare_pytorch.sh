#!/usr/bin/env bash
# Role: step-time ratio PyTorch eager ÷ clover_jax for one Clover size, the two programs alternating (A B A B).
#
#   benchmarks/compare_pytorch.sh [--preset tiny|small] [--frames 8] [--size 224] [--batch 8] [--rounds 2]
#                                 [--steps 8] [--threads 2] [--text-length 30] [--malloc shipped|tcmalloc|system]
#
# --malloc: shipped (default) runs each program as it ships: clover_jax re-executes itself under tcmalloc
# when one is installed, else under pip's cmeel-mimalloc (clover_jax/host_allocator.py), the peer under the
# system malloc; tcmalloc runs both under tcmalloc with the same settings; system runs both under the system
# malloc. CLOVER_JAX_NO_TCMALLOC=1 in the environment hides tcmalloc from clover_jax, so `--malloc shipped`
# measures what a fresh install (pip only, no libtcmalloc) gets.
# Each round runs `python -m benchmarks.train_step --json` (2 warm-up + STEPS timed steps, median) and then
# ../shared/bench/torch_baseline.py (STEPS + 2 steps, median of all but the first 2) with the same clip,
# batch, text length and thread count. The PyTorch model flags are derived from the JAX preset
# (clover_config(preset): Swin widths / depths / heads, BERT width / layers / heads / FFN, fusion layers),
# so both sides build the same network. Prints every run's step time, each round's ratio and the median ratio.
# Override the interpreters / peer script with JAX_PY, TORCH_PY, TORCH_BASELINE.
set -euo pipefail

preset=tiny frames=8 size=224 batch=8 rounds=2 steps=8 threads=2 text_length=30 malloc=shipped
while [[ $# -gt 0 ]]; do
  case "$1" in
    --preset) preset=$2 ;; --frames) frames=$2 ;; --size) size=$2 ;; --batch) batch=$2 ;;
    --rounds) rounds=$2 ;; --steps) steps=$2 ;; --threads) threads=$2 ;; --text-length) text_length=$2 ;; --malloc) malloc=$2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "compare_pytorch.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift 2
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
jax_py=${JAX_PY:-$root/.venv/bin/python}
torch_py=${TORCH_PY:-$HOME/.cache/clover-torch/bin/python}
baseline=${TORCH_BASELINE:-$root/../shared/bench/torch_baseline.py}
for f in "$jax_py" "$torch_py" "$baseline"; do
  [[ -e $f ]] || { echo "compare_pytorch.sh: $f not found (see ../shared/bench/README.md)" >&2; exit 1; }
done

# torch_baseline.py flags for the JAX preset; fails if the preset needs something the peer cannot build.
torch_flags=$("$jax_py" - "$preset" <<'EOF'
import sys
from clover_jax.models.clover import clover_config
c = clover_config(sys.argv[1])
v, t = c.video, c.text
if tuple(v.patch_size) != (2, 4, 4) or tuple(v.window_size) != (8, 7, 7) or v.mlp_ratio != 4.0:
    sys.exit(f"preset {sys.argv[1]}: patch {v.patch_size} / window {v.window_size} / mlp_ratio {v.mlp_ratio} "
             "differ from torch_baseline.py's fixed (2,4,4) / (8,7,7) / 4")
j = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
print(f"--embed {v.embed_dim} --depths {j(v.depths)} --heads {j(v.num_heads)} --text-hidden {t.hidden_size} "
      f"--text-layers {t.num_layers} --text-heads {t.num_heads} --text-intermediate {t.intermediate_size} "
      f"--fusion-layers {c.fusion_layers} --vocab {t.vocab_size}")
EOF
)

jax_cmd=("$jax_py" -m benchmarks.train_step --presets "$preset" --frames "$frames" --size "$size" --batch "$batch"
         --steps "$steps" --text-length "$text_length" --threads "$threads" --json)
# shellcheck disable=SC2206  # torch_flags is a flat list of --flag value pairs
torch_cmd=("$torch_py" "$baseline" $torch_flags --frames "$frames" --size "$size" --batch "$batch"
           --steps $((steps + 2)) --text-len "$text_length" --threads "$threads")
echo "jax:   ${jax_cmd[*]}"
echo "torch: ${torch_cmd[*]}"

# Environment of each side for --malloc (the tcmalloc settings are host_allocator.TCMALLOC_SETTINGS).
tcmalloc_env=$("$jax_py" -c 'from clover_jax import host_allocator as h
lib = h.find_tcmalloc()
print(" ".join([f"LD_PRELOAD={lib}"] + [f"{k}={v}" for k, v in h.TCMALLOC_SETTINGS.items()]) if lib else "")')
case "$malloc" in
  shipped) jax_env=() torch_env=() ;;
  system) jax_env=(CLOVER_JAX_ALLOCATOR=system) torch_env=() ;;
  tcmalloc)
    [[ -n $tcmalloc_env ]] || { echo "compare_pytorch.sh: --malloc tcmalloc: no libtcmalloc found" >&2; exit 1; }
    # shellcheck disable=SC2206  # NAME=value words
    jax_env=(CLOVER_JAX_ALLOCATOR=tcmalloc) torch_env=($tcmalloc_env) ;;
  *) echo "compare_pytorch.sh: --malloc $malloc: use shipped, tcmalloc or system" >&2; exit 2 ;;
esac
echo "malloc: $malloc (clover_jax env: ${jax_env[*]:-none}; PyTorch env: ${torch_env[*]:-none})${CLOVER_JAX_NO_TCMALLOC:+; CLOVER_JAX_NO_TCMALLOC=$CLOVER_JAX_NO_TCMALLOC}"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for ((r = 1; r <= rounds; r++)); do
  for impl in jax torch; do
    log="$out/$r.$impl"
    if [[ $impl == jax ]]; then
      env "${jax_env[@]}" JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 "${jax_cmd[@]}" >"$log" 2>"$log.err" || { cat "$log.err" >&2; exit 1; }
    else
      env "${torch_env[@]}" "${torch_cmd[@]}" >"$log" 2>"$log.err" || { cat "$log.err" >&2; exit 1; }
    fi
    grep '^{' "$log" | tail -1 >"$log.json"
    echo "round $r $impl: $(cat "$log.json")"
  done
done

"$jax_py" - "$out" "$rounds" "$preset" "$frames" "$size" "$batch" "$malloc" <<'EOF'
import json, pathlib, statistics, sys
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
preset, frames, size, batch = sys.argv[3:7]
print(f"\n{preset} Clover, {frames}x{size}², batch {batch}, malloc {sys.argv[7]}: step seconds (median of the timed steps)")
print("| round | clover_jax s | PyTorch eager s | PyTorch ÷ clover_jax |")
print("|---|---|---|---|")
ratios, mallocs = [], set()
for r in range(1, rounds + 1):
    jax_s = json.loads((out / f"{r}.jax.json").read_text())["step_s_median"]
    torch_s = json.loads((out / f"{r}.torch.json").read_text())["step_s_median"]
    ratios.append(torch_s / jax_s)
    mallocs.add(json.loads((out / f"{r}.jax.json").read_text()).get("host_malloc", "?"))
    print(f"| {r} | {jax_s:.3f} | {torch_s:.3f} | {torch_s / jax_s:.2f} |")
print(f"median ratio PyTorch ÷ clover_jax over {rounds} rounds: {statistics.median(ratios):.2f} "
      "(> 1: clover_jax is faster)")
print(f"clover_jax host malloc: {', '.join(sorted(mallocs))}")
EOF
