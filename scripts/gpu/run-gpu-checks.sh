#!/usr/bin/env bash
# Issue 7's GPU checks, on a machine with an NVIDIA GPU and no Rust toolchain.
#
#   scripts/gpu/run-gpu-checks.sh [--quick]
#
# Run it at the root of a copy of the source tree (it reads tests/fixtures, data/, recipes/
# and benches/torch_step.py) that holds the binary scripts/gpu/build-cuda.sh built
# (DISTIL_BIN, default target-cuda/real/distil-gpu); it copies nothing itself. The CUDA 13
# libraries come from a PyTorch install: LD_LIBRARY_PATH gets its nvidia/*/lib directories.
# PYTHON (default python3) must import torch (CUDA 13 build) and transformers.
#
#   1. parity: the four fixture models (BERT, RoBERTa, DistilBERT, ALBERT) on cuda:0 against
#      transformers' outputs and gradients, matmuls in f32 (1e-4) and in bf16 (see
#      `distil parity --help` for the tolerance and why);
#   2. the quickstart on cuda:0 (teacher, then the half-depth student, f32; then the student
#      again with training.bf16): held-out MLM loss next to the CPU figures (CPU_TEACHER_LOSS,
#      CPU_STUDENT_LOSS; default: a run on the project's 2-core machine), within QS_TOL nats
#      (default 0.05);
#   3. the BERT-base distillation step (teacher 12 layers, student 6; BATCH x SEQ, default
#      32 x 128), f32 and bf16: tokens/s and MFU of `distil bench-step` beside
#      benches/torch_step.py --mode distill on the same GPU, eager and (unless --quick)
#      torch.compile. MFU is against the GPU's nominal dense peak (PEAK_BF16 / PEAK_FP32
#      TFLOP/s, known for H100 / H200 / A100). Reported, not pass/fail.
#
# Everything is logged under OUT (default target-cuda/gpu-checks); summary.md collects the
# tables. Exit status 0 when the parity and quickstart checks passed.
# Other knobs: DEVICE (default cuda:0), BENCH_SHAPE (base), PEAK_SIZE (4096, the square
# matmul timed for the measured peak), QS_SET (extra `--set k=v` for the quickstart runs; a
# dry run of the script itself: DEVICE=cpu QS_SET="training.max_steps=2" BENCH_SHAPE=small
# BATCH=2 SEQ=16 PEAK_SIZE=64 ... --quick).
set -uo pipefail
cd "$(dirname "$0")/../.."
QUICK=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run-gpu-checks.sh: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
BIN=${DISTIL_BIN:-target-cuda/real/distil-gpu}
OUT=${OUT:-target-cuda/gpu-checks}
BATCH=${BATCH:-32}
SEQ=${SEQ:-128}
DEVICE=${DEVICE:-cuda:0}
BENCH_SHAPE=${BENCH_SHAPE:-base}
PEAK_SIZE=${PEAK_SIZE:-4096}
QS_EXTRA=()
for kv in ${QS_SET:-}; do QS_EXTRA+=(--set "$kv"); done
# The quickstart on the CPU (this project's 2-core machine, runs/quickstart, f32).
CPU_TEACHER_LOSS=${CPU_TEACHER_LOSS:-6.0978}
CPU_STUDENT_LOSS=${CPU_STUDENT_LOSS:-6.0069}
QS_TOL=${QS_TOL:-0.05}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
: > "$SUMMARY"
failed=()
say() { echo "$@" | tee -a "$SUMMARY"; }

[ -x "$BIN" ] || { echo "no binary at $BIN (build it with scripts/gpu/build-cuda.sh, or set DISTIL_BIN)" >&2; exit 1; }

