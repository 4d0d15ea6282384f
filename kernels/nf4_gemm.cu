// Fused NF4 GEMM for prefill and evaluation: the 4-bit weight is decoded inside the tile loader
// and multiplied on tensor cores (bf16 inputs, f32 accumulation). CPU spec:
// src/backend/cpu/nf4_gemm.rs; launcher: src/backend/cuda/nf4_gemm.rs.
//
//   y[m, n] = (accumulate ? y[m, n] : 0) + Σ_k bf16(x[m, k]) · bf16(w[n, k])       (f32 sums)
//   w[n, k] = NF4[c] · absmax_b rounded in f32 exactly as nf4_dequant_f32, then to bf16 (RNE).
//   x: f32 [M, K] row-major; W: NF4 [N, K] in bitsandbytes' layout (flat index n·K + k, see
//   nf4.cu); y: f32 [M, N] row-major.
//
// Requirements (checked by the launcher, which otherwise takes the dequantize + cuBLAS path):
// K % 16 == 0 and blocksize >= 16, so every 16-element run of a W row lies in one quantization
// block and is 8 packed bytes at an 8-byte aligned address; x and y are 16-byte aligned.
//
// Tiling: a CTA of WM×WN warps computes a BM×BN tile of y, stepping K by BK = 32. In each step
// every thread first issues the global loads of the *next* K tile into registers (x as float4;
// W as 8 packed bytes plus its block's scale inputs), then the warps multiply the current tile
// out of shared memory, then the thread converts its x values to bf16 and decodes its W values
// to bf16 into the other shared buffer (double buffering: one barrier per step). Each warp owns
// a (BM/WM)×(BN/WN) sub-tile made of mma.sync.m16n8k16 tiles. Shared rows are padded to 40
// bf16 (80 bytes) so the 32-bit fragment loads are bank-conflict free. Rows and columns past
// M, N load zeros and are not stored.
//
// mma.m16n8k16 fragments (lane l, g = l / 4, t = l % 4; each register holds two bf16, the lower
// k in the low half): A (16×16, row-major) a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
// a3 = A[g+8][2t+8..]; B (16×8, "col" = W rows) b0 = W[g][2t..], b1 = W[g][2t+8..];
// C (16×8) c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
#include "mma.cuh"
#include "nf4.cuh"

#define BK 32
#define SROW 40  // shared row length in bf16: BK plus 8 padding

template <int BM, int BN, int WM, int WN>
__device__ __forceinline__ void nf4_gemm_body(
    float* __restrict__ y, const float* __restrict__ x, const uint8_t* __restrict__ packed, int dq,
    const float* __restrict__ absmax, const uint8_t* __restrict__ q,
    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,
    int nested_blocksize, int blocksize_log2, int M, int N, int K, int accumulate) {
  constexpr int THREADS = WM * WN * 32;
  constexpr int WTM = BM / WM, WTN = BN / WN;  // warp sub-tile
  constexpr int MT = WTM / 16, NT = WTN / 8;   // mma tiles per warp
  constexpr int A_ITERS = BM * (BK / 4) / THREADS;  // float4 loads of x per thread per step
  constexpr int B_ITERS = BN * (BK / 16) / THREADS; // 16-element W runs per thread per step
  static_assert(A_ITERS * THREADS == BM * (BK / 4), "x tile must split evenly over threads");
  static_assert(B_ITERS * THREADS == BN * (BK / 16), "W tile must split evenly over threads");
  static_assert(MT * 16 == WTM && NT * 8 == WTN, "warp tile must be whole mma tiles");

  __shared__ __align__(16) __nv_bfloat16 As[2][BM][SROW];
  __shared__ __align__(16) __nv_bfloat16 Bs[2][BN][SROW];
  __shared__ float lut[16];
  __shared__ float code[256];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  if (tid < 16) lut[tid] = NF4[tid];
  if (dq)
    for (int i = tid; i < 256; i += THREADS) code[i] = nested_code[i];

  float4 areg[A_ITERS];
  uint2 breg[B_ITERS];
  float bsc[B_ITERS];  // f32 scale, or the nested absmax with double quantization
  int bq[B_ITERS];     // the 8-bit scale code (double quantization), -1 when out of range

  auto load = [&](int k0) {
#pragma unroll
    for (int i = 0; i < A_ITERS; i++) {
      const int idx = tid + i * THREADS, r = idx / (BK / 4), c = (idx % (BK / 4)) * 4;
      const int gm = m0 + r, gk = k0 + c;
      areg[i] = (gm < M && gk < K) ? __ldg(reinterpret_cast<const float4*>(x + (int64_t)gm * K + gk))
                                   : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int i = 0; i < B_ITERS; i++) {
      const int idx = tid + i * THREADS, r = idx / (BK / 16), h = idx % (BK / 16);
      const int gn = n0 + r, gk = k0 + h * 16;
      if (gn < N && gk < K) {
        const int64_t e = (int64_t)gn * K + gk, b = e >> blocksize_log2;
        breg[i] = __ldg(reinterpret_cast<const uint2*>(packed + (e >> 1)));
        if (dq) {
          bq[i] = q[b];
          bsc[i] = nested_absmax[b / nested_blocksize];
        } else {
          bq[i] = 0;
          bsc[i] = absmax[b];
        }
      } else {
        bq[i] = -1;
      }
    }
  };

  auto store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < A_ITERS; i++) {
      const int idx = tid + i * THREADS, r = idx / (BK / 4), c = (idx % (BK / 4)) * 4;
      const float4 a = areg[i];
      *reinterpret_cast<uint2*>(&As[buf][r][c]) = make_uint2(pack_bf16x2(a.x, a.y), pack_bf16x2(a.z, a.w));
    }
