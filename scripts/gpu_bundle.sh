#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything a GPU session runs, into .gpu/ (git-ignored,
# carried to the device machine): the CUDA test binary, the CUDA bench binary and the qlora
# binary, release builds with --features cuda, plus scripts/gpu_run.sh's expectations.
#
#   bash scripts/gpu_bundle.sh            # here
#   (device tool) carry [".gpu"], command: bash scripts/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CUDA_HOME:-$HOME/.cache/qlora/cuda-13.0/nvidia/cu13}/bin:$PATH"
rm -rf .gpu && mkdir -p .gpu
pick() { # cargo JSON messages on stdin -> the executable of target $1
  python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])' "$1" | tail -n 1
}
msgs=$(cargo test --release --features cuda --test cuda_ops --no-run --message-format=json 2>/dev/null)
cp "$(pick cuda_ops <<<"$msgs")" .gpu/cuda_ops
msgs=$(cargo bench --features cuda --bench cuda --no-run --message-format=json 2>/dev/null)
cp "$(pick cuda <<<"$msgs")" .gpu/bench_cuda
cargo build --release --features cuda --bin qlora 2>/dev/null
cp "${CARGO_TARGET_DIR:-target}/release/qlora" .gpu/qlora
strip .gpu/* 2>/dev/null || true
git rev-parse --short HEAD > .gpu/commit
pwd > .gpu/manifest_dir  # the binaries find tests/fixtures through this compile-time path
ls -la .gpu
du -sh .gpu
