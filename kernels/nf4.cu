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
//   nf4_dequant_f32:  out[i] = w_i, i < n  (grid-stride over runs of 8 elements: one 4-byte load,
//                     one scale, two float4 stores; grid sized for n / 8 threads)
//   nf4_gemv_f32:     y[r, o] = (accumulate ? y[r, o] : 0) + Σ_j x[r, j] · w[o·k + j]
//                     for r < m ≤ 8, o < rows_out (accumulate fuses a residual add)
//                     W is [rows_out, k] row-major; one warp per output row o; each lane walks
//                     the row with stride 32 elements, decodes in registers and
//                     accumulates all m inputs at once (the weight is read once for all rows);
//                     warp-shuffle reduction. Launch: blockDim 256 (8 warps), grid ceil(rows_out/8).
//                     The general kernel: any k, any blocksize.
//   nf4_gemv_f32_k32: the same product for k % 32 == 0 and blocksize >= 32 (every Llama shape),
//                     built for bandwidth: per step each lane loads 16 packed bytes (32 elements,
//                     one quantization block, one scale) of each of GEMV_ROWS = 4 weight rows, so a
//                     warp streams 4 × 512 contiguous bytes; it decodes them in registers (NF4
//                     table in shared memory) and multiplies them with the m input rows, whose
//                     values (read through L1) are reused for all 4 weight rows.
//                     Launch: blockDim 128 (4 warps, 16 output rows), grid ceil(rows_out/16).
#include <cuda_bf16.h>
#include "gemv.cuh"
#include "nf4.cuh"

// Dequantize 8 consecutive elements e0 = 8j .. 8j+7 (4 packed bytes, one block because
// blocksize >= 8 and e0 is 8-aligned) into v[0..8).
__device__ __forceinline__ void nf4_decode8(float* v, const float* lut,
                                            const uint8_t* __restrict__ packed,
                                            int64_t j, int dq, const float* __restrict__ absmax,
                                            const uint8_t* __restrict__ q,
                                            const float* __restrict__ nested_absmax,
                                            const float* __restrict__ nested_code, float offset,
                                            int nested_blocksize, int blocksize_log2) {
  const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(packed) + j);
  const float s = block_scale((8 * j) >> blocksize_log2, dq, absmax, q, nested_absmax, nested_code,
                              offset, nested_blocksize);
#pragma unroll
  for (int b = 0; b < 4; b++) {
    const uint32_t byte = (word >> (8 * b)) & 0xffu;
    v[2 * b] = __fmul_rn(lut[byte >> 4], s);
    v[2 * b + 1] = __fmul_rn(lut[byte & 0xfu], s);
  }
}

// Both dequantize kernels: thread j writes elements 8j .. 8j+7 with one 4-byte load and one
// scale (vector stores); a tensor whose size is not a multiple of 8 finishes element-wise. The
// NF4 table is copied to shared memory: lanes index it with different codes, which the constant
// cache would serialize.
#define NF4_SHARED_LUT(lut)                                  \
  __shared__ float lut[16];                                  \
  if (threadIdx.x < 16) lut[threadIdx.x] = NF4[threadIdx.x]; \
  __syncthreads();