# CUDA 13 runtime libraries from the PyTorch install's wheels (nvidia/cu13/lib, nvidia/nccl/lib, ...).
NVROOTS=$("$PY" -c 'import importlib.util as u; s = u.find_spec("nvidia"); print(" ".join(s.submodule_search_locations) if s else "")') || NVROOTS=""
for root in $NVROOTS; do
  for d in "$root"/*/lib; do
    [ -d "$d" ] && LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  done
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
[ -n "$NVROOTS" ] || echo "warning: $PY has no nvidia wheels (pip's torch); relying on the system's CUDA libraries" >&2

GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
case "$GPU" in
  *H100*PCIe*) P16=756; P32=51 ;;
  *H100*NVL*) P16=835; P32=60 ;;
  *H100* | *H200* | *GH200*) P16=989; P32=67 ;;
  *A100*) P16=312; P32=19.5 ;;
  *) P16=; P32= ;;
esac
PEAK_BF16=${PEAK_BF16:-$P16}
PEAK_FP32=${PEAK_FP32:-$P32}
say "# distil GPU checks"
say ""
say "- GPU: ${GPU:-unknown (nvidia-smi failed)}"
say "- distil: $("$BIN" --version 2>&1) ($BIN)"
say "- PyTorch: $("$PY" -c 'import torch, transformers; print(torch.__version__, "CUDA", torch.version.cuda, "/ transformers", transformers.__version__)' 2>&1 | tail -1)"
say "- nominal dense peak: bf16 ${PEAK_BF16:-?} TFLOP/s, fp32 ${PEAK_FP32:-?} TFLOP/s"
say ""

# 1. Parity.
for dt in f32 bf16; do
  say "## parity, $dt matmuls"
  if "$BIN" parity tests/fixtures/bert tests/fixtures/roberta tests/fixtures/distilbert \
      tests/fixtures/albert --device "$DEVICE" --dtype "$dt" > "$OUT/parity-$dt.txt" 2>&1; then
    :
  else
    failed+=("parity $dt")
  fi
  tee -a "$SUMMARY" < "$OUT/parity-$dt.txt"
  say ""
done

# 2. The quickstart on the GPU.
Q=$OUT/quickstart
run_timed() { # name, then the distil arguments
  local name=$1; shift
  local t0=$SECONDS
  if "$BIN" "$@" > "$OUT/$name.log" 2>&1; then
    echo "$name: $((SECONDS - t0)) s" >> "$OUT/times.txt"
  else
    failed+=("$name")
    echo "$name FAILED (see $OUT/$name.log):"; tail -5 "$OUT/$name.log"
  fi
}
: > "$OUT/times.txt"
run_timed quickstart-teacher run recipes/quickstart-teacher.yaml --overwrite --quiet \
  --set "training.device=$DEVICE" --set "training.output_dir=$Q/teacher" ${QS_EXTRA[@]+"${QS_EXTRA[@]}"}
run_timed quickstart-student run recipes/quickstart.yaml --overwrite --quiet \
  --set "training.device=$DEVICE" --set "distill.teacher=$Q/teacher" \
  --set "training.output_dir=$Q/student" ${QS_EXTRA[@]+"${QS_EXTRA[@]}"}
if [ "$QUICK" = 0 ]; then
  run_timed quickstart-student-bf16 run recipes/quickstart.yaml --overwrite --quiet \
    --set "training.device=$DEVICE" --set training.bf16=true --set "distill.teacher=$Q/teacher" \
    --set "training.output_dir=$Q/student-bf16" ${QS_EXTRA[@]+"${QS_EXTRA[@]}"}
fi
say "## quickstart on $DEVICE (held-out MLM loss; CPU figures: teacher $CPU_TEACHER_LOSS, student $CPU_STUDENT_LOSS; tolerance $QS_TOL)"
if "$PY" - "$Q" "$CPU_TEACHER_LOSS" "$CPU_STUDENT_LOSS" "$QS_TOL" "$OUT/times.txt" > "$OUT/quickstart.md" <<'PYEOF'
import json, os, sys
q, t_cpu, s_cpu, tol, times = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
secs = dict(l.strip().split(": ") for l in open(times) if ": " in l)
print("| model | GPU loss | CPU loss | difference | wall | |")
print("|---|---|---|---|---|---|")
ok = True
for name, ref, key in [("teacher", t_cpu, "quickstart-teacher"), ("student", s_cpu, "quickstart-student"),
                       ("student-bf16", s_cpu, "quickstart-student-bf16")]:
    p = os.path.join(q, name, "eval_results.json")
    if not os.path.exists(p):
        if name != "student-bf16":
            print(f"| {name} | missing | {ref:.4f} | | | FAIL |"); ok = False
        continue
    loss = json.load(open(p))["eval"]["loss"]
    d = loss - ref
    good = abs(d) <= tol
    ok &= good or name == "student-bf16"
    print(f"| {name} | {loss:.4f} | {ref:.4f} | {d:+.4f} | {secs.get(key, '?')} | {'PASS' if good else 'FAIL'} |")
sys.exit(0 if ok else 1)
PYEOF
then :; else failed+=("quickstart loss"); fi
tee -a "$SUMMARY" < "$OUT/quickstart.md"
say ""

# 3. The BERT-base distillation step, distil beside PyTorch.
B=$OUT/bench
mkdir -p "$B"
for dt in f32 bf16; do
  peak=$PEAK_FP32; [ "$dt" = bf16 ] && peak=$PEAK_BF16
  "$BIN" bench-step --shape "$BENCH_SHAPE" --device "$DEVICE" --dtype "$dt" --batch "$BATCH" \
    --seq "$SEQ" --peak-size "$PEAK_SIZE" ${peak:+--peak-tflops "$peak"} > "$B/distil-$dt.json" 2> "$B/distil-$dt.err" \
    || echo "distil bench-step $dt failed: $(tail -3 "$B/distil-$dt.err")"
  tdt=fp32; [ "$dt" = bf16 ] && tdt=bf16
  "$PY" benches/torch_step.py --shape "$BENCH_SHAPE" --mode distill --device "$DEVICE" --dtype "$tdt" \
    --batch "$BATCH" --seq "$SEQ" --iters 10 --warmup 3 --peak --peak-size "$PEAK_SIZE" \
    > "$B/torch-$dt.json" 2> "$B/torch-$dt.err" || echo "torch_step.py $dt failed: $(tail -3 "$B/torch-$dt.err")"
  if [ "$QUICK" = 0 ]; then
    "$PY" benches/torch_step.py --shape "$BENCH_SHAPE" --mode distill --device "$DEVICE" --dtype "$tdt" \
      --batch "$BATCH" --seq "$SEQ" --iters 10 --warmup 3 --compile \
      > "$B/torch-compile-$dt.json" 2> "$B/torch-compile-$dt.err" \
      || echo "torch_step.py --compile $dt failed: $(tail -3 "$B/torch-compile-$dt.err")"
  fi
done
say "## $BENCH_SHAPE distillation step on $DEVICE ($BATCH x $SEQ; teacher forward, half-depth student forward + backward + AdamW)"
"$PY" - "$B" "${PEAK_FP32:-0}" "${PEAK_BF16:-0}" > "$OUT/bench.md" <<'PYEOF'
import json, os, sys
b, p32, p16 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def load(n):
    p = os.path.join(b, n + ".json")
    try:
        lines = [l for l in open(p) if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
print("| dtype | distil tok/s | PyTorch eager tok/s | torch.compile tok/s | distil / eager | distil TFLOP/s | distil MFU | eager MFU | compile MFU |")
print("|---|---|---|---|---|---|---|---|---|")
for dt in ("f32", "bf16"):
    peak = p16 if dt == "bf16" else p32
    d, e, c = load(f"distil-{dt}"), load(f"torch-{dt}"), load(f"torch-compile-{dt}")
    def tps(r): return f"{r['tokens_per_s']:.0f}" if r else "–"
    def mfu(r):
        if not r or not peak: return "–"
        return f"{100 * r['matmul_flops'] / r['median_s'] / 1e12 / peak:.1f}%"
    ratio = f"{d['tokens_per_s'] / e['tokens_per_s']:.2f}×" if d and e else "–"
    tfl = f"{d['tflops']:.1f}" if d else "–"
    print(f"| {dt} | {tps(d)} | {tps(e)} | {tps(c)} | {ratio} | {tfl} | {mfu(d)} | {mfu(e)} | {mfu(c)} |")
d = load("distil-bf16"); e = load("torch-bf16")
if d and e and p16:
    m = d["matmul_flops"] / d["median_s"] / 1e12 / p16
    print()
    print(f"issue 7's targets (bf16): ahead of PyTorch eager: {'yes' if d['tokens_per_s'] > e['tokens_per_s'] else 'no'}; "
          f"at least 40% of the bf16 peak: {'yes' if m >= 0.4 else 'no'} ({100 * m:.1f}%)")
PYEOF
tee -a "$SUMMARY" < "$OUT/bench.md"
say ""
if [ ${#failed[@]} -eq 0 ]; then
  say "all checks passed (logs in $OUT)"
  exit 0
fi
say "FAILED: ${failed[*]} (logs in $OUT)"
exit 1
