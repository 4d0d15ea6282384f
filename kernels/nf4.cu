// NF4 (bitsandbytes 4-bit NormalFloat) kernels; CPU spec in src/quant/nf4.rs and
// src/quant/matmul.rs, launchers in src/backend/cuda/nf4.rs.
//
// Layout (bitsandbytes): a tensor of n elements in blocks of `blocksize` (a power of two);
// element i has code c_i in packed[i >> 1], high nibble for even i, low nibble for odd i;
// block b = i / blocksize has scale absmax_b. With double quantization the scales are stored as
// u8 codes q_b of the signed dynamic 8-bit map `nested_code`, one f32 `nested_absmax` per
// `nested_blocksize` blocks, plus a global `offset`:
//     absmax_b = nested_code[q_b] * nested_absmax[b / nested_blocksize] + offset
//     w_i      = NF4[c_i] * absmax_{i / blocksize}
// `dq` selects double quantization. Each product and the sum are rounded separately (no FMA contraction: __fmul_rn / __fadd_rn),
// so the results are bit-identical with the CPU spec.
//
//   nf4_dequant_f32:  out[i] = w_i, i < n                               (grid-stride)
//   nf4_gemv_f32:     y[r, o] = Σ_j x[r, j] · w[o·k + j]  for r < m ≤ 8, o < rows_out
//                     W is [rows_out, k] row-major; one warp per output row o; each lane walks
//                     the row with stride 32 elements, decodes in registers and
//                     accumulates all m inputs at once (the weight is read once for all rows);
//                     warp-shuffle reduction. Launch: blockDim 256 (8 warps), grid ceil(rows_out/8).
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

extern "C" __global__ void nf4_dequant_f32(float* __restrict__ out, const uint8_t* __restrict__ packed,
                                           int dq, const float* __restrict__ absmax,
                                           const uint8_t* __restrict__ q,
                                           const float* __restrict__ nested_absmax,
                                           const float* __restrict__ nested_code, float offset,
                                           int nested_blocksize, int blocksize_log2, int64_t n) {
  GRID_STRIDE(i, n) {
    float s = block_scale(i >> blocksize_log2, dq, absmax, q, nested_absmax, nested_code, offset,
                          nested_blocksize);
    out[i] = __fmul_rn(NF4[nf4_code(packed, i)], s);
  }
}

#define GEMV_MAX_M 8

extern "C" __global__ void nf4_gemv_f32(float* __restrict__ y, const float* __restrict__ x,
                                        const uint8_t* __restrict__ packed,
                                        int dq, const float* __restrict__ absmax,
                                        const uint8_t* __restrict__ q,
                                        const float* __restrict__ nested_absmax,
                                        const float* __restrict__ nested_code, float offset,
                                        int nested_blocksize, int blocksize_log2, int m,
                                        int64_t rows_out, int64_t k) {
  const int lane = threadIdx.x & 31;
  const int64_t o = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (o >= rows_out) return;
  float acc[GEMV_MAX_M];
#pragma unroll
  for (int r = 0; r < GEMV_MAX_M; r++) acc[r] = 0.0f;
  const int64_t base = o * k;
  // Lanes take consecutive elements (coalesced reads of x; neighbouring lanes share bytes).
  for (int64_t j = lane; j < k; j += 32) {
    const int64_t i = base + j;
    const float w = __fmul_rn(NF4[nf4_code(packed, i)],
                              block_scale(i >> blocksize_log2, dq, absmax, q, nested_absmax,
                                          nested_code, offset, nested_blocksize));
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; r++)
      if (r < m) acc[r] += x[(int64_t)r * k + j] * w;
  }
#pragma unroll
  for (int r = 0; r < GEMV_MAX_M; r++) {
    float v = acc[r];
    for (int s = 16; s > 0; s >>= 1) v += __shfl_down_sync(0xffffffffu, v, s);
    if (lane == 0 && r < m) y[(int64_t)r * rows_out + o] = v;
  }
}
