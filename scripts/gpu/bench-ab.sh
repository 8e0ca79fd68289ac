#!/usr/bin/env bash
# Side by side on the GPU: `distil bench-step --parts` (the BERT-base distillation step) under
# two environments, alternating, to measure one knob with everything else equal.
#
#   scripts/gpu/bench-ab.sh "ENV_A" "ENV_B"
#   scripts/gpu/bench-ab.sh "DISTIL_CUDA_POOL=keep" "DISTIL_CUDA_POOL=release"
#   scripts/gpu/bench-ab.sh "DISTIL_BIN=/tmp/old/distil" "DISTIL_BIN=/tmp/distil-gpu"
#
# (DISTIL_BIN inside A or B picks that side's binary: two builds side by side.)
# Each of ROUNDS rounds (default 2) runs A then B (B then A in even rounds) for each dtype in
# DTYPES (default "bf16 f32") at each batch of BATCHES (default 256), SEQ 128; prints one
# line per run: tokens/s and the parts' seconds. SHAPE (base), DEVICE (cuda:0); DISTIL_BIN
# (default: target-cuda/real/distil-gpu, else .gpubin/distil-gpu.gz unpacked to /tmp/distil-gpu),
# PYTHON as in run-gpu-checks.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ $# -eq 2 ] || { awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2; }
PY=${PYTHON:-python3}
source scripts/gpu/cuda-libs.sh
BIN=$(distil_bin)
ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT
one() { # env, dtype, batch
  local bin=$BIN kv
  for kv in $1; do case $kv in DISTIL_BIN=*) bin=${kv#DISTIL_BIN=} ;; esac; done
  [ -x "$bin" ] || { echo "no distil binary at $bin (set DISTIL_BIN)"; return; }
  # shellcheck disable=SC2086
  env $1 timeout "${STEP_TIMEOUT:-180}" "$bin" bench-step --shape "${SHAPE:-base}" --device "${DEVICE:-cuda:0}" --dtype "$2" \
    --batch "$3" --seq "${SEQ:-128}" --peak-size 0 --parts 2>"$ERR" |
    "$PY" -c 'import json, sys; d = json.loads(sys.stdin.read()); p = d["parts"]
print("%10.0f tok/s  " % d["tokens_per_s"] + "  ".join("%s %.4f" % kv for kv in sorted(p.items())))' \
    2>/dev/null || echo "failed: $(tail -2 "$ERR")"
}
for r in $(seq "${ROUNDS:-2}"); do
  for bs in ${BATCHES:-256}; do
    for dt in ${DTYPES:-bf16 f32}; do
      order=("$1" "$2"); [ $((r % 2)) -eq 0 ] && order=("$2" "$1")
      for e in "${order[@]}"; do
        printf 'round %s  %-4s %4s  %-32s ' "$r" "$dt" "$bs" "$e"
        one "$e" "$dt" "$bs"
      done
    done
  done
done
