#!/usr/bin/env bash
# The first cells of the seeds' grid (issue 13) on this 2-core CPU's budget, one seed, the calibrated default
# recipe shortened: 400 training questions, 1 epoch, 200 validation questions (half held out as the calibration
# split); each dataset's report evaluates the first 200 test questions in distribution and under shift.
#   bash benchmarks/report_runs/small_grid.sh [DATA_DIR] [DATASET...]     (from the repository root; default arc_easy openbookqa)
# Bundles go to runs/report/bundles (ignored), scores to runs/report/cache, pages to benchmarks/results/report/.
set -euo pipefail
DATA=${1:-../shared/data}
shift || true
DATASETS=("${@:-arc_easy openbookqa}")
read -r -a DATASETS <<< "${DATASETS[*]}"
OUT=runs/report/bundles
U=(.venv/bin/python -m uqserve.cli)
have() { [ -f "$OUT/$1/manifest.json" ]; }
t() { local s=$SECONDS; "$@"; echo "[grid] $(( SECONDS - s )) s: $*"; }
declare -A SHIFTS=([arc_easy]="arc_challenge" [openbookqa]="arc_challenge arc_easy mmlu_cs mmlu_eng mmlu_law mmlu_health"
                   [boolq]="arc_easy")
for D in "${DATASETS[@]}"; do
  BASE=(--dataset "$D" --data-dir "$DATA" --out "$OUT" --train-limit 400 --val-limit 200 --threads 2)
  have "$D-map" || t "${U[@]}" train ensemble "${BASE[@]}" --epochs 1 --members 1 --name "$D-map"
  have "$D-ckpt" || t "${U[@]}" train checkpoint-ensemble "${BASE[@]}" --epochs 1 --snapshots 5 --name "$D-ckpt"
  have "$D-mcdropout" || t "${U[@]}" train mc-dropout "${BASE[@]}" --epochs 1 --dropout 0.1 --samples 5 \
    --name "$D-mcdropout"
  have "$D-laplace" || t "${U[@]}" train laplace "${BASE[@]}" --map-bundle "$OUT/$D-map" --curvature-limit 200 \
    --name "$D-laplace"
  have "$D-ens5" || t "${U[@]}" train ensemble "${BASE[@]}" --epochs 1 --members 5 --name "$D-ens5"
  have "$D-uq4ct" || t "${U[@]}" train uq4ct "${BASE[@]}" --epochs 1 --name "$D-uq4ct"
  bundles=()
  for m in map ckpt mcdropout laplace ens5 uq4ct; do have "$D-$m" && bundles+=("$OUT/$D-$m"); done
  read -r -a shifts <<< "${SHIFTS[$D]:-}"
  t "${U[@]}" report "${bundles[@]}" --dataset "$D" ${shifts:+--shift "${shifts[@]}"} --data-dir "$DATA" \
    --limit 200 --threads 2 --out "benchmarks/results/report/$D" --cache-dir runs/report/cache
done