#pragma unroll
    for (int i = 0; i < B_ITERS; i++) {
      const int idx = tid + i * THREADS, r = idx / (BK / 16), h = idx % (BK / 16);
      uint32_t w[8];
      if (bq[i] < 0) {
#pragma unroll
        for (int j = 0; j < 8; j++) w[j] = 0;
      } else {
        const float s = dq ? __fadd_rn(__fmul_rn(code[bq[i]], bsc[i]), offset) : bsc[i];
#pragma unroll
        for (int j = 0; j < 8; j++) {
          // Byte j holds elements 2j (high nibble) and 2j+1 (low nibble).
          const uint32_t byte = ((j < 4 ? breg[i].x : breg[i].y) >> (8 * (j & 3))) & 0xffu;
          w[j] = pack_bf16x2(__fmul_rn(lut[byte >> 4], s), __fmul_rn(lut[byte & 0xfu], s));
        }
      }
      uint4* dst = reinterpret_cast<uint4*>(&Bs[buf][r][h * 16]);
      dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
      dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[i][j][c] = 0.f;

  const int ktiles = (K + BK - 1) / BK;
  load(0);
  __syncthreads();  // lut and code are visible before the first decode
  store(0);
  __syncthreads();
  for (int kt = 0; kt < ktiles; kt++) {
    const int buf = kt & 1;
    if (kt + 1 < ktiles) load((kt + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; i++) {
        const int r = wm * WTM + i * 16 + g;
        af[i][0] = *reinterpret_cast<const uint32_t*>(&As[buf][r][kk + 2 * t]);
        af[i][1] = *reinterpret_cast<const uint32_t*>(&As[buf][r + 8][kk + 2 * t]);
        af[i][2] = *reinterpret_cast<const uint32_t*>(&As[buf][r][kk + 2 * t + 8]);
        af[i][3] = *reinterpret_cast<const uint32_t*>(&As[buf][r + 8][kk + 2 * t + 8]);
      }
#pragma unroll
      for (int j = 0; j < NT; j++) {
        const int n = wn * WTN + j * 8 + g;
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&Bs[buf][n][kk + 2 * t]);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&Bs[buf][n][kk + 2 * t + 8]);
#pragma unroll
        for (int i = 0; i < MT; i++) mma_bf16_16x8x16(acc[i][j], af[i], b0, b1);
      }
    }
    if (kt + 1 < ktiles) store(buf ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int half = 0; half < 2; half++) {
        const int r = m0 + wm * WTM + i * 16 + g + 8 * half;
        const int c = n0 + wn * WTN + j * 8 + 2 * t;
        if (r >= M) continue;
        float* dst = y + (int64_t)r * N + c;
        if (c < N) dst[0] = acc[i][j][2 * half] + (accumulate ? dst[0] : 0.f);
        if (c + 1 < N) dst[1] = acc[i][j][2 * half + 1] + (accumulate ? dst[1] : 0.f);
      }
}

#define NF4_GEMM_ARGS                                                                         \
  float *__restrict__ y, const float *__restrict__ x, const uint8_t *__restrict__ packed,     \
      int dq, const float *__restrict__ absmax, const uint8_t *__restrict__ q,                \
      const float *__restrict__ nested_absmax, const float *__restrict__ nested_code,         \
      float offset, int nested_blocksize, int blocksize_log2, int M, int N, int K, int accumulate
#define NF4_GEMM_PASS                                                                         \
  y, x, packed, dq, absmax, q, nested_absmax, nested_code, offset, nested_blocksize,          \
      blocksize_log2, M, N, K, accumulate

// Large tiles for M > 64: 128×128 per CTA, 8 warps of 64×32. Grid (ceil(N/128), ceil(M/128)).
extern "C" __global__ void __launch_bounds__(256) nf4_gemm_bf16_128x128(NF4_GEMM_ARGS) {
  nf4_gemm_body<128, 128, 2, 4>(NF4_GEMM_PASS);
}

// Small tiles for 8 < M <= 64: 32×64 per CTA, 4 warps of 16×32 (more CTAs to stream W with).
// Grid (ceil(N/64), ceil(M/32)).
extern "C" __global__ void __launch_bounds__(128) nf4_gemm_bf16_32x64(NF4_GEMM_ARGS) {
  nf4_gemm_body<32, 64, 2, 2>(NF4_GEMM_PASS);
}
