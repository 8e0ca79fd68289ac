#!/usr/bin/env bash
# Where the GPU time of the BERT-base distillation step goes, kernel by kernel (Nsight Compute):
#
#   scripts/gpu/profile-step.sh [DTYPE] [BATCH]      # default: bf16 256
#
# Runs `ncu --metrics gpu__time_duration.sum --print-summary per-kernel` over the first
# LAUNCHES (default 3000) kernel launches of `distil bench-step --warmup 1 --iters 1` (the
# warm-up step and part of the timed one), then prints the kernels by total time
# (scripts/gpu/ncu_table.py); both are kept in OUT (default target-cuda/profile) as
# ncu-DTYPE-BATCH.txt and .md. NCU (default: ncu on PATH, else /usr/local/cuda/bin/ncu),
# DISTIL_BIN and PYTHON as in bench-ab.sh. Takes about 40 s on an H100 at the defaults.
set -uo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;; esac
DT=${1:-bf16}
BS=${2:-256}
PY=${PYTHON:-python3}
source scripts/gpu/cuda-libs.sh
BIN=$(distil_bin)
[ -x "$BIN" ] || { echo "no distil binary at $BIN (set DISTIL_BIN)" >&2; exit 1; }
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
[ -x "$NCU" ] || { echo "no ncu (Nsight Compute) at $NCU (set NCU)" >&2; exit 1; }
OUT=${OUT:-target-cuda/profile}
mkdir -p "$OUT"
raw=$OUT/ncu-$DT-$BS.txt
"$NCU" --metrics gpu__time_duration.sum --print-summary per-kernel \
  --launch-count "${LAUNCHES:-3000}" "$BIN" bench-step --shape base --device cuda:0 \
  --dtype "$DT" --batch "$BS" --seq "${SEQ:-128}" --peak-size 0 --warmup 1 --iters 1 \
  > "$raw" 2>&1
status=$?
"$PY" scripts/gpu/ncu_table.py "$raw" --top "${TOP:-30}" | tee "$OUT/ncu-$DT-$BS.md" \
  || { echo "ncu exited $status; its output: $raw" >&2; tail -5 "$raw" >&2; exit 1; }
