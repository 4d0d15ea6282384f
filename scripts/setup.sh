#!/usr/bin/env bash
# One-time set-up of a fresh Debian machine for building qlora with CUDA kernels (no GPU needed to
# build). Idempotent and cached: re-running is a no-op.
#  - Debian packages a build needs (C compiler for -sys crates, pkg-config).
#  - nvcc from NVIDIA's PyPI wheels, pinned to CUDA 13.0 (the GPU machines run driver 580 = CUDA
#    13.0; newer PTX would not load there), installed under ~/.cache/qlora/cuda-13.0, where
#    build.rs finds it without any environment variable.
#  - On a machine with an NVIDIA GPU (nvidia-smi lists one), or with QLORA_INSTALL_CUBLAS=1: cuBLAS
#    for CUDA 13.0 (NVIDIA's nvidia-cublas wheel, ~420 MB) into ~/.cache/qlora/cublas-13.0, where
#    the qlora binary looks for it at run time (src/backend/cuda/libs.rs). The GPU driver itself (libcuda)
#    comes with the machine's NVIDIA driver (580 or newer for CUDA 13.0).
set -euo pipefail
CUDA_DIR="${QLORA_CUDA_DIR:-$HOME/.cache/qlora/cuda-13.0}"
# A folder of its own: `pip install --target` skips a top-level package folder (nvidia/) that exists.
CUBLAS_DIR="$HOME/.cache/qlora/cublas-13.0"

need=()
command -v cc >/dev/null || need+=(gcc g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v python3 >/dev/null || need+=(python3 python3-pip)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}"; else sudo apt-get update -qq && sudo apt-get install -y -qq "${need[@]}"; fi
fi
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup.rs" >&2; exit 1; }

if [ ! -x "$CUDA_DIR/nvidia/cu13/bin/nvcc" ]; then
  echo "setup: installing nvcc 13.0 into $CUDA_DIR (about 130 MB)"
  python3 -m pip install -q --disable-pip-version-check --target "$CUDA_DIR" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
fi
has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }
if [ ! -e "$CUBLAS_DIR/nvidia/cu13/lib/libcublas.so.13" ] && { [ "${QLORA_INSTALL_CUBLAS:-0}" = 1 ] || has_gpu; }; then
  echo "setup: installing cuBLAS 13.0 for the GPU into $CUBLAS_DIR (about 420 MB)"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$CUBLAS_DIR" nvidia-cublas==13.0.0.19
fi
# The wheels keep cicc and libdevice under nvvm/ beside bin/; nvcc finds them relative to itself.
"$CUDA_DIR/nvidia/cu13/bin/nvcc" --version | tail -n 2
