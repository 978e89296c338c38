#!/usr/bin/env bash
# Role: the `:base` pod-recipe table: `python -m clover_jax.compile` for each cell, one JSON + text per cell
# under benchmarks/results/tpu_compile/ (read into one table by `python -m benchmarks.compile_table`).
#
#   benchmarks/compile_table.sh [CELL ...]     (default: every cell below, in order; each takes 5-15 min on 2 cores)
#
# v5p (95 GiB) at the paper's 32 clips per chip (v5p-8: 4 chips, batch 128): video batching x remat policy,
# then microbatches 2 / 4 and FSDP over the 4 chips for the `:base` default (per_clip, remat none: the best of
# the six); v4 (32 GiB) and v5e (16 GiB) at 32 clips per chip and at larger batches to bracket the largest
# that fits; `:base` as configured on v5p-32. `*_full_32`: the earlier default (remat full) on v4 / v5e.
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/tpu_compile
mkdir -p "$out"
py=${PY:-.venv/bin/python}
base="--config=configs/pretrain.py:base"
b() { echo "--config.data.batch_size=$1 --config.eval.batch_size=$1"; }
declare -A CELLS=(
  [v5p_per_clip_full]="$base --topology=v5p-8 $(b 128)"
  [v5p_batched_full]="$base --topology=v5p-8 $(b 128) --config.model.video_batching=batched"
  [v5p_per_clip_dots]="$base --topology=v5p-8 $(b 128) --config.model.remat=dots_saveable"
  [v5p_batched_dots]="$base --topology=v5p-8 $(b 128) --config.model.video_batching=batched --config.model.remat=dots_saveable"
  [v5p_per_clip_none]="$base --topology=v5p-8 $(b 128) --config.model.remat=none"
  [v5p_batched_none]="$base --topology=v5p-8 $(b 128) --config.model.video_batching=batched --config.model.remat=none"
  [v5p_best_micro2]="$base --topology=v5p-8 $(b 128) --config.microbatches=2"
  [v5p_best_micro4]="$base --topology=v5p-8 $(b 128) --config.microbatches=4"
  [v5p_best_fsdp]="$base --topology=v5p-8 $(b 128) --config.mesh.data=1 --config.mesh.fsdp=4"
  [v4_default_32]="$base --topology=v4-8 $(b 128)"
  [v5e_default_32]="$base --topology=v5e-4 $(b 128)"
  [v4_full_32]="$base --topology=v4-8 $(b 128) --config.model.remat=full"
  [v5e_full_32]="$base --topology=v5e-4 $(b 128) --config.model.remat=full"
  [v4_default_128]="$base --topology=v4-8 $(b 512)"
  [v4_default_384]="$base --topology=v4-8 $(b 1536)"
  [v4_default_512]="$base --topology=v4-8 $(b 2048)"
  [v5e_default_192]="$base --topology=v5e-4 $(b 768)"
  [v5e_default_128]="$base --topology=v5e-4 $(b 512)"
  [v5e_default_512]="$base --topology=v5e-4 $(b 2048)"
  [base_v5p-32]="$base --topology=v5p-32"
  [v5p-32_full]="$base --topology=v5p-32 --config.model.remat=full"
)
ORDER=(v5p_per_clip_full v5p_batched_full v5p_per_clip_dots v5p_batched_dots v5p_per_clip_none v5p_batched_none
       v4_default_32 v5e_default_32 v5p_best_micro2 v5p_best_fsdp v5p_best_micro4 v4_default_128 v5e_default_128
       base_v5p-32 v4_full_32 v5e_full_32 v5e_default_512 v4_default_512 v4_default_384 v5e_default_192)
cells=("${@:-${ORDER[@]}}")
for cell in "${cells[@]}"; do
  args=${CELLS[$cell]:-$cell}  # a cell name, or literal compile flags
  name=$cell; [[ -n ${CELLS[$cell]:-} ]] || name=$(echo "$cell" | tr -c 'a-zA-Z0-9_.=-' '_' | cut -c1-80)
  echo "=== $name $(date +%T)"
  # shellcheck disable=SC2086  # args is a flat list of flags
  /usr/bin/time -f "wall %e s, max RSS %M KB" "$py" -m clover_jax.compile $args --json="$out/$name.json" \
    > "$out/$name.txt" 2>&1
  echo "exit $? $(date +%T)"; tail -2 "$out/$name.txt"
done
