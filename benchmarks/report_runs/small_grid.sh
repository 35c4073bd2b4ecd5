#!/usr/bin/env bash
# The seeds' grid (issue 13) on this 2-core CPU's budget: six methods (MAP, checkpoint ensemble K = 5, MC dropout
# p = 0.1 S = 5, Laplace KFAC, ensemble M = 5, UQ4CT) per training dataset, the default recipe shortened to 400
# training questions and 200 validation questions (half held out as the calibration split); each page evaluates the
# first 200 test questions in distribution and under shift, and adds the seed-0 MAP at temperature 1 (@T1).
#   [REGIME=default|overtrained] [SEEDS="0 1 2"] bash benchmarks/report_runs/small_grid.sh [DATA_DIR] [DATASET...]
# (from the repository root; default datasets arc_easy openbookqa). REGIME=default trains 1 epoch (the calibrated
# recipe, shortened); overtrained trains 3 epochs (3× the default's epochs, as the README's over-trained recipe is
# 6 vs 2), where the seed papers' uncalibrated MAP lives. Seed s > 0 bundles are named <dataset>[-ot]-<method>-s<s>;
# where several seeds exist the page shows each method as one row, mean ± std over seeds. SHIFTS="..." overrides
# a dataset's shift sets. Idempotent: existing bundles and cached scores are reused.
# Bundles go to runs/report/bundles (ignored), scores to runs/report/cache, pages to
# benchmarks/results/report/<dataset>[-overtrained]/ and the overview to benchmarks/results/report/index.html.
set -euo pipefail
DATA=${1:-../shared/data}
shift || true
DATASETS=("${@:-arc_easy openbookqa}")
read -r -a DATASETS <<< "${DATASETS[*]}"
read -r -a SEEDS <<< "${SEEDS:-0}"
REGIME=${REGIME:-default}
case "$REGIME" in
  default) EPOCHS=1; TAG=""; PAGE_SUFFIX="" ;;
  overtrained) EPOCHS=3; TAG="-ot"; PAGE_SUFFIX="-overtrained" ;;
  *) echo "REGIME must be default or overtrained, got $REGIME" >&2; exit 2 ;;
esac
OUT=runs/report/bundles
U=(.venv/bin/python -m uqserve.cli)
METHODS=(map ckpt mcdropout laplace ens5 uq4ct)
have() { [ -f "$OUT/$1/manifest.json" ]; }
t() { local s=$SECONDS; "$@"; echo "[grid] $(( SECONDS - s )) s: $*"; }
name() { local n="$1$TAG-$2"; [ "$3" = 0 ] && echo "$n" || echo "$n-s$3"; }  # dataset method seed
declare -A DEFAULT_SHIFTS=([arc_easy]="arc_challenge" [arc_challenge]="" [boolq]=""
                           [openbookqa]="arc_challenge arc_easy mmlu_cs mmlu_eng mmlu_law mmlu_health")
for D in "${DATASETS[@]}"; do
  for S in "${SEEDS[@]}"; do
    BASE=(--dataset "$D" --data-dir "$DATA" --out "$OUT" --train-limit 400 --val-limit 200 --threads 2 --seed "$S")
    n() { name "$D" "$1" "$S"; }
    have "$(n map)" || t "${U[@]}" train ensemble "${BASE[@]}" --epochs $EPOCHS --members 1 --name "$(n map)"
    have "$(n ckpt)" || t "${U[@]}" train checkpoint-ensemble "${BASE[@]}" --epochs $EPOCHS --snapshots 5 \
      --name "$(n ckpt)"
    have "$(n mcdropout)" || t "${U[@]}" train mc-dropout "${BASE[@]}" --epochs $EPOCHS --dropout 0.1 --samples 5 \
      --name "$(n mcdropout)"
    have "$(n laplace)" || t "${U[@]}" train laplace "${BASE[@]}" --map-bundle "$OUT/$(n map)" \
      --curvature-limit 200 --name "$(n laplace)"
    have "$(n ens5)" || t "${U[@]}" train ensemble "${BASE[@]}" --epochs $EPOCHS --members 5 --name "$(n ens5)"
    have "$(n uq4ct)" || t "${U[@]}" train uq4ct "${BASE[@]}" --epochs $EPOCHS --name "$(n uq4ct)"
  done
  bundles=(); groups=(); raw=()
  for m in "${METHODS[@]}"; do
    seeded=()
    for S in "${SEEDS[@]}"; do have "$(name "$D" $m "$S")" && seeded+=("$(name "$D" $m "$S")"); done
    [ ${#seeded[@]} -eq 0 ] && continue
    for b in "${seeded[@]}"; do bundles+=("$OUT/$b"); done
    [ ${#seeded[@]} -gt 1 ] && groups+=(--group "$D$TAG-$m=$(IFS=,; echo "${seeded[*]}")")
    if [ $m = map ]; then
      for b in "${seeded[@]}"; do raw+=(--uncalibrated "$b"); done
      [ ${#seeded[@]} -gt 1 ] && groups+=(--group "$D$TAG-map@T1=$(printf '%s@T1,' "${seeded[@]}" | sed 's/,$//')")
    fi
  done
  read -r -a shifts <<< "${SHIFTS-${DEFAULT_SHIFTS[$D]:-}}"
  t "${U[@]}" report "${bundles[@]}" --dataset "$D" ${shifts:+--shift "${shifts[@]}"} --data-dir "$DATA" \
    --limit 200 --threads 2 --out "benchmarks/results/report/$D$PAGE_SUFFIX" --cache-dir runs/report/cache \
    "${groups[@]}" "${raw[@]}"
done
.venv/bin/python benchmarks/report_runs/overview.py benchmarks/results/report