extern "C" __global__ void nf4_dequant_f32(float* __restrict__ out, const uint8_t* __restrict__ packed,
                                           int dq, const float* __restrict__ absmax,
                                           const uint8_t* __restrict__ q,
                                           const float* __restrict__ nested_absmax,
                                           const float* __restrict__ nested_code, float offset,
                                           int nested_blocksize, int blocksize_log2, int64_t n) {
  NF4_SHARED_LUT(lut)
  GRID_STRIDE(j, n / 8) {
    float v[8];
    nf4_decode8(v, lut, packed, j, dq, absmax, q, nested_absmax, nested_code, offset, nested_blocksize,
                blocksize_log2);
    float4* o = reinterpret_cast<float4*>(out + 8 * j);
    o[0] = make_float4(v[0], v[1], v[2], v[3]);
    o[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  GRID_STRIDE(t, n % 8) {
    const int64_t i = n / 8 * 8 + t;
    float s = block_scale(i >> blocksize_log2, dq, absmax, q, nested_absmax, nested_code, offset,
                          nested_blocksize);
    out[i] = __fmul_rn(NF4[nf4_code(packed, i)], s);
  }
}

extern "C" __global__ void nf4_gemv_f32(float* __restrict__ y, const float* __restrict__ x,
                                        const uint8_t* __restrict__ packed,
                                        int dq, const float* __restrict__ absmax,
                                        const uint8_t* __restrict__ q,
                                        const float* __restrict__ nested_absmax,
                                        const float* __restrict__ nested_code, float offset,
                                        int nested_blocksize, int blocksize_log2, int m,
                                        int64_t rows_out, int64_t k, int accumulate) {
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
    if (lane == 0 && r < m) {
      float* dst = y + (int64_t)r * rows_out + o;
      *dst = v + (accumulate ? *dst : 0.0f);
    }
  }
}

// nf4_dequant_bf16: out[i] = bf16(w_i) (round to nearest even), i < n. The scratch weight of the
// "dequantize, then cuBLAS bf16 GEMM" baseline that nf4_gemm.cu is measured against.
extern "C" __global__ void nf4_dequant_bf16(__nv_bfloat16* __restrict__ out,
                                            const uint8_t* __restrict__ packed, int dq,
                                            const float* __restrict__ absmax,
                                            const uint8_t* __restrict__ q,
                                            const float* __restrict__ nested_absmax,
                                            const float* __restrict__ nested_code, float offset,
                                            int nested_blocksize, int blocksize_log2, int64_t n) {
  NF4_SHARED_LUT(lut)
  GRID_STRIDE(j, n / 8) {
    float v[8];
    nf4_decode8(v, lut, packed, j, dq, absmax, q, nested_absmax, nested_code, offset, nested_blocksize,
                blocksize_log2);
    uint32_t w[4];
#pragma unroll
    for (int b = 0; b < 4; b++) {
      __nv_bfloat162 p = __floats2bfloat162_rn(v[2 * b], v[2 * b + 1]);
      w[b] = *reinterpret_cast<uint32_t*>(&p);
    }
    *reinterpret_cast<uint4*>(out + 8 * j) = make_uint4(w[0], w[1], w[2], w[3]);
  }
  GRID_STRIDE(t, n % 8) {
    const int64_t i = n / 8 * 8 + t;
    float s = block_scale(i >> blocksize_log2, dq, absmax, q, nested_absmax, nested_code, offset,
                          nested_blocksize);
    out[i] = __float2bfloat16_rn(__fmul_rn(NF4[nf4_code(packed, i)], s));
  }
}

// The NF4 part of nf4_gemv_f32_k32 and nf4_gemv_lora_f32_k32: acc[r][i] += this lane's share of
// x[i, :] · w[o0 + r, :].
__device__ __forceinline__ void nf4_gemv_k32_acc(
    float (*acc)[GEMV_MAX_M], const float* lut, const float* __restrict__ x,
    const uint8_t* __restrict__ packed, int dq, const float* __restrict__ absmax,
    const uint8_t* __restrict__ q, const float* __restrict__ nested_absmax,
    const float* __restrict__ nested_code, float offset, int nested_blocksize, int blocksize_log2,
    int m, int64_t o0, int64_t rows_out, int64_t k, int lane) {
  for (int64_t j = (int64_t)lane * 32; j < k; j += 32 * 32) {
    uint32_t wv[GEMV_ROWS][4];
    float s[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) {
      const int64_t o = o0 + r;
      if (o < rows_out) {
        const int64_t e = o * k + j;
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(packed + (e >> 1)));
        wv[r][0] = v.x, wv[r][1] = v.y, wv[r][2] = v.z, wv[r][3] = v.w;
        s[r] = block_scale(e >> blocksize_log2, dq, absmax, q, nested_absmax, nested_code, offset,
                           nested_blocksize);
      } else {
        wv[r][0] = wv[r][1] = wv[r][2] = wv[r][3] = 0u;
        s[r] = 0.0f;
      }
    }
#pragma unroll
    for (int word = 0; word < 4; word++) {
      float w[GEMV_ROWS][8];  // elements j + 8·word .. +8 of each row
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int b = 0; b < 4; b++) {
          const uint32_t byte = (wv[r][word] >> (8 * b)) & 0xffu;
          w[r][2 * b] = __fmul_rn(lut[byte >> 4], s[r]);
          w[r][2 * b + 1] = __fmul_rn(lut[byte & 0xfu], s[r]);
        }
      gemv_fma8(acc, w, x, k, j + 8 * word, m);
    }
  }
}

