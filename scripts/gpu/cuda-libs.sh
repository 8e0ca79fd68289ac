# Sourced by the GPU scripts: puts the CUDA 13 runtime libraries of a PyTorch install's wheels
# (nvidia/cu13/lib, nvidia/nccl/lib, ...) and the driver's libcuda (where NVIDIA's container
# images keep it outside the loader's path) on LD_LIBRARY_PATH. PY: the interpreter with torch.
NVROOTS=$("${PY:-python3}" -c 'import importlib.util as u; s = u.find_spec("nvidia"); print(" ".join(s.submodule_search_locations) if s else "")') || NVROOTS=""
for root in $NVROOTS; do
  for d in "$root"/*/lib; do
    if [ -d "$d" ]; then LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
  done
done
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  if [ -d "$d" ]; then LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d; fi
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
[ -n "$NVROOTS" ] || echo "warning: ${PY:-python3} has no nvidia wheels (pip's torch); relying on the system's CUDA libraries" >&2

# The CUDA build of distil to run: DISTIL_BIN when set; else target-cuda/real/distil-gpu (built
# here by build-cuda.sh), else /tmp/distil-gpu, unpacked from .gpubin/distil-gpu.gz (what
# pack-for-device.sh packs for a GPU machine) when it is not there yet. Prints the path.
distil_bin() {
  if [ -n "${DISTIL_BIN:-}" ]; then echo "$DISTIL_BIN"; return; fi
  if [ -x target-cuda/real/distil-gpu ]; then echo target-cuda/real/distil-gpu; return; fi
  if [ ! -x /tmp/distil-gpu ] && [ -f .gpubin/distil-gpu.gz ]; then
    gunzip -c .gpubin/distil-gpu.gz > /tmp/distil-gpu && chmod +x /tmp/distil-gpu
  fi
  echo /tmp/distil-gpu
}
