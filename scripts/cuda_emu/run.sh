#!/usr/bin/env bash
# Runs the real CUDA kernels (kernels/*.cu) on the CPU under the host emulator (shim.h, mma.cuh
# here) against f64 references, one line per checked quantity; exits non-zero if any row fails,
# any kernel trips an emulator check (deadlock, collective mismatch, misaligned or non-shared
# ldmatrix address, shared memory over the limit, ...) or AddressSanitizer / UBSan reports an
# out-of-bounds access, a misaligned vector access or an overflow. Needs only bash, sed and
# g++ >= 12 with its libasan/libubsan (Debian's g++-12 has them); no nvcc, no GPU. About 60 s on
# two cores (most of it building, then the flash-attention cases). The emulator itself is described in shim.h,
# the tensor-core instructions in mma.cuh, the cases in the drivers (*_emu.cpp).
#
#   bash scripts/cuda_emu/run.sh [family ...]    families: flash_attention nf4_gemm_dx nf4_gemm misc adamw8
#                                                 nf4_quantize sample decode_attention lora_decode
#                                                 dense_nf4 elementwise
#
# Environment: CXX (default g++); EMU_ASAN=0 builds without AddressSanitizer and UBSan (faster,
# checks less); EMU_CXXFLAGS adds compiler flags (e.g. -DEMU_UCONTEXT); EMU_SEED (scheduling and
# block order, default 1); EMU_SCHED=order (threads resumed in index order instead of
# randomly); EMU_KEEP=1 keeps the build folder; EMU_KERNELS=dir takes the kernel sources from
# another folder (mutants.sh uses it for deliberately broken copies).
#
# The build folder gets copies of the kernel sources with kernels/mma.cuh replaced by the
# emulated one and three mechanical rewrites (checked: none of the original forms may remain):
#   extern __shared__ [__align__(n)] T x[];  →  T* x = (T*)emu::dyn_smem();
#   __shared__ ... T x[...];                 →  static ... T x[...]; emu::shared_var(&x, sizeof(x));
#   asm("op.a.b %0, ..." : "=f"(r) : "f"(a), ...);  →  r = emu::ptx_op_a_b(a, ...);
#   asm("{ .reg .pred p; setp.gt.f32 p, %1, %2; selp.u32 %0, 1, 0, p; }" ...)  →  r = emu::ptx_setp_gt_f32(a, b);
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
kernels=${EMU_KERNELS:-$root/kernels}
CXX=${CXX:-g++}
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(flash_attention nf4_gemm_dx nf4_gemm misc adamw8 nf4_quantize sample decode_attention lora_decode dense_nf4 elementwise)

build=$(mktemp -d "${TMPDIR:-/tmp}/cuda_emu.XXXXXX")
if [ "${EMU_KEEP:-0}" = 1 ]; then echo "build folder: $build"; else trap 'rm -rf "$build"' EXIT; fi
src=$build/src
mkdir -p "$src" "$build/include"
cp "$kernels"/*.cu "$kernels"/*.cuh "$src/"
cp "$here/mma.cuh" "$src/mma.cuh"
for h in cuda_bf16.h cuda_fp16.h cuda_runtime.h; do echo "#pragma once" >"$build/include/$h"; done
sed -E -i \
  -e 's/extern __shared__ (__align__\([0-9]+\) )?([A-Za-z_][A-Za-z0-9_ ]*[A-Za-z0-9_]) +([A-Za-z_][A-Za-z0-9_]*)\[\];/\2* \3 = (\2*)emu::dyn_smem();/' \
  -e 's/^([[:space:]]*)__shared__ (.*[^A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]*)((\[[^]]*\])*);/\1static \2\3\4; emu::shared_var(\&\3, sizeof(\3));/' \
  -e 's/asm(volatile)? *\("\{ \.reg \.pred p; (setp\.[a-z]+\.f32) p, %1, %2; selp\.u32 %0, 1, 0, p; \}" *: *"=r"\(([A-Za-z_0-9]+)\) *: *(.*)\);/\3 = emu::ptx_\2(\4);/' \
  -e 's/asm(volatile)? *\("([a-z0-9.]+) [^"]*" *: *"=[a-z]"\(([A-Za-z_0-9]+)\) *: *(.*)\);/\3 = emu::ptx_\2(\4);/' \
  -e ':dot' -e 's/(emu::ptx_[a-z0-9_]*)\./\1_/' -e 't dot' \
  -e '/emu::ptx_/s/"[a-z]"\(([^()]*)\)/\1/g' \
  "$src"/*.cu "$src"/*.cuh
if grep -nE '\b__shared__\b|\basm\b' "$src"/*.cu "$src"/*.cuh; then
  echo "cuda_emu: the lines above were not rewritten (see run.sh's header)" >&2
  exit 2
fi

flags=(-std=c++20 -O2 -pthread -ffp-contract=off -fno-strict-aliasing -Wno-unknown-pragmas
  -include "$here/shim.h" -I "$src" -I "$build/include" -I "$here")
if [ "${EMU_ASAN:-1}" != 0 ]; then
  flags+=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
fi
# shellcheck disable=SC2206
flags+=(${EMU_CXXFLAGS:-})

echo "== building ${families[*]} ($("$CXX" -dumpfullversion 2>/dev/null || echo "$CXX"))"
t0=$SECONDS
pids=()
for f in "${families[@]}"; do
  [ -f "$here/${f}_emu.cpp" ] || { echo "cuda_emu: no driver $f" >&2; exit 2; }
  "$CXX" "${flags[@]}" "$here/${f}_emu.cpp" -o "$build/$f" 2>"$build/$f.log" &
  pids+=($!)
  # At most two compilers at once.
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || { cat "$build"/*.log >&2; exit 2; }; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || { cat "$build"/*.log >&2; exit 2; }; done
echo "built in $((SECONDS - t0)) s"

failed=()
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
for f in "${families[@]}"; do
  echo "== $f"
  # ASan's one-time notice about swapcontext is expected (the switches are annotated).
  if ! "$build/$f" 2> >(grep -v "doesn't fully support makecontext/swapcontext" >&2); then
    failed+=("$f")
  fi
done
wait
echo "== cuda_emu: ${#families[@]} families in $((SECONDS - t0)) s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
