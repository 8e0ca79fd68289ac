#!/usr/bin/env bash
# distil's step (benches/encoder_step.rs) beside PyTorch's (benches/torch_step.py) on the same
# shape, batch and thread count, alternating, then a table.
#
#   benches/compare.sh [small|base] [forward|train|distill] [threads] [-- more flags for both sides]
#
#   benches/compare.sh small train 2
#   ITERS=3 WARMUP=5 benches/compare.sh base forward 2
#   benches/compare.sh small distill 2
#
# Builds the Rust bench once (release), then runs ROUNDS rounds; each round runs both sides
# once, ours first in odd rounds and PyTorch first in even ones, so drift in the machine's
# load hits both alike. Each run times WARMUP + ITERS steps and reports the median step.
# train mode: dropout 0.1, MLM head on the masked rows only (--head-on masked) on both sides,
# and the AdamW step on both (OPTIM=0 passes --no-optim to both).
# distill mode: one distillation step (issue 6): frozen teacher forward (the shape, eval mode)
# + DistilBERT-style student (small: 2 layers, base: 6) forward, 5 soft (T = 2) + 2 MLM
# + 1 cosine loss, backward, AdamW (OPTIM=0 leaves it out); the same batch on both sides.
#
# Environment:
#   ROUNDS (3)  ITERS, WARMUP (small: 10, 2; base: 3, 5)  SEQ (128)  OPTIM (1)
#   BATCH   (8; small distill: 16)
#   PYTHON  interpreter with torch + transformers (default: ../venv/bin/python,
#           ./venv/bin/python, then python3)
#   TORCH_MALLOC (tuned)  `default` runs PyTorch with glibc's malloc defaults instead of the
#           settings distil uses for itself (no mmap for large blocks, no trimming, one arena)
#   TORCH_MKL (auto)  on x86 CPUs with AVX-512 that are not Intel's, `auto` preloads a shim
#           (built with cc) so that MKL runs its AVX-512 code rather than its AVX2 code;
#           `stock` never does, `intel-path` always does (see below)
#   OUT     where the JSON lines go (default: target/bench-compare/SHAPE-MODE-THREADS[-no-optim])
#   LOCKSTEP (0)  1: instead of ROUNDS whole runs, one run of each side, both alive, stepped
#           in turn by benches/lockstep.py: PAIRS pairs (default: base 12, small 30) of bursts
#           of BURST steps (3; each side's time in a pair is the median of its burst's steps
#           after the first), so that the two sides of a pair see the machine in the same
#           state; prints the per-pair ratio's median and spread beside the usual table
set -euo pipefail
cd "$(dirname "$0")/.."

shape=${1:-small}
mode=${2:-train}
threads=${3:-2}
shift $(($# < 3 ? $# : 3))
if [[ ${1:-} == -- ]]; then shift; fi
extra=("$@")

case $shape in small | base) ;; *) echo "shape must be small or base, not '$shape'" >&2; exit 2 ;; esac
case $mode in
    forward | train | distill) ;;
    *) echo "mode must be forward, train or distill, not '$mode'" >&2; exit 2 ;;
esac
[[ $threads =~ ^[1-9][0-9]*$ ]] || { echo "threads must be a positive integer, not '$threads'" >&2; exit 2; }

# PyTorch's BERT-base backward gets faster over its first several steps (distillation,
# medians of 3 steps alone: 0.538 s after 1 warm-up step, 0.506 after 3, 0.483 after 6, 0.478
# after 12), so base runs warm up for 5 steps: each side is timed in its steady state.
if [[ $shape == base ]]; then def_iters=3 def_warmup=5; else def_iters=10 def_warmup=2; fi
rounds=${ROUNDS:-3}
iters=${ITERS:-$def_iters}
warmup=${WARMUP:-$def_warmup}
if [[ $mode == distill && $shape == small ]]; then def_batch=16; else def_batch=8; fi
batch=${BATCH:-$def_batch}
seq=${SEQ:-128}
optim=${OPTIM:-1}
# PyTorch's MKL on CPUs that are not Intel's: see run_torch below.
torch_mkl=${TORCH_MKL:-auto}
case $torch_mkl in
    auto)
        vendor=$(awk -F': *' '/^vendor_id/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)
        if [[ -n $vendor && $vendor != GenuineIntel ]] && grep -qw avx512f /proc/cpuinfo; then
            torch_mkl=intel-path
        else
            torch_mkl=stock
        fi
        ;;
    stock | intel-path) ;;
    *) echo "TORCH_MKL must be auto, stock or intel-path, not '$torch_mkl'" >&2; exit 2 ;;
esac

if [[ -z ${PYTHON:-} ]]; then
    for p in ../venv/bin/python venv/bin/python python3; do
        if command -v "$p" >/dev/null 2>&1; then PYTHON=$p; break; fi
    done
