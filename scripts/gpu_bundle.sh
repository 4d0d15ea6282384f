#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything a GPU session runs, into .gpu/ (git-ignored,
# carried to the device machine): release builds with --features cuda of the CUDA test binaries
# (`tests`: tests/cuda_ops.rs and tests/plan.rs), the CUDA kernel bench (`bench`), the 7B training-step bench (`train`, with the slim
# bitsandbytes wheel scripts/bench_train_ref.py needs), the qlora binary (`qlora`) and the 7B
# load-time tools (`load`: examples make_random_llama and load_time), stripped and
# xz-compressed, plus scripts/gpu_run.sh's expectations. Default: all five. The device tool
# carries at most 64 MiB (binaries, wheel and the tracked repo together): the last line says
# how much this makes.
#
#   bash scripts/gpu_bundle.sh [tests] [bench] [train] [qlora] [load]   # here
#   (device tool) carry [".gpu"], command: bash scripts/gpu_run.sh SECTION...
#
# What each gpu_run.sh section needs: check, train, e2e → qlora; tests, sanitize → tests;
# bench → bench; trainbench → train; decode → bench and train (the bitsandbytes wheel); load → load.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CUDA_HOME:-$HOME/.cache/qlora/cuda-13.0/nvidia/cu13}/bin:$PATH"
parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(tests bench train qlora load)
has() { [[ " ${parts[*]} " == *" $1 "* ]]; }
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
if has tests; then
  msgs=$(cargo test --release --features cuda --test cuda_ops --no-run --message-format=json 2>/dev/null)
  cp "$(pick cuda_ops <<<"$msgs")" .gpu/cuda_ops
  # The memory plan against the device meter (tests/plan.rs plan_matches_the_cuda_meter).
  msgs=$(cargo test --release --features cuda --test plan --no-run --message-format=json 2>/dev/null)
  cp "$(pick plan <<<"$msgs")" .gpu/plan
fi
if has bench; then
  msgs=$(cargo bench --features cuda --bench cuda --no-run --message-format=json 2>/dev/null)
  cp "$(pick cuda <<<"$msgs")" .gpu/bench_cuda
fi
if has train; then
  msgs=$(cargo bench --features cuda --bench train --no-run --message-format=json 2>/dev/null)
  cp "$(pick train <<<"$msgs")" .gpu/bench_train
  # bitsandbytes for the reference (scripts/bench_train_ref.py): the PyPI wheel cut down to its
  # CUDA 13.0 library (~4 MB instead of 43), made once into the git-ignored .whl/.
  if ! ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
    slim=../shared/scripts/slim_bnb_wheel.sh
    [[ -e $slim ]] || { echo "no .whl/bitsandbytes-*.whl and no $slim to make one" >&2; exit 1; }
    grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null ||
      echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
    bash "$slim" .whl
  fi
  cp .whl/bitsandbytes-*.whl .gpu/
fi
if has qlora; then
  cargo build --release --features cuda --bin qlora 2>/dev/null
  cp "${CARGO_TARGET_DIR:-target}/release/qlora" .gpu/qlora
fi
if has load; then
  cargo build --release --features cuda --example make_random_llama --example load_time 2>/dev/null
  for e in make_random_llama load_time; do cp "${CARGO_TARGET_DIR:-target}/release/examples/$e" .gpu/$e; done
fi
strip .gpu/cuda_ops .gpu/plan .gpu/bench_cuda .gpu/bench_train .gpu/qlora .gpu/make_random_llama .gpu/load_time 2>/dev/null || true
# xz: 58 MiB of stripped binaries become ~11 (the four together with the tracked repo would
# pass the 64 MiB carry limit otherwise); gpu_run.sh unpacks them first thing.
for b in cuda_ops plan bench_cuda bench_train qlora make_random_llama load_time; do
  [[ -e .gpu/$b ]] && xz -6 -T0 .gpu/$b
done
git rev-parse --short HEAD > .gpu/commit
pwd > .gpu/manifest_dir  # the binaries find tests/fixtures through this compile-time path
ls -la .gpu
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
bundle=$(du -cb .gpu/* | tail -n 1 | cut -f1)
echo "carry: .gpu $((bundle >> 20)) MiB + tracked files $((tracked >> 20)) MiB = $(((bundle + tracked) >> 20)) MiB (device limit 64 MiB, untracked files not counted)"
