// Dense projections over 16-bit weights (bf16 or f16), kept on the device in the checkpoint's
// own format when that is lossless. CPU spec: src/backend/cpu/matmul.rs (matmul_wt on the same
// values widened to f32); launchers in src/backend/cuda/dense_half.rs.
//
//   half_gemv_f32<W>: y[r, o] = Σ_j x[r, j] · f32(w[o·k + j]),  r < m ≤ 8, o < n; W [n, k] row-major,
//                     x f32 [m, k], y f32 [m, n]. Needs k % 8 == 0 (16-byte loads). Each lane loads
//                     8 weights (16 bytes) of each of GEMV_ROWS = 4 rows per step, widens them in
//                     registers and multiplies them with the m input rows (read through L1, reused
//                     for the 4 rows); warp-shuffle reduction. Launch: blockDim 128 (4 warps,
//                     16 output rows), grid ceil(n / 16).
//   f32_to_f16:       out[i] = f16(x[i]) (round to nearest even) — the activations of the f16
//                     cuBLAS prefill path (the bf16 twin is elementwise.cu's f32_to_bf16).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "gemv.cuh"

__device__ __forceinline__ void widen8(float* v, uint4 p, bool bf16) {
  const uint32_t w[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    if (bf16) {
      // bf16 → f32 is a 16-bit shift.
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      const __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
      const float2 f = __half22float2(h);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
}

template <bool BF16>
__device__ __forceinline__ void half_gemv(float* __restrict__ y, const float* __restrict__ x,
                                          const uint16_t* __restrict__ w, int m, int64_t n,
                                          int64_t k) {
  const int lane = threadIdx.x & 31;
  const int64_t o0 = ((int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * GEMV_ROWS;
  if (o0 >= n) return;
  float acc[GEMV_ROWS][GEMV_MAX_M];
  gemv_zero(acc);
  for (int64_t j = (int64_t)lane * 8; j < k; j += 32 * 8) {
    float wv[GEMV_ROWS][8];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
      const int64_t o = o0 + r;
      const uint4 p = o < n ? __ldg(reinterpret_cast<const uint4*>(w + o * k + j))
                            : make_uint4(0u, 0u, 0u, 0u);
      widen8(wv[r], p, BF16);
    }
    gemv_fma8(acc, wv, x, k, j, m);
  }
  gemv_store(acc, y, m, o0, n, lane, 0);
}

extern "C" __global__ void __launch_bounds__(128)
    gemv_bf16w_f32(float* __restrict__ y, const float* __restrict__ x,
                   const uint16_t* __restrict__ w, int m, int64_t n, int64_t k) {
  half_gemv<true>(y, x, w, m, n, k);
}

extern "C" __global__ void __launch_bounds__(128)
    gemv_f16w_f32(float* __restrict__ y, const float* __restrict__ x,
                  const uint16_t* __restrict__ w, int m, int64_t n, int64_t k) {
  half_gemv<false>(y, x, w, m, n, k);
}

extern "C" __global__ void f32_to_f16(__half* __restrict__ out, const float* __restrict__ x,
                                      int64_t n) {
  GRID_STRIDE(i, n) { out[i] = __float2half_rn(x[i]); }
}