fi
if ! "$PYTHON" -c 'import torch, transformers' 2>/dev/null; then
    echo "$PYTHON cannot import torch and transformers; set PYTHON or see the README's benchmark section" >&2
    exit 2
fi

suffix=""
if [[ $mode != forward && $optim == 0 ]]; then suffix=-no-optim; fi
out=${OUT:-target/bench-compare/$shape-$mode-$threads$suffix}
mkdir -p "$out"
rm -f "$out"/{distil,pytorch}.{jsonl,others} "$out"/lockstep.{json,txt}

echo "building benches/encoder_step.rs (release)..." >&2
exe=$(cargo bench --bench encoder_step --no-run --message-format=json |
    "$PYTHON" -c '
import json, sys
exe = ""
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "encoder_step" and m.get("executable"):
        exe = m["executable"]
print(exe)')
if [[ -z $exe || ! -x $exe ]]; then
    echo "the bench did not build; run: cargo bench --bench encoder_step --no-run" >&2
    exit 1
fi

common=(--shape "$shape" --mode "$mode" --batch "$batch" --seq "$seq" --iters "$iters" --warmup "$warmup" --threads "$threads")
if [[ $mode == train ]]; then common+=(--head-on masked); fi
if [[ $mode != forward && $optim == 0 ]]; then common+=(--no-optim); fi
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

# CPU time the whole machine spent busy, and what our runs (this shell's children) used, in
# clock ticks: the difference is other work that shared the CPUs while we measured.
cpu_busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }
own_cpu() { awk '{print $16 + $17}' "/proc/$$/stat"; }
others_since() { # busy0 own0 t0 -> CPUs used by other processes on average since then
    awk -v b="$(($(cpu_busy) - $1))" -v o="$(($(own_cpu) - $2))" -v hz="$(getconf CLK_TCK)" \
        -v t0="$3" -v t1="$(date +%s.%N)" 'BEGIN {printf "%.2f", (b - o) / hz / (t1 - t0)}'
}
busy0=$(cpu_busy) own0=$(own_cpu) t0=$(date +%s.%N)
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
timed() { # name command...: one run, its JSON line and the other processes' CPU use
    local name=$1 b o t
    shift
    b=$(cpu_busy) o=$(own_cpu) t=$(date +%s.%N)
    "$@" | tail -n 1 >>"$out/$name.jsonl"
    others_since "$b" "$o" "$t" >>"$out/$name.others"
    echo >>"$out/$name.others"
}
run_ours() { timed distil "$exe" "${common[@]}" "${extra[@]}"; }
# PyTorch gets the allocator settings distil gives itself (src/util/alloc.rs): large blocks
# kept on the heap instead of mapped and unmapped each step. With glibc's defaults its
# backward paid page faults for every gradient buffer and varied from 0.65 to 1.17 s a
# BERT-base distillation step between hosts and hours (0.64-0.79 s with these). And the
# transparent huge pages distil asks glibc for (measured on PyTorch's side: within noise,
# 1.85 vs 1.83 s a step over 3 pairs). TORCH_MALLOC=default runs it with glibc's defaults.
torch_env=(MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647 MALLOC_ARENA_MAX=1
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1)
case ${TORCH_MALLOC:-tuned} in
    tuned) ;;
    default) torch_env=() ;;
    *) echo "TORCH_MALLOC must be tuned or default, not '$TORCH_MALLOC'" >&2; exit 2 ;;
esac
# PyTorch's MKL runs its AVX2 code on x86 CPUs that are not Intel's, AVX-512 or not: on a
# Zen 5 EPYC its 2048^3 product ran at 218 GFLOP/s, and at 490 when a preloaded shim answered
# MKL's vendor check (mkl_serv_intel_cpu_true) as an Intel CPU does, past the gemm crate's
# 460. Measured against the stock wheel there, distil looked twice as fast as it is, so on
# such CPUs (TORCH_MKL=auto) PyTorch runs with the shim, its fastest fp32 configuration
# there; TORCH_MKL=stock leaves MKL as it is, TORCH_MKL=intel-path forces the shim.
if [[ $torch_mkl == intel-path ]]; then
    shim=$PWD/target/bench-compare/mkl-intel-path.so
    mkdir -p "$(dirname "$shim")"
    if ! printf 'int mkl_serv_intel_cpu_true(void) { return 1; }\n' |
        cc -shared -fPIC -O2 -x c - -o "$shim"; then
        echo "TORCH_MKL=$torch_mkl needs a C compiler (cc) to build $shim; or set TORCH_MKL=stock" >&2
        exit 2
    fi
    torch_env+=("LD_PRELOAD=$shim${LD_PRELOAD:+:$LD_PRELOAD}")
