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
#      again with training.bf16), and the same two stages on this machine's CPU loading the GPU
#      teacher's tokenizer (so that the two runs differ by the device alone): held-out MLM loss
#      of each GPU model within QS_TOL nats (default 0.05) of its CPU twin; the project's
#      2-core machine's figures are printed beside them (CPU_TEACHER_LOSS, CPU_STUDENT_LOSS);
#   3. the BERT-base distillation step (teacher 12 layers, student 6; batch x SEQ for each
#      batch of BATCHES, default "32 256" x 128), f32 and bf16, each run under a timeout of
#      STEP_TIMEOUT seconds (default 240): tokens/s and MFU of `distil bench-step` beside
#      benches/torch_step.py --mode distill on the same GPU, eager and (unless --quick)
#      torch.compile at the largest batch, for the dtypes in COMPILE (default "f32 bf16"),
#      and distil again with candle's composed ops (`bench-step --composed`) for what the
#      CUDA kernels give. MFU is against the GPU's nominal dense peak (PEAK_BF16 / PEAK_FP32
#      TFLOP/s, known for H100 / H200 / A100). Reported, not pass/fail.
#
# Everything is logged under OUT (default target-cuda/gpu-checks); summary.md collects the
# tables. Exit status 0 when the parity and quickstart checks passed.
# Other knobs: DEVICE (default cuda:0), BENCH_SHAPE (base), PEAK_SIZE (4096, the square
# matmul timed for the measured peak), QS_SET (extra `--set k=v` for the quickstart runs; a
# dry run of the script itself: DEVICE=cpu QS_SET="training.max_steps=2" BENCH_SHAPE=small
# BATCHES=2 SEQ=16 PEAK_SIZE=64 ... --quick).
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
BATCHES=${BATCHES:-${BATCH:-32 256}}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
COMPILE=${COMPILE:-f32 bf16}
SEQ=${SEQ:-128}
DEVICE=${DEVICE:-cuda:0}
BENCH_SHAPE=${BENCH_SHAPE:-base}
PEAK_SIZE=${PEAK_SIZE:-4096}
QS_EXTRA=()
for kv in ${QS_SET:-}; do QS_EXTRA+=(--set "$kv"); done
# The quickstart on the CPU (this project's 2-core machine, runs/quickstart, f32).
CPU_TEACHER_LOSS=${CPU_TEACHER_LOSS:-6.0778}
CPU_STUDENT_LOSS=${CPU_STUDENT_LOSS:-5.9918}
QS_TOL=${QS_TOL:-0.05}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.md
: > "$SUMMARY"
failed=()
say() { echo "$@" | tee -a "$SUMMARY"; }

[ -x "$BIN" ] || { echo "no binary at $BIN (build it with scripts/gpu/build-cuda.sh, or set DISTIL_BIN)" >&2; exit 1; }

# CUDA 13 runtime libraries from the PyTorch install's wheels, and the driver's libcuda.
source scripts/gpu/cuda-libs.sh

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
  if timeout "$STEP_TIMEOUT" "$BIN" parity tests/fixtures/bert tests/fixtures/roberta tests/fixtures/distilbert \
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
  if timeout "$STEP_TIMEOUT" "$BIN" "$@" > "$OUT/$name.log" 2>&1; then
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
run_timed quickstart-student-bf16 run recipes/quickstart.yaml --overwrite --quiet \
  --set "training.device=$DEVICE" --set training.bf16=true --set "distill.teacher=$Q/teacher" \
  --set "training.output_dir=$Q/student-bf16" ${QS_EXTRA[@]+"${QS_EXTRA[@]}"}
# The CPU twins: the same recipes on this machine's CPU with the GPU teacher's tokenizer.
run_timed cpu-teacher run recipes/quickstart-teacher.yaml --overwrite --quiet \
  --set training.device=cpu --set tokenizer.train=null --set "tokenizer.load=$Q/teacher/tokenizer.json" \
  --set "training.output_dir=$Q/cpu-teacher" ${QS_EXTRA[@]+"${QS_EXTRA[@]}"}
run_timed cpu-student run recipes/quickstart.yaml --overwrite --quiet \
  --set training.device=cpu --set "distill.teacher=$Q/cpu-teacher" \
  --set "training.output_dir=$Q/cpu-student" ${QS_EXTRA[@]+"${QS_EXTRA[@]}"}
say "## quickstart on $DEVICE (held-out MLM loss against the CPU twin with the same tokenizer, tolerance $QS_TOL; the 2-core machine: teacher $CPU_TEACHER_LOSS, student $CPU_STUDENT_LOSS)"
if "$PY" - "$Q" "$CPU_TEACHER_LOSS" "$CPU_STUDENT_LOSS" "$QS_TOL" "$OUT/times.txt" > "$OUT/quickstart.md" <<'PYEOF'
import json, os, sys
q, t_cpu, s_cpu, tol, times = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
secs = dict(l.strip().split(": ") for l in open(times) if ": " in l)
def loss(name):
    p = os.path.join(q, name, "eval_results.json")
    return json.load(open(p))["eval"]["loss"] if os.path.exists(p) else None
