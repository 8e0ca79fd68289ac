#!/usr/bin/env bash
# Builds the release `distil` with the real CUDA 13.0 toolchain, for a GPU machine.
#
#   scripts/gpu/build-cuda.sh           # --features cuda  -> target-cuda/real/release/distil
#   scripts/gpu/build-cuda.sh --nccl    # --features nccl  (cuda + multi-GPU data parallel)
#
# The toolchain (nvcc, cudart, cuBLAS, cuRAND, NVRTC; cuDNN and NCCL with --nccl) comes from
# PyPI wheels through ../shared/tools/cuda/setup-cuda13.sh: about 20 minutes the first time,
# then cached in $CUDA13_PREFIX (default ~/.cache/cuda13-pip). No GPU is needed to build.
# CUDA_COMPUTE_CAP picks the kernels' architecture (default 90: H100 / H200). The build has
# its own target directory (CARGO_TARGET_DIR, default target-cuda/real), apart from the
# stand-in-nvcc `cargo check` of CI, whose empty PTX must never reach a binary.
#
# Besides the binary it writes a copy without debug info, target-cuda/real/distil-gpu, to
# copy to the GPU machine; scripts/gpu/run-gpu-checks.sh runs it there.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${DISTIL_SHARED:-$(cd .. && pwd)/shared}
features=cuda
for a in "$@"; do
  case "$a" in
    --nccl) features=nccl ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "build-cuda.sh: unknown argument $a (see --help)" >&2; exit 2 ;;
  esac
done
setup=$SHARED/tools/cuda/setup-cuda13.sh
if [ ! -f "$setup" ]; then
  echo "build-cuda.sh: $setup not found (set DISTIL_SHARED to the shared folder)" >&2
  exit 1
fi
if command -v nvcc >/dev/null && nvcc --version | grep -q "Build fake"; then
  echo "build-cuda.sh: the nvcc on PATH is the stand-in from shared/tools/cuda; take it off PATH" >&2
  exit 1
fi

# setup-cuda13.sh reads cudarc's sources in the cargo registry (for its libcuda link stub).
cargo fetch --locked
if [ "$features" = nccl ]; then export WITH_CUDNN_NCCL=1; fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# shellcheck disable=SC1090
source "$setup" "${CUDA13_PREFIX:-$HOME/.cache/cuda13-pip}"
set -euo pipefail # the setup script turns these off when it is done
nvcc --version | tail -2

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda/real}
cargo build --release --locked --features "$features" --bin distil
bin=$CARGO_TARGET_DIR/release/distil
out=$CARGO_TARGET_DIR/distil-gpu
objcopy --strip-debug "$bin" "$out"
echo "built $bin (features: $features, sm_$CUDA_COMPUTE_CAP)"
echo "copy to the GPU machine: $out ($(du -h "$out" | cut -f1))"
echo "CUDA libraries it loads (on the GPU machine from a PyTorch install's nvidia/*/lib):"
ldd "$out" | grep -E "cuda|cublas|curand|nvrtc|nccl|cudnn" || echo "  (none linked: loaded at run time)"
