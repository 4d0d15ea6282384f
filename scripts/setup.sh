#!/usr/bin/env bash
# One-time set-up of a fresh Debian machine for building qlora with CUDA kernels (no GPU needed to
# build). Idempotent and cached: re-running is a no-op.
#  - Debian packages a build needs (C compiler for -sys crates, pkg-config).
#  - nvcc from NVIDIA's PyPI wheels, pinned to CUDA 13.0 (the GPU machines run driver 580 = CUDA
#    13.0; newer PTX would not load there), installed under ~/.cache/qlora/cuda-13.0, where
#    build.rs finds it without any environment variable.
set -euo pipefail
CUDA_DIR="${QLORA_CUDA_DIR:-$HOME/.cache/qlora/cuda-13.0}"

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
# The wheels keep cicc and libdevice under nvvm/ beside bin/; nvcc finds them relative to itself.
"$CUDA_DIR/nvidia/cu13/bin/nvcc" --version | tail -n 2
