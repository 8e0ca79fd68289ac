#!/usr/bin/env bash
# Packs the CUDA binary for a GPU machine that receives only the working tree (at most 64 MiB):
#
#   scripts/gpu/build-cuda.sh && scripts/gpu/pack-for-device.sh
#
# writes .gpubin/distil-gpu.gz (stripped and gzipped: about 23 MB against 70 MB) and adds
# `/.gpubin/` to .git/info/exclude, so that git ignores it and it travels only when asked for
# (the device tool's `carry: [".gpubin"]`). On the GPU machine, from the tree's root:
#
#   scripts/gpu/pack-for-device.sh --run [run-gpu-checks.sh's arguments]
#
# unpacks it to /tmp/distil-gpu and runs scripts/gpu/run-gpu-checks.sh with it, logging under
# target-cuda/gpu-checks; when OUT is set (the device tool's folder of files to bring back, at
# most 8 files) it then copies summary.md there and the logs as gpu-checks.tgz (models left
# out), and exits with the checks' status.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--run" ]; then
  shift
  [ -f .gpubin/distil-gpu.gz ] || { echo "no .gpubin/distil-gpu.gz here: was .gpubin carried?" >&2; exit 1; }
  gunzip -c .gpubin/distil-gpu.gz > /tmp/distil-gpu
  chmod +x /tmp/distil-gpu
  back=${OUT:-}
  status=0
  DISTIL_BIN=/tmp/distil-gpu OUT=target-cuda/gpu-checks PYTHONUNBUFFERED=1 \
    scripts/gpu/run-gpu-checks.sh "$@" || status=$?
  if [ -n "$back" ]; then
    cp target-cuda/gpu-checks/summary.md "$back/" 2>/dev/null || true
    tar czf "$back/gpu-checks.tgz" --exclude='*.safetensors' -C target-cuda gpu-checks
  fi
  exit "$status"
fi
case "${1:-}" in
  -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  "") ;;
  *) echo "pack-for-device.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
bin=${CARGO_TARGET_DIR:-target-cuda/real}/distil-gpu
[ -f "$bin" ] || { echo "no $bin: build it with scripts/gpu/build-cuda.sh" >&2; exit 1; }
mkdir -p .gpubin
strip -o .gpubin/distil-gpu "$bin"
gzip -f -1 .gpubin/distil-gpu
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/.gpubin/" "$exclude" 2>/dev/null || echo "/.gpubin/" >> "$exclude"
echo "packed .gpubin/distil-gpu.gz ($(du -h .gpubin/distil-gpu.gz | cut -f1)); carry .gpubin to the GPU machine"
