#!/usr/bin/env bash
# The binary picks its SIMD kernels at run time (gemm's AVX-512 / AVX2 microkernels, the
# fused kernels' multiversioned loops): show that it runs, and still matches PyTorch, on CPUs
# without AVX-512 and without AVX at all, by running the encoder parity tests (forward and
# every gradient against transformers' fixtures, fused and composed paths) and the fused-kernel
# tests under QEMU's user-mode emulation of a Haswell (AVX2 + FMA, no AVX-512) and a Nehalem
# (SSE4.2 only).
#
#   scripts/check_cpu_dispatch.sh            # needs qemu-x86_64 (Debian: apt-get install qemu-user)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-x86_64 >/dev/null; then
    echo "qemu-x86_64 not found (apt-get install qemu-user); skipping the CPU dispatch check" >&2
    exit 0
fi
mapfile -t bins < <(cargo test --test parity --test fused --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])
')
[[ ${#bins[@]} -eq 2 ]] || { echo "expected the parity and fused test binaries, got: ${bins[*]}" >&2; exit 1; }
echo "host CPU flags: $(grep -o 'avx512f\|avx2\|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
for cpu in Haswell Nehalem; do
    for b in "${bins[@]}"; do
        echo "== $(basename "$b") on an emulated $cpu"
        qemu-x86_64 -cpu "$cpu" "$b" --test-threads 1 2>&1 | grep -v "TCG doesn't support" | grep -E '^test |test result'
        [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "FAILED on $cpu" >&2; exit 1; }
    done
done
echo "every check passed on both emulated CPUs"
