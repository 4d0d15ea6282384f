#!/usr/bin/env bash
# Checks that the emulator harness catches bugs: applies one deliberate bug ("mutant") at a time
# to a copy of kernels/, runs the affected family through run.sh, and expects it to fail.
# Prints "caught" (with the first failing row or emulator error) or "MISSED" per mutant; exits
# non-zero if any mutant was missed or no longer applies. Not part of CI (a few minutes).
#
#   bash scripts/cuda_emu/mutants.sh [name-filter]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
filter=${1:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/cuda_emu_mutants.XXXXXX")
trap 'rm -rf "$work"' EXIT

# name | file | sed expression (basic regex; must change the file) | family | what it breaks
mutants=(
  "fa-no-sync|flash_attention.cu|/everyone is done with the previous tile/d|flash_attention|missing barrier before a K/V tile is overwritten"
  "fa-ldsm-order|flash_attention.cuh|s/((lane >> 3) & 1) \* 8) \* ld + n0 + (lane >> 4) \* 8/((lane >> 4) \& 1) * 8) * ld + n0 + ((lane >> 3) \& 1) * 8/|flash_attention|ldmatrix.trans matrices in the wrong order"
  "fa-ldsm-misaligned|flash_attention.cuh|s/+ n0 + (lane >> 4) \* 8);/+ n0 + (lane >> 4) * 4);/|flash_attention|ldmatrix row addresses not 16-byte aligned"
  "fa-bwd-no-sync|flash_attention.cu|/__float2bfloat16_rn(dpt\[n\]\[e\]);/{n;/__syncthreads/d}|flash_attention|backward reads dS before all warps wrote it"
  "fa-tile-guard|flash_attention.cuh|s/r < valid ? __ldg/true ? __ldg/|flash_attention|tile loader reads rows past T"
  "fa-causal|flash_attention.cu|s/key > row\[e >> 1\]/key >= row[e >> 1]/|flash_attention|causal mask hides the diagonal"
  "fa-varlen-end|flash_attention.cu|s/T = cu_seqlens\[seq + 1\] - row0;/T = cu_seqlens[seq + 1] - row0 + 16;/|flash_attention|backward key tile sees the next sequence's queries"
  "fa-varlen-search|flash_attention.cuh|s/if (cu_seqlens\[mid\] <= r)/if (cu_seqlens[mid] < r)/|flash_attention|a sequence's first row counted in the previous sequence"
  "fa-dq-store|flash_attention.cu|s/atomicAdd(dst, c \* acc\[j\]\[2 \* i\]);/dst[0] = c * acc[j][2 * i];/|flash_attention|dq stored instead of accumulated"
  "dx-nibbles|nf4_gemm_dx.cu|s/pack_bf16x2(__fmul_rn(lut\[byte >> 4\], sc\[i\]), __fmul_rn(lut\[byte & 0xfu\], sc\[i\]))/pack_bf16x2(__fmul_rn(lut[byte \& 0xfu], sc[i]), __fmul_rn(lut[byte >> 4], sc[i]))/|nf4_gemm_dx|NF4 nibble order swapped"
  "dx-no-sync|nf4_gemm_dx.cu|/lut and code are visible before the first decode/d|nf4_gemm_dx|decode before the table is in shared memory"
  "dx-k-bound|nf4_gemm_dx.cu|s/\* 16 < K ? 1u : 0u/* 16 <= K ? 1u : 0u/|nf4_gemm_dx|W runs past K are loaded"
  "dx-misaligned|nf4_gemm_dx.cu|s/\&As\[buf\]\[ar0 + i \* (THREADS \/ 8)\]\[ac\])/\&As[buf][ar0 + i * (THREADS \/ 8)][ac + 1])/|nf4_gemm_dx|8-byte shared store at a 2-byte offset"
  "gemm-edge|nf4_gemm.cu|s/if (c + 1 < N) dst\[1\]/if (c < N) dst[1]/|nf4_gemm|stores one column past N"
  "gemm-nested|nf4_gemm.cu|s/nested_absmax\[b \/ nested_blocksize\]/nested_absmax[b \/ 256]/|nf4_gemm|nested block size ignored"
  "gemm-frag|nf4_gemm.cu|s/af\[i\]\[1\] = \*reinterpret_cast<const uint32_t\*>(&As\[buf\]\[r + 8\]\[kk + 2 \* t\]);/af[i][1] = *reinterpret_cast<const uint32_t*>(\&As[buf][r][kk + 2 * t + 8]);/|nf4_gemm|A fragment register 1 from the wrong rows"
  "xent-no-sync|cross_entropy.cu|/also publishes zt_shared/d|misc|per-warp partials read before written"
  "rms-shfl|rmsnorm.cu|0,/for (int s = 16; s > 0; s >>= 1) ss +=/s//for (int s = 8; s > 0; s >>= 1) ss +=/|misc|warp reduction skips a level"
  "rms-diverge|rmsnorm.cu|s/if (threadIdx.x < 32) {/if (threadIdx.x < 16) {/|misc|warp shuffle in divergent code"
  "adamw-fma|adamw.cu|s/lerp_lo ? f_fma(w1, d, mi)/lerp_lo ? f_add(f_mul(w1, d), mi)/|misc|m not computed with one rounding"
  "quant-pad|nf4_quantize.cu|s/nf4_encode(nf4_scaled(v.y, is_full, r, c), mid) : 7u;/nf4_encode(nf4_scaled(v.y, is_full, r, c), mid) : 0u;/|nf4_quantize|odd count's padding nibble not 7"
  "lora-bf16-pairs|nf4.cu|s/v\[2 \* i\] = __uint_as_float(w\[i\] << 16);  \/\/ element 2i/v[2 * i] = __uint_as_float(w[i] \& 0xffff0000u);  \/\/ element 2i/|lora_decode|bf16 A's even elements read from the odd ones' half"
  "lora-bf16-widen|nf4.cu|s/return __uint_as_float((uint32_t)v << 16);/return __uint_as_float((uint32_t)v << 15);/|lora_decode|bf16 B widened with the wrong shift"
  "lora-xa-tail|nf4.cu|s/for (int q = 0; q < N \/ 4; q++) {/for (int q = 0; q < 1; q++) {/|lora_decode|bf16 x·Aᵀ skips the second half of each 8-element chunk"
  "quant-absmax|nf4_quantize.cu|s/for (int m = 16; m > 0; m >>= 1) am = fmaxf/for (int m = 8; m > 0; m >>= 1) am = fmaxf/|nf4_quantize|block absmax over half a warp"
  "adam8-signfix|adamw8.cu|s/c = f_gt(m, 0.0f) ? c + 1 : c - 1;/c = c;/|adamw8|bnb's sign fix of the m code dropped"
  "adam8-absmax-shfl|adamw8.cu|s/for (int o = 16; o > 0; o >>= 1) {/for (int o = 8; o > 0; o >>= 1) {/|adamw8|block absmax over half a warp"
  "sample-tie|sample.cu|s/(u64)(0xffffffffu - (uint32_t)i)/(u64)(uint32_t)i/|sample|ties go to the higher index"
  "sample-neg-zero|sample.cu|/if ((b << 1) == 0u) b = 0u;/d|sample|-0 and +0 ordered as different values"
  "sample-no-sync|sample.cu|/the histogram is complete/d|sample|bins read before every thread added to them"
  "sample-above|sample.cu|s/u64 run = st->above + (incl - local);/u64 run = incl - local;/|sample|weight above the interval forgotten after the first level"
  "sample-range-bin|sample.cu|s/? SAMPLE_BINS - 1 - (int)d : 0;/? (int)d : 0;/|sample|value bins in reverse order"
  "sample-top-weight|sample.cu|/if (k32 == mkey) return (u64)SAMPLE_ONE;/d|sample|exp(inf - inf) for tied +inf maxima"
  "dec-devplan-want|decode_attention.cu|s/const int want = min(max((DEC_TARGET_CTAS + ctas - 1) \/ ctas, 1), tiles);/const int want = min(max(DEC_TARGET_CTAS \/ ctas, 1), tiles);/|decode_attention|device split plan differs from the host's"
  "dec-devplan-combine|decode_attention.cu|s/if (n_splits == 1) return;  \/\/ normalised/if (n_splits == 0) return;  \/\/ normalised/|decode_attention|combine overwrites a one-split result"
  "dec-kvwrite-pos|decode_attention.cu|s/if (pos_dev) off = (int64_t)\*pos_dev \* stride;/if (pos_dev) off = (int64_t)*pos_dev;/|decode_attention|cache write at the word's value, not its row"
  "sample-top-k|sample.cu|s/if (top_k > 0 \&\& top_k < vocab) {/if (top_k > 1 \&\& top_k < vocab) {/|sample|k = 1 ignored"
  "dn-f16-pairs|dense_half.cu|s/v\[2 \* i\] = f.x;/v[2 * i] = f.y;/|dense_nf4|f16 weight pairs widened in swapped order"
  "dn-row-guard|dense_half.cu|s/o < n ? __ldg/true ? __ldg/|dense_nf4|16-bit GEMV loads weight rows past n"
  "dn-dequant-tail|nf4.cu|s/GRID_STRIDE(t, n % 8) {/GRID_STRIDE(t, n % 8 \/ 2) {/|dense_nf4|dequantization leaves half the last run of 8 unwritten"
  "dn-gemv-acc|nf4.cu|s/\*dst = v + (accumulate ? \*dst : 0.0f);/*dst = v;/|dense_nf4|generic NF4 GEMV drops the fused residual add"
  "ew-grid-stride|common.cuh|s/i += (int64_t)gridDim.x \* blockDim.x/i += (int64_t)blockDim.x/|elementwise|grid-stride loop steps one block, not the grid (elements visited again)"
  "ew-rope-sign|rope.cu|s/const float s = (float)sd \* sign, c = (float)cd;/const float s = (float)sd, c = (float)cd;/|elementwise|RoPE ignores sign: the backward rotates forward"
  "ew-dropout-p0|dropout.cu|s/(uint32_t)(z >> 40) < threshold/(uint32_t)(z >> 40) <= threshold/|elementwise|mask drops k = threshold (p = 0 drops hash 0)"
  "ew-lora-fma|lora.cu|s/__fmaf_rn(keep\[i\], ga\[i\], dx\[i\])/__fadd_rn(__fmul_rn(keep[i], ga[i]), dx[i])/|elementwise|dx += keep·ga rounded twice instead of one fma"
)

missed=0
for m in "${mutants[@]}"; do
  IFS='|' read -r name file expr family what <<<"$m"
  [ -n "$filter" ] && [[ $name != *"$filter"* ]] && continue
  dir=$work/$name
  mkdir -p "$dir"
  cp "$root"/kernels/*.cu "$root"/kernels/*.cuh "$dir/"
  sed -i "$expr" "$dir/$file" 2>/dev/null || true
  if cmp -s "$root/kernels/$file" "$dir/$file"; then
    echo "$name: DOES NOT APPLY (kernel changed?)"
    missed=$((missed + 1))
    continue
  fi
  out=$(EMU_KERNELS=$dir bash "$here/run.sh" "$family" 2>&1)
  if [ $? -ne 0 ]; then
    why=$(grep -m1 -E "FAIL$|EMU ERROR|AddressSanitizer|error:" <<<"$out" | sed -E 's/ +/ /g')
    echo "$name ($what): caught: ${why:-non-zero exit}"
  else
    echo "$name ($what): MISSED"
    missed=$((missed + 1))
  fi
done
[ $missed -eq 0 ]
