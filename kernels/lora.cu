// Elementwise steps of the LoRA adapter term and its backward; the products themselves run on
// cuBLAS in bf16 (launcher and the whole mixed-precision scheme: src/backend/cuda/lora.rs; CPU
// spec: src/backend/cpu/backward/lora.rs, bf16 emulation: src/check/lora.rs).
//
//   lora_keep_bf16:   out[i] = bf16(x[i] · keep[i])       x̃ = bf16(x ⊙ keep), the dropped input
//                                                         as a GEMM operand, i < n
//   lora_dx_keep_f32: dx[i] = dx[i] + keep[i] · ga[i]    the adapter's share of dx under a
//                                                         dropout mask (ga = g·A, f32), i < n
//
// x, keep, ga, dx: f32 [m, in] row-major (n = m · in, any n); out: bf16 bits [m, in]. keep holds
// 0 or 1/(1 − p) (cpu/dropout.rs). Both products are rounded once, exactly as the check's CPU
// emulation does: x · keep to f32 (__fmul_rn, never contracted) and then to bf16 (RNE);
// keep · ga + dx as one fused multiply-add (__fmaf_rn).
// Launch: any 1-D grid (ops::grid), 256 threads; each kernel is a grid-stride loop, one element
// per thread and step (coalesced; memory bound).
#include <cuda_bf16.h>
#include "common.cuh"

extern "C" __global__ void lora_keep_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ x,
                                          const float* __restrict__ keep, int64_t n) {
  GRID_STRIDE(i, n) { out[i] = __float2bfloat16_rn(__fmul_rn(x[i], keep[i])); }
}

extern "C" __global__ void lora_dx_keep_f32(float* __restrict__ dx, const float* __restrict__ keep,
                                            const float* __restrict__ ga, int64_t n) {
  GRID_STRIDE(i, n) { dx[i] = __fmaf_rn(keep[i], ga[i], dx[i]); }
}
