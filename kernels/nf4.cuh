// NF4 decoding helpers shared by kernels/nf4.cu and kernels/nf4_gemm.cu (layout described in
// nf4.cu's header). Each module that includes this gets its own copy of the constant table.
#pragma once
#include "common.cuh"

__constant__ float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Scale of block b (double-quantized when dq != 0; the unused pointers may be any buffer).
__device__ __forceinline__ float block_scale(int64_t b, int dq, const float* __restrict__ absmax,
                                             const uint8_t* __restrict__ q,
                                             const float* __restrict__ nested_absmax,
                                             const float* __restrict__ nested_code, float offset,
                                             int nested_blocksize) {
  if (!dq) return absmax[b];
  return __fadd_rn(__fmul_rn(nested_code[q[b]], nested_absmax[b / nested_blocksize]), offset);
}

__device__ __forceinline__ int nf4_code(const uint8_t* __restrict__ packed, int64_t i) {
  uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0x0f) : (byte >> 4);
}