print("| model | GPU loss | GPU wall | CPU twin loss | CPU twin wall | difference | 2-core | |")
print("|---|---|---|---|---|---|---|---|")
ok = True
for name, twin, ref in [("teacher", "cpu-teacher", t_cpu), ("student", "cpu-student", s_cpu),
                        ("student-bf16", "cpu-student", s_cpu)]:
    g, c = loss(name), loss(twin)
    if g is None and name == "student-bf16":
        continue
    if g is None or c is None:
        print(f"| {name} | {g} | | {c} | | | {ref:.4f} | FAIL (missing) |"); ok = False
        continue
    d = g - c
    good = abs(d) <= tol
    ok &= good
    print(f"| {name} | {g:.4f} | {secs.get('quickstart-' + name, '?')} | {c:.4f} | {secs.get(twin, '?')} | {d:+.4f} | {ref:.4f} | {'PASS' if good else 'FAIL'} |")
sys.exit(0 if ok else 1)
PYEOF
then :; else failed+=("quickstart loss"); fi
tee -a "$SUMMARY" < "$OUT/quickstart.md"
say ""

# 3. The BERT-base distillation step, distil beside PyTorch, at each batch size of BATCHES.
B=$OUT/bench
mkdir -p "$B"
for bs in $BATCHES; do
  for dt in f32 bf16; do
    peak=$PEAK_FP32; [ "$dt" = bf16 ] && peak=$PEAK_BF16
    tag=$dt-$bs
    timeout "$STEP_TIMEOUT" "$BIN" bench-step --shape "$BENCH_SHAPE" --device "$DEVICE" --dtype "$dt" --batch "$bs" \
      --seq "$SEQ" --peak-size "$PEAK_SIZE" ${peak:+--peak-tflops "$peak"} --parts > "$B/distil-$tag.json" 2> "$B/distil-$tag.err" \
      || echo "distil bench-step $tag failed: $(tail -3 "$B/distil-$tag.err")"
    timeout "$STEP_TIMEOUT" "$BIN" bench-step --shape "$BENCH_SHAPE" --device "$DEVICE" --dtype "$dt" --batch "$bs" \
      --seq "$SEQ" --peak-size 0 --composed --parts > "$B/composed-$tag.json" 2> "$B/composed-$tag.err" \
      || echo "distil bench-step --composed $tag failed: $(tail -3 "$B/composed-$tag.err")"
    tdt=fp32; [ "$dt" = bf16 ] && tdt=bf16
    timeout "$STEP_TIMEOUT" "$PY" benches/torch_step.py --shape "$BENCH_SHAPE" --mode distill --device "$DEVICE" --dtype "$tdt" \
      --batch "$bs" --seq "$SEQ" --iters 10 --warmup 3 --peak --peak-size "$PEAK_SIZE" \
      > "$B/torch-$tag.json" 2> "$B/torch-$tag.err" || echo "torch_step.py $tag failed: $(tail -3 "$B/torch-$tag.err")"
    if [ "$QUICK" = 0 ] && [ "$bs" = "${BATCHES##* }" ] && [[ " $COMPILE " == *" $dt "* ]]; then
      timeout "$STEP_TIMEOUT" "$PY" benches/torch_step.py --shape "$BENCH_SHAPE" --mode distill --device "$DEVICE" --dtype "$tdt" \
        --batch "$bs" --seq "$SEQ" --iters 10 --warmup 3 --compile \
        > "$B/torch-compile-$tag.json" 2> "$B/torch-compile-$tag.err" \
        || echo "torch_step.py --compile $tag failed: $(tail -3 "$B/torch-compile-$tag.err")"
    fi
  done
done
say "## $BENCH_SHAPE distillation step on $DEVICE (batch x $SEQ; teacher forward, half-depth student forward + backward + AdamW)"
"$PY" - "$B" "${PEAK_FP32:-0}" "${PEAK_BF16:-0}" "$BATCHES" > "$OUT/bench.md" <<'PYEOF'
import json, os, sys
b, p32, p16, batches = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split()
def load(n):
    p = os.path.join(b, n + ".json")
    try:
        lines = [l for l in open(p) if l.strip().startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except OSError:
        return None
print("| batch | dtype | distil tok/s | distil, candle's ops tok/s | PyTorch eager tok/s | torch.compile tok/s | distil / eager | distil TFLOP/s | distil MFU | eager MFU | compile MFU | distil parts (s) | candle's ops parts (s) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
best = None
for bs in batches:
    for dt in ("f32", "bf16"):
        peak = p16 if dt == "bf16" else p32
        tag = f"{dt}-{bs}"
        d, e, c = load(f"distil-{tag}"), load(f"torch-{tag}"), load(f"torch-compile-{tag}")
        k = load(f"composed-{tag}")
        def tps(r): return f"{r['tokens_per_s']:.0f}" if r else "–"
        def mfu(r):
            if not r or not peak: return "–"
            return f"{100 * r['matmul_flops'] / r['median_s'] / 1e12 / peak:.1f}%"
        ratio = f"{d['tokens_per_s'] / e['tokens_per_s']:.2f}×" if d and e else "–"
        tfl = f"{d['tflops']:.1f}" if d else "–"
        def parts(r): return " ".join(f"{n} {v:.4f}" for n, v in (r or {}).get("parts", {}).items())
        print(f"| {bs} | {dt} | {tps(d)} | {tps(k)} | {tps(e)} | {tps(c)} | {ratio} | {tfl} | {mfu(d)} | {mfu(e)} | {mfu(c)} | {parts(d)} | {parts(k)} |")
        if dt == "bf16" and d and e and p16:
            m = d["matmul_flops"] / d["median_s"] / 1e12 / p16
            if best is None or m > best[0]:
                best = (m, bs, d["tokens_per_s"] > e["tokens_per_s"])
if best:
    m, bs, ahead = best
    print()
    print(f"issue 7's targets (bf16, batch {bs}, distil's best MFU): ahead of PyTorch eager: {'yes' if ahead else 'no'}; "
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