extern "C" __global__ void __launch_bounds__(128)
    nf4_gemv_f32_k32(float* __restrict__ y, const float* __restrict__ x,
                     const uint8_t* __restrict__ packed, int dq, const float* __restrict__ absmax,
                     const uint8_t* __restrict__ q, const float* __restrict__ nested_absmax,
                     const float* __restrict__ nested_code, float offset, int nested_blocksize,
                     int blocksize_log2, int m, int64_t rows_out, int64_t k, int accumulate) {
  NF4_SHARED_LUT(lut)
  const int lane = threadIdx.x & 31;
  const int64_t o0 = ((int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * GEMV_ROWS;
  if (o0 >= rows_out) return;
  float acc[GEMV_ROWS][GEMV_MAX_M];
  gemv_zero(acc);
  nf4_gemv_k32_acc(acc, lut, x, packed, dq, absmax, q, nested_absmax, nested_code, offset,
                   nested_blocksize, blocksize_log2, m, o0, rows_out, k, lane);
  gemv_store(acc, y, m, o0, rows_out, lane, accumulate);
}

// LoRA at decode (spec: Backend::matmul_lora's default, src/backend/mod.rs; launcher
// src/backend/cuda/lora_decode.rs), y (+)= x·Wᵀ + scale · (x·Aᵀ)·Bᵀ for m ≤ 8 rows, rank ≤ 64,
// x f32 [m, k], y f32 [m, rows_out], xa f32 [m, rank]; A [rank, k] and B [rows_out, rank]
// row-major, in f32 (`_f32`: the adapter being trained, whose f32 buffers are the truth) or in
// bf16 bits (`_bf16`: the round-to-nearest-even copies of a frozen adapter, widened exactly in
// registers, half the bytes). Products and sums in f32 either way:
//   lora_xa_{f32,bf16}:           xa[i, c] = Σ_j x[i, j] · A[c, j]   (k % 8 == 0)
//                                 one 256-thread block per c: 16-byte loads of A (4 f32 or 8
//                                 bf16) strided over j, block reduction. Reads A once:
//                                 rank · k · (4 or 2) bytes (x, m·k·4 bytes, from L2 after c = 0).
//   nf4_gemv_lora_{f32,bf16}_k32: nf4_gemv_f32_k32 whose warps add, before their reduction,
//                                 scale · Σ_c xa[i, c] · B[o, c] (lanes over c), so the adapter's
//                                 up-projection costs no launch and no pass over y. Reads B once:
//                                 rows_out · rank · (4 or 2) bytes.
// Llama-2-7B, r = 64 on all seven projections: 640 MB per token in f32 next to 3.6 GB of NF4
// weights (≈ 18 % of a decode step's bytes), 320 MB in bf16 (≈ 9 %).

// The adapter's element widened to f32: f32 as is, bf16 bits by a 16-bit shift (exact).
__device__ __forceinline__ float lora_f32(float v) { return v; }
__device__ __forceinline__ float lora_f32(uint16_t v) { return __uint_as_float((uint32_t)v << 16); }

// 16 bytes of the adapter (N = 4 f32 or 8 bf16 elements from p, 16-byte aligned) widened into v.
template <typename T>
struct LoraChunk;
template <>
struct LoraChunk<float> {
  static constexpr int N = 4;
  static __device__ __forceinline__ void load(float* v, const float* p) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  }
};
template <>
struct LoraChunk<uint16_t> {
  static constexpr int N = 8;
  static __device__ __forceinline__ void load(float* v, const uint16_t* p) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      v[2 * i] = __uint_as_float(w[i] << 16);  // element 2i: the low half (little-endian)
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

template <typename T>
__device__ __forceinline__ void lora_xa(float* __restrict__ xa, const float* __restrict__ x,
                                        const T* __restrict__ a, int m, int rank, int64_t k) {
  constexpr int N = LoraChunk<T>::N;
  __shared__ float part[8][GEMV_MAX_M];
  const int c = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float acc[GEMV_MAX_M];
#pragma unroll
  for (int i = 0; i < GEMV_MAX_M; i++) acc[i] = 0.0f;
  const T* ar = a + (int64_t)c * k;
  for (int64_t j = threadIdx.x; j < k / N; j += blockDim.x) {
    float av[N];
    LoraChunk<T>::load(av, ar + j * N);
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) {
      if (i >= m) break;
      const float4* xp = reinterpret_cast<const float4*>(x + (int64_t)i * k + j * N);
      float s = 0.0f;
#pragma unroll
      for (int q = 0; q < N / 4; q++) {
        const float4 xv = __ldg(xp + q);
        s += xv.x * av[4 * q] + xv.y * av[4 * q + 1] + xv.z * av[4 * q + 2] + xv.w * av[4 * q + 3];
      }
      acc[i] += s;
    }
  }
#pragma unroll
  for (int i = 0; i < GEMV_MAX_M; i++) {
    float v = acc[i];
#pragma unroll
    for (int sh = 16; sh > 0; sh >>= 1) v += __shfl_xor_sync(0xffffffffu, v, sh);
    if (lane == 0) part[warp][i] = v;
  }
  __syncthreads();
  if (threadIdx.x < m) {
    float v = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) v += part[w][threadIdx.x];
    xa[(int64_t)threadIdx.x * rank + c] = v;
  }
}