fi
run_torch() { timed pytorch env "${torch_env[@]}" "$PYTHON" benches/torch_step.py "${common[@]}" --peak "${extra[@]}"; }
lockstep=${LOCKSTEP:-0}
if [[ $lockstep == 1 ]]; then
    if [[ $shape == base ]]; then def_pairs=12; else def_pairs=30; fi
    pairs=${PAIRS:-$def_pairs}
    burst=${BURST:-3}
    [[ $pairs =~ ^[1-9][0-9]*$ ]] || { echo "PAIRS must be a positive integer, not '$pairs'" >&2; exit 2; }
    [[ $burst =~ ^[1-9][0-9]*$ && $burst -ge 2 ]] || { echo "BURST must be an integer of 2 or more, not '$burst'" >&2; exit 2; }
    # Each side times up to `pairs` bursts of steps after its warm-up, when told (--lockstep).
    lock_common=("${common[@]}")
    for i in "${!lock_common[@]}"; do
        if [[ ${lock_common[$i]} == --iters ]]; then lock_common[i + 1]=$((pairs * burst)); fi
    done
    echo "lockstep: $pairs pairs, $shape $mode, $threads threads" >&2
    b=$(cpu_busy) o=$(own_cpu) t=$(date +%s.%N)
    "$PYTHON" benches/lockstep.py "$out" "$pairs" "$burst" 0.3 -- \
        "$exe" "${lock_common[@]}" --lockstep "${extra[@]}" --vs-- \
        env "${torch_env[@]}" "$PYTHON" benches/torch_step.py "${lock_common[@]}" --peak --lockstep "${extra[@]}" \
        >"$out/lockstep.txt" # its summary line, printed with the table below (each pair goes to stderr)
    for f in distil pytorch; do others_since "$b" "$o" "$t" >"$out/$f.others"; echo >>"$out/$f.others"; done
else
    for ((r = 1; r <= rounds; r++)); do
        echo "round $r/$rounds: $shape $mode, $threads threads" >&2
        if ((r % 2)); then run_ours; run_torch; else run_torch; run_ours; fi
    done
fi
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
others=$(others_since "$busy0" "$own0" "$t0")

echo "PyTorch malloc settings: ${torch_env[*]:-glibc defaults}"
echo "PyTorch's MKL: $torch_mkl$([[ $torch_mkl == intel-path ]] && echo " (its Intel AVX-512 code path, through the shim above)")"
"$PYTHON" - "$out" "$load_before" "$load_after" "$others" <<'EOF'
import json, os, statistics, sys

out, load_before, load_after, others = sys.argv[1:5]
others = float(others)
runs = {f: [json.loads(l) for l in open(f"{out}/{f}.jsonl") if l.strip()] for f in ("distil", "pytorch")}
disturbed = {f: [float(l) > 0.25 for l in open(f"{out}/{f}.others") if l.strip()] for f in runs}
med = lambda rs, k: statistics.median(r[k] for r in rs if k in r) if any(k in r for r in rs) else None
d, p = runs["distil"], runs["pytorch"]
first = d[0]
peaks = {f: med(rs, "peak_gflops") for f, rs in runs.items()}
machine_peak = max(v for v in peaks.values() if v)

what = f"{first['shape']} {first['mode']}, batch {first['batch']} x seq {first['seq']}, {first['threads']} threads"
distill = first["mode"] == "distill"
if first["mode"] != "forward":
    opt = "AdamW on both sides" if first.get("optimizer") else "no optimiser step on either side"
    if distill:
        what += (f": {first['teacher_layers']}-layer teacher (eval, no grad) -> {first['student_layers']}-layer "
                 f"student, loss {first['loss']} (T {first['temperature']:g})")
    what += f", dropout {first['dropout']}, MLM head on {first['head_on']} rows, {opt}"
print(f"\n{what}")
lockstep = os.path.exists(f"{out}/lockstep.json")
how = (f"one run of each side, stepped in turn ({len(json.load(open(f'{out}/lockstep.json'))['pairs'])} pairs) "
       f"after {first['warmup']} warm-up steps" if lockstep else
       f"{len(d)} rounds alternating, {first['iters']} timed steps + {first['warmup']} warm-up per run")
print(f"{how}; load average {load_before} before, {load_after} after; other processes used {others:.2f} "
      f"CPUs on average meanwhile")
print()
hdr = f"{'':8} {'tokens/s':>9}  {'per round':<30} {'step s':>7} {'GFLOP/s':>8} {'% peak':>7} {'peak RSS MB':>12}"
print(hdr)
print("-" * len(hdr))
for name, rs in runs.items():
    tps = med(rs, "tokens_per_s")
    per = " / ".join(f"{r['tokens_per_s']:.0f}" + ("*" if busy else "") for r, busy in zip(rs, disturbed[name]))
    gf = med(rs, "gflops")
    print(f"{name:8} {tps:9.1f}  {per:<30} {med(rs, 'median_s'):7.3f} {gf:8.1f} "
          f"{100 * gf / machine_peak:6.1f}% {med(rs, 'peak_rss_mb'):12.1f}")
