// Shared pieces of the bandwidth GEMV kernels (nf4.cu's nf4_gemv_f32_k32 and dense_half.cu's
// 16-bit-weight GEMVs): a warp owns GEMV_ROWS consecutive output rows and keeps one partial sum
// per (row, input row) in acc[GEMV_ROWS][GEMV_MAX_M]; each lane adds 8-element dot products, and
// the warp reduces and stores at the end.
#pragma once
#include "common.cuh"

#define GEMV_MAX_M 8
#define GEMV_ROWS 4

__device__ __forceinline__ void gemv_zero(float (*acc)[GEMV_MAX_M]) {
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) acc[r][i] = 0.0f;
}

// acc[r][i] += Σ_{t<8} x[i·k + j + t] · w[r][t]  for r < GEMV_ROWS, i < m (x read through L1 as
// two float4, reused for all GEMV_ROWS rows; x + j must be 16-byte aligned).
__device__ __forceinline__ void gemv_fma8(float (*acc)[GEMV_MAX_M], const float (*w)[8],
                                          const float* __restrict__ x, int64_t k, int64_t j,
                                          int m) {
#pragma unroll
  for (int i = 0; i < GEMV_MAX_M; i++) {
    if (i >= m) break;
    const float4* xp = reinterpret_cast<const float4*>(x + (int64_t)i * k + j);
    const float4 xa = __ldg(xp), xb = __ldg(xp + 1);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
      acc[r][i] += xa.x * w[r][0] + xa.y * w[r][1] + xa.z * w[r][2] + xa.w * w[r][3] +
                   xb.x * w[r][4] + xb.y * w[r][5] + xb.z * w[r][6] + xb.w * w[r][7];
  }
}

// Warp-reduces acc and writes y[i, o0 + r] (+= when accumulate) for rows o0 + r < n, i < m.
__device__ __forceinline__ void gemv_store(float (*acc)[GEMV_MAX_M], float* __restrict__ y,
                                           int m, int64_t o0, int64_t n, int lane,
                                           int accumulate) {
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) {
      if (i >= m) break;
      float v = acc[r][i];
#pragma unroll
      for (int sh = 16; sh > 0; sh >>= 1) v += __shfl_down_sync(0xffffffffu, v, sh);
      if (lane == 0 && o0 + r < n) {
        float* dst = y + (int64_t)i * n + o0 + r;
        *dst = v + (accumulate ? *dst : 0.0f);
      }
    }
}