extern "C" __global__ void __launch_bounds__(256)
    lora_xa_f32(float* __restrict__ xa, const float* __restrict__ x, const float* __restrict__ a,
                int m, int rank, int64_t k) {
  lora_xa(xa, x, a, m, rank, k);
}

extern "C" __global__ void __launch_bounds__(256)
    lora_xa_bf16(float* __restrict__ xa, const float* __restrict__ x,
                 const uint16_t* __restrict__ a, int m, int rank, int64_t k) {
  lora_xa(xa, x, a, m, rank, k);
}

template <typename T>
__device__ __forceinline__ void nf4_gemv_lora_k32(
    float* __restrict__ y, const float* __restrict__ x, const uint8_t* __restrict__ packed, int dq,
    const float* __restrict__ absmax, const uint8_t* __restrict__ q,
    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,
    int nested_blocksize, int blocksize_log2, int m, int64_t rows_out, int64_t k, int accumulate,
    const float* __restrict__ xa, const T* __restrict__ lb, float scale, int rank) {
  NF4_SHARED_LUT(lut)
  const int lane = threadIdx.x & 31;
  const int64_t o0 = ((int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * GEMV_ROWS;
  if (o0 >= rows_out) return;
  float acc[GEMV_ROWS][GEMV_MAX_M];
  gemv_zero(acc);
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; r++) {
    if (o0 + r >= rows_out) break;
    const T* br = lb + (o0 + r) * rank;
#pragma unroll
    for (int i = 0; i < GEMV_MAX_M; i++) {
      if (i >= m) break;
      float t = 0.0f;
      for (int c = lane; c < rank; c += 32) t += xa[(int64_t)i * rank + c] * lora_f32(br[c]);
      acc[r][i] = scale * t;
    }
  }
  nf4_gemv_k32_acc(acc, lut, x, packed, dq, absmax, q, nested_absmax, nested_code, offset,
                   nested_blocksize, blocksize_log2, m, o0, rows_out, k, lane);
  gemv_store(acc, y, m, o0, rows_out, lane, accumulate);
}

extern "C" __global__ void __launch_bounds__(128) nf4_gemv_lora_f32_k32(
    float* __restrict__ y, const float* __restrict__ x, const uint8_t* __restrict__ packed, int dq,
    const float* __restrict__ absmax, const uint8_t* __restrict__ q,
    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,
    int nested_blocksize, int blocksize_log2, int m, int64_t rows_out, int64_t k, int accumulate,
    const float* __restrict__ xa, const float* __restrict__ lb, float scale, int rank) {
  nf4_gemv_lora_k32(y, x, packed, dq, absmax, q, nested_absmax, nested_code, offset,
                    nested_blocksize, blocksize_log2, m, rows_out, k, accumulate, xa, lb, scale,
                    rank);
}

extern "C" __global__ void __launch_bounds__(128) nf4_gemv_lora_bf16_k32(
    float* __restrict__ y, const float* __restrict__ x, const uint8_t* __restrict__ packed, int dq,
    const float* __restrict__ absmax, const uint8_t* __restrict__ q,
    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,
    int nested_blocksize, int blocksize_log2, int m, int64_t rows_out, int64_t k, int accumulate,
    const float* __restrict__ xa, const uint16_t* __restrict__ lb, float scale, int rank) {
  nf4_gemv_lora_k32(y, x, packed, dq, absmax, q, nested_absmax, nested_code, offset,
                    nested_blocksize, blocksize_log2, m, rows_out, k, accumulate, xa, lb, scale,
                    rank);
}