ratio = med(d, "tokens_per_s") / med(p, "tokens_per_s")
pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(d, p)]
rss = med(d, "peak_rss_mb") / med(p, "peak_rss_mb")
if any(any(v) for v in disturbed.values()):
    print("* other processes used more than 0.25 CPU on average during that run")
# Both sides ask glibc's malloc for transparent huge pages; the kernel grants them only where it
# finds free 2 MB blocks (BERT-base distillation on 4 KB pages, session 21: teacher phase 8-16 ms and
# backward ~6 ms slower a step).
hp = {f: [r.get("huge_pages_mb") for r in rs] for f, rs in runs.items()}
huge = {f: statistics.median(v) if v and None not in v else None for f, v in hp.items()}
if all(v is not None for v in huge.values()):
    print("in transparent huge pages at the end (MB, median over runs): "
          + ", ".join(f"{f} {huge[f]:.0f} of {med(rs, 'peak_rss_mb'):.0f}" for f, rs in runs.items()))
if lockstep:
    print(f"\ndistil / pytorch tokens/s: {ratio:.2f}x (the median steps); peak RSS {rss:.2f}x")
    print(open(f"{out}/lockstep.txt").read().strip())
else:
    print(f"\ndistil / pytorch tokens/s: {ratio:.2f}x (per round {min(pairs):.2f}-{max(pairs):.2f}); "
          f"peak RSS {rss:.2f}x")
quiet = [q for q, x, y in zip(pairs, disturbed["distil"], disturbed["pytorch"]) if not (x or y)]
if quiet and len(quiet) < len(pairs):
    print(f"rounds where neither run was disturbed ({len(quiet)} of {len(pairs)}): "
          f"distil / pytorch {statistics.median(quiet):.2f}x")
print(f"fp32 matmul peak ({first.get('peak_size', 2048)}^3, best of a few, median over rounds): "
      f"candle {peaks['distil']:.1f} GFLOP/s, torch {peaks['pytorch']:.1f} GFLOP/s; "
      f"% peak is against the higher, {machine_peak:.1f} GFLOP/s")
if distill:
    print(f"matmul work per step: {first['matmul_flops'] / 1e9:.1f} GFLOP (2mnk per matmul: teacher forward "
          f"{first['teacher_matmul_flops'] / 1e9:.1f} + student forward x3 with backward; the optimiser not counted)")
    parts = [("teacher", "teacher_s"), ("student fwd", "encoder_s"), ("head+losses", "head_s"),
             ("backward", "backward_s"), ("optimiser", "optim_s")]
else:
    print(f"matmul work per step: {first['matmul_flops'] / 1e9:.1f} GFLOP (2mnk per matmul, x3 with backward; "
          "the optimiser not counted)")
    parts = [("encoder", "encoder_s"), ("head+loss", "head_s"), ("backward", "backward_s"), ("optimiser", "optim_s")]
cells = [(label, med(d, k), med(p, k)) for label, k in parts if med(d, k) is not None or med(p, k) is not None]
fmt = lambda x: "-" if x is None else f"{x:.3f}"
print("median seconds per part:  " + "   ".join(f"{label} {fmt(a)} vs {fmt(b)}" for label, a, b in cells)
      + "   (distil vs pytorch)")
if distill and med(d, "forward_s") is not None:
    # distil runs the teacher beside the previous step's update and the student's forward (as
    # its trainer does), so its three parts overlap; PyTorch runs them one after the other.
    seq = [med(p, k) for k in ("teacher_s", "encoder_s", "optim_s")]
    torch_fwd = sum(x for x in seq if x is not None)
    print(f"teacher + student forward + optimiser, as one phase: {med(d, 'forward_s'):.3f} vs {torch_fwd:.3f} "
          "(distil runs the teacher beside the update and the student, each part above timed as it ran)")
elif first["mode"] == "train" and first.get("optimizer"):
    # distil runs the previous step's update beside the forward, block by block (as its
    # trainer does): its encoder part holds both, its optimiser part is 0.
    print(f"encoder + optimiser, as one phase: {med(d, 'encoder_s'):.3f} vs "
          f"{med(p, 'encoder_s') + med(p, 'optim_s'):.3f} (distil updates beside its forward)")
print(f"JSON lines: {out}/distil.jsonl, {out}/pytorch.jsonl")
if others > 0.25:
    print(f"WARNING: other processes kept {others:.2f} CPUs busy during the runs: the figures are skewed "
          "(an oversubscribed OpenMP runtime, PyTorch's, slows down far more than rayon does); "
          "rerun on a quiet machine before quoting a ratio")
EOF
