// Backward NF4 product for training: dx = dy · W of a frozen NF4 projection, W decoded inside the
// tile loader and multiplied on tensor cores (bf16 inputs, f32 accumulation). The forward
// y = x · Wᵀ is kernels/nf4_gemm.cu; this kernel reads the same stored W, but reduces over W's
// rows and writes W's columns. CPU spec: src/backend/cpu/nf4_gemm_dx.rs; launcher:
// src/backend/cuda/nf4_gemm_dx.rs.
//
//   dx[m, k] = (accumulate ? dx[m, k] : 0) + Σ_n bf16(dy[m, n]) · bf16(w[n, k])       (f32 sums)
//   w[n, k] = NF4[c] · absmax_b rounded in f32 exactly as nf4_dequant_f32, then to bf16 (RNE).
//   dy: f32 [M, N] row-major; W: NF4 [N, K] in bitsandbytes' layout (flat index n·K + k, see
//   nf4.cu); dx: f32 [M, K] row-major. N = out_features (the reduction), K = in_features.
//
// Requirements (checked by the launcher, which otherwise takes another path): K % 16 == 0 and
// blocksize >= 16, so every 16-element run along k of a W row lies in one quantization block and
// is 8 packed bytes at an 8-byte aligned address; with double quantization a power-of-two
// nested block (bitsandbytes: 256; the kernel shifts instead of dividing); dy and dx are whole
// allocations (256-byte aligned). Any M and N: rows past M, reduction indices past N and columns
// past K load nothing (zeros) and are not stored; dy is read as float4 when N % 4 == 0, else
// element by element (one uniform branch).
//
// Tiling: a CTA of WM×WN warps computes a BM×BN tile of dx (BN along k), stepping the reduction
// n by BR = 32. Shared memory holds two buffers of the dy tile As[BM][BR] (bf16, rows padded to
// 40) and of the decoded W tile Bs[BR][BN] (bf16, W's own orientation: k contiguous, rows padded
// to BN + 8). Fragments come from ldmatrix: A (dy) row-major as stored, B with ldmatrix.trans,
// which hands each lane the pairs of consecutive n the "col" B operand wants. Both paddings make
// the 8 row addresses of every 8×8 ldmatrix matrix fall in distinct 16-byte bank groups.
//
// Pipeline (one barrier per step; the W decode overlaps the tensor-core work): the global loads
// of both operands run two steps ahead into two register sets each, so converting a tile never
// waits for a load issued in the same step (ptxas places the conversions early). Step t: (1)
// issue the loads of tiles t+2 (W: 8 packed bytes and the scale inputs per 16-element run; dy:
// float4); (2) for each group of mma tiles of tile t (buffer t%2), ldmatrix + mma.sync, and after
// every quarter of the groups decode a quarter of W tile t+1 into the other buffer, so the ALU
// decode issues while the tensor cores work; (3) round dy tile t+1 to bf16 into the other
// buffer; (4) barrier. Loads are predicated, so the step body has no branches but the dy one.
// Stores: a lane writes its 16 decoded values as two 16-byte halves, the lanes with (run & 4)
// first the upper half, so the 8 lanes of each quarter-warp hit 8 distinct bank groups; the dy
// rows of the two half-warps of each 8-byte store are 4 rows apart for the same reason.
// Registers (ptxas, CUDA 13.0, no spills): 128×128 183 (sm_80) / 190 (sm_90), one CTA per SM;
// 64×64 142 / 148.
//
// mma.m16n8k16 fragments (lane l, g = l / 4, t = l % 4; each register holds two bf16, the lower
// index in the low half): A (16×16 of dy, row-major) a0 = A[g][2t..], a1 = A[g+8][2t..],
// a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]; B (16 n × 8 k) b0 = W[2t, 2t+1][g], b1 = W[2t+8, 2t+9][g];
// C (16×8) c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]. ldmatrix.x4: lane l gives the row
// address of matrix l / 8, row l % 8; for both operands row = base + (l & 15), col = (l >> 4)·8.
//
// Launch (see the kernels at the end): grid (ceil(K / BN), ceil(M / BM)), blockDim WM·WN·32,
// static shared memory only.
#include "mma.cuh"
#include "nf4.cuh"

#define BR 32    // reduction (n) step
#define AROW 40  // As row length in bf16: BR plus 8 padding (80 bytes)

template <int V>
struct Int {
  static constexpr int value = V;
};

template <int BM, int BN, int WM, int WN>
__device__ __forceinline__ void nf4_gemm_dx_body(
    float* __restrict__ dx, const float* __restrict__ dy, const uint8_t* __restrict__ packed,
    int dq, const float* __restrict__ absmax, const uint8_t* __restrict__ q,
    const float* __restrict__ nested_absmax, const float* __restrict__ nested_code, float offset,
    int nested_blocksize, int blocksize_log2, int M, int N, int K, int accumulate) {
  constexpr int THREADS = WM * WN * 32;
  constexpr int WTM = BM / WM, WTN = BN / WN;  // warp sub-tile
  constexpr int MT = WTM / 16, NT = WTN / 8;   // mma tiles per warp
  constexpr int BROW = BN + 8;                 // Bs row length in bf16
  constexpr int RUNS = BN / 16;                // 16-element W runs per tile row
  constexpr int A_ITERS = BM * (BR / 4) / THREADS;  // 4-value dy pieces per thread per step
  constexpr int B_ITERS = BR * RUNS / THREADS;      // W runs per thread per step
  // Fragment order per 16-deep slice: all A fragments first, then one ldmatrix.trans (two n8
  // tiles) per group, or all B fragments first, then one A fragment per group: whichever keeps
  // fewer fragment registers live.
  constexpr bool A_FIRST = MT * 2 <= NT;
  constexpr int GROUPS = (BR / 16) * (A_FIRST ? NT / 2 : MT);  // mma groups per step
  static_assert(A_ITERS * THREADS == BM * (BR / 4), "dy tile must split evenly over threads");
  static_assert(B_ITERS * THREADS == BR * RUNS, "W tile must split evenly over threads");
  static_assert(MT * 16 == WTM && NT * 8 == WTN && NT % 2 == 0, "warp tile: whole mma pairs");
  static_assert(RUNS == 4 || RUNS % 8 == 0, "a quarter-warp decodes 8 runs of one row or 4 of two");
  static_assert(GROUPS % 4 == 0, "the decode is spread over the groups in quarters");
  static_assert((BROW * 2) % 128 == 16 && (AROW * 2) % 16 == 0,
                "ldmatrix rows: 16-byte aligned, 8 consecutive rows in distinct bank groups");

  __shared__ __align__(16) __nv_bfloat16 As[2][BM][AROW];
  __shared__ __align__(16) __nv_bfloat16 Bs[2][BR][BROW];
  __shared__ float lut[16];
  __shared__ float code[256];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int g = lane >> 2, t4 = lane & 3;
  const int m0 = blockIdx.y * BM, k0 = blockIdx.x * BN;
  const bool vec4 = (N & 3) == 0;
  if (tid < 16) lut[tid] = NF4[tid];
  for (int i = tid; i < 256; i += THREADS) code[i] = dq ? nested_code[i] : 0.f;
  const int nested_log2 = __ffs(nested_blocksize) - 1;  // a power of two (launcher)

  // dy pieces (4 values): piece 8q .. 8q+7 of the tile cover one row; consecutive q alternate
  // between rows 4 apart (see the header). THREADS / 8 is a multiple of 8, so this thread's
  // piece i is tile row ar0 + i·THREADS/8, columns ac .. ac+3.
  const int ac = (tid & 7) * 4;
  const int ar0 = ((tid >> 3) & ~7) | ((tid >> 1) & 4) | ((tid >> 4) & 3);
  static_assert(THREADS % 64 == 0, "dy rows: whole groups of 8 per pass");

  // Two register sets of each operand's global loads: tile t+1 goes to shared memory while tile
  // t+2 loads, so no conversion ever waits for a load issued in the same step.
  float4 areg[2][A_ITERS];
  // A run outside W keeps zero codes and scale inputs: it decodes to finite values (0, or
  // -offset with double quantization) that meet only zero dy (n >= N) or unstored columns.
  uint2 breg[2][B_ITERS];
  float bsc[2][B_ITERS];  // f32 scale, or the nested absmax with double quantization
  int bq[2][B_ITERS];     // the 8-bit scale code (double quantization)

  // Piece i of this thread reads dy row m0 + ar0 + i·THREADS/8 (a_ok bit i: inside dy) at
  // columns n0 + ac .. +3. One uniform branch: float4 loads (predicated, no divergence) when
  // N % 4 == 0, else element loads. Addresses are formed for every piece but only dereferenced
  // where the predicate holds.
  const float* a_base = dy + (int64_t)(m0 + ar0) * N + ac;
  const int64_t a_rowstep = (int64_t)(THREADS / 8) * N;
  uint32_t a_ok = 0;
#pragma unroll
  for (int i = 0; i < A_ITERS; i++) a_ok |= (m0 + ar0 + i * (THREADS / 8) < M ? 1u : 0u) << i;
  auto load_a = [&](int n0, auto set) {
    constexpr int S = decltype(set)::value;
    const int gn = n0 + ac;
    if (vec4) {
#pragma unroll
      for (int i = 0; i < A_ITERS; i++) {
        const bool ok = ((a_ok >> i) & 1u) && gn < N;
        const float4* src = reinterpret_cast<const float4*>(a_base + i * a_rowstep + n0);
        areg[S][i] = ok ? __ldg(src) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
    } else {
#pragma unroll
      for (int i = 0; i < A_ITERS; i++) {
        const float* src = a_base + i * a_rowstep + n0;
        const bool row = (a_ok >> i) & 1u;
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; c++) v[c] = row && gn + c < N ? __ldg(src + c) : 0.f;
        areg[S][i] = make_float4(v[0], v[1], v[2], v[3]);
      }
    }
  };

  auto store_a = [&](auto set, int buf) {
    constexpr int S = decltype(set)::value;
#pragma unroll
    for (int i = 0; i < A_ITERS; i++) {
      const float4 a = areg[S][i];
      *reinterpret_cast<uint2*>(&As[buf][ar0 + i * (THREADS / 8)][ac]) =
          make_uint2(pack_bf16x2(a.x, a.y), pack_bf16x2(a.z, a.w));
    }
  };

  // Run i of this thread (idx = tid + i·THREADS): tile row idx / RUNS, columns
  // k0 + (idx % RUNS)·16 .. +15 (b_kok bit i: inside W); the loads are predicated, a run outside
  // W reads nothing and keeps zero codes and scales.
  uint32_t b_kok = 0;
#pragma unroll
  for (int i = 0; i < B_ITERS; i++)
    b_kok |= (k0 + ((tid + i * THREADS) % RUNS) * 16 < K ? 1u : 0u) << i;
  auto load_b = [&](int n0, auto set) {
    constexpr int S = decltype(set)::value;
#pragma unroll
    for (int i = 0; i < B_ITERS; i++) {
      const int idx = tid + i * THREADS, gn = n0 + idx / RUNS, gk = k0 + (idx % RUNS) * 16;
      const bool ok = ((b_kok >> i) & 1u) && gn < N;
      const int64_t e = (int64_t)gn * K + gk, b = e >> blocksize_log2;
      const float* scale = dq ? nested_absmax + (b >> nested_log2) : absmax + b;
      breg[S][i] = ok ? __ldg(reinterpret_cast<const uint2*>(packed + (e >> 1))) : make_uint2(0u, 0u);
      bq[S][i] = ok && dq ? __ldg(q + b) : 0;
      bsc[S][i] = ok ? __ldg(scale) : 0.f;
    }
  };

  // Quarter p (0..3) of the decode of register set S into Bs[buf]: bytes 2(p%2), 2(p%2)+1 of
  // the half (p/2) ^ sw of every run; after the second quarter of a half, its 16 bytes go out.
  float sc[B_ITERS];
  uint32_t hw[B_ITERS][4];
  auto decode_quarter = [&](int p, auto set, int buf) {
    constexpr int S = decltype(set)::value;
#pragma unroll
    for (int i = 0; i < B_ITERS; i++) {
      const int idx = tid + i * THREADS, r = idx / RUNS, h = idx % RUNS;
      const int sw = RUNS >= 8 ? (h >> 2) & 1 : 0;  // with 4 runs the two rows interleave
      if (p == 0) {  // branch-free: code[] holds zeros without double quantization
        const float s_dq = __fadd_rn(__fmul_rn(code[bq[S][i]], bsc[S][i]), offset);
        sc[i] = dq ? s_dq : bsc[S][i];
      }
      const int half = (p >> 1) ^ sw;
      const uint32_t word = half ? breg[S][i].y : breg[S][i].x;
#pragma unroll
      for (int b = 0; b < 2; b++) {
        // Byte j of the half holds its elements 2j (high nibble) and 2j+1 (low nibble).
        const int j = (p & 1) * 2 + b;
        const uint32_t byte = (word >> (8 * j)) & 0xffu;
        hw[i][j] = pack_bf16x2(__fmul_rn(lut[byte >> 4], sc[i]), __fmul_rn(lut[byte & 0xfu], sc[i]));
      }
      if (p & 1)
        reinterpret_cast<uint4*>(&Bs[buf][r][h * 16])[half] =
            make_uint4(hw[i][0], hw[i][1], hw[i][2], hw[i][3]);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int c = 0; c < 4; c++) acc[i][j][c] = 0.f;

  // Step t: multiply buffer P = t % 2 while decoding W tile t+1 and rounding dy tile t+1
  // (register sets 1 - P) into the other buffer; tiles t+2 load into sets P (free: tile t went
  // to shared memory in step t-1).
  auto step = [&](int t, auto parity) {
    constexpr int P = decltype(parity)::value;
    load_b((t + 2) * BR, Int<P>{});
    load_a((t + 2) * BR, Int<P>{});
    // After every GROUPS/4 groups, a quarter of the decode.
    auto after_group = [&](int gi) {
      if ((gi + 1) % (GROUPS / 4) == 0)
        decode_quarter((gi + 1) / (GROUPS / 4) - 1, Int<1 - P>{}, 1 - P);
    };
#pragma unroll
    for (int kk = 0; kk < BR / 16; kk++) {
      const __nv_bfloat16* a_at = &As[P][wm * WTM + (lane & 15)][kk * 16 + (lane >> 4) * 8];
      const __nv_bfloat16* b_at = &Bs[P][kk * 16 + (lane & 15)][wn * WTN + (lane >> 4) * 8];
      if constexpr (A_FIRST) {
        uint32_t af[MT][4];
#pragma unroll
        for (int i = 0; i < MT; i++) ldmatrix_x4(af[i], a_at + i * 16 * AROW);
#pragma unroll
        for (int jj = 0; jj < NT / 2; jj++) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, b_at + jj * 16);
#pragma unroll
          for (int i = 0; i < MT; i++) {
            mma_bf16_16x8x16(acc[i][2 * jj], af[i], bf[0], bf[1]);
            mma_bf16_16x8x16(acc[i][2 * jj + 1], af[i], bf[2], bf[3]);
          }
          after_group(kk * (NT / 2) + jj);
        }
      } else {
        uint32_t bf[NT / 2][4];
#pragma unroll
        for (int jj = 0; jj < NT / 2; jj++) ldmatrix_x4_trans(bf[jj], b_at + jj * 16);
#pragma unroll
        for (int i = 0; i < MT; i++) {
          uint32_t af[4];
          ldmatrix_x4(af, a_at + i * 16 * AROW);
#pragma unroll
          for (int jj = 0; jj < NT / 2; jj++) {
            mma_bf16_16x8x16(acc[i][2 * jj], af, bf[jj][0], bf[jj][1]);
            mma_bf16_16x8x16(acc[i][2 * jj + 1], af, bf[jj][2], bf[jj][3]);
          }
          after_group(kk * MT + i);
        }
      }
    }
    store_a(Int<1 - P>{}, 1 - P);
    __syncthreads();
  };

  const int ntiles = (N + BR - 1) / BR;
  load_a(0, Int<0>{});
  load_b(0, Int<0>{});
  load_a(BR, Int<1>{});
  load_b(BR, Int<1>{});
  __syncthreads();  // lut and code are visible before the first decode
  store_a(Int<0>{}, 0);
#pragma unroll
  for (int p = 0; p < 4; p++) decode_quarter(p, Int<0>{}, 0);
  __syncthreads();
  for (int t = 0; t < ntiles; t += 2) {
    step(t, Int<0>{});
    if (t + 1 < ntiles) step(t + 1, Int<1>{});
  }

#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
      for (int half = 0; half < 2; half++) {
        const int r = m0 + wm * WTM + i * 16 + g + 8 * half;
        const int c = k0 + wn * WTN + j * 8 + 2 * t4;  // even, and K % 16 == 0: c+1 < K too
        if (r >= M || c >= K) continue;
        float2* dst = reinterpret_cast<float2*>(dx + (int64_t)r * K + c);
        float2 v = make_float2(acc[i][j][2 * half], acc[i][j][2 * half + 1]);
        if (accumulate) {
          const float2 o = *dst;
          v.x += o.x;
          v.y += o.y;
        }
        *dst = v;
      }
}

#define NF4_GEMM_DX_ARGS                                                                      \
  float *__restrict__ dx, const float *__restrict__ dy, const uint8_t *__restrict__ packed,   \
      int dq, const float *__restrict__ absmax, const uint8_t *__restrict__ q,                \
      const float *__restrict__ nested_absmax, const float *__restrict__ nested_code,         \
      float offset, int nested_blocksize, int blocksize_log2, int M, int N, int K, int accumulate
#define NF4_GEMM_DX_PASS                                                                      \
  dx, dy, packed, dq, absmax, q, nested_absmax, nested_code, offset, nested_blocksize,        \
      blocksize_log2, M, N, K, accumulate

// Large tiles for M > 64: 128×128 per CTA, 8 warps (2×4) of 64×32; the two-deep register
// staging needs more than 128 registers, so one CTA per SM (capped at 128, ptxas moves the dy
// conversion next to its loads and the prefetch is lost). Grid (ceil(K/128), ceil(M/128)).
extern "C" __global__ void __launch_bounds__(256, 1) nf4_gemm_dx_bf16_128x128(NF4_GEMM_DX_ARGS) {
  nf4_gemm_dx_body<128, 128, 2, 4>(NF4_GEMM_DX_PASS);
}

// Small tiles for M <= 64: 64×64 per CTA, 4 warps (2×2) of 32×32 (twice the CTAs of 128-wide
// tiles to stream W with). Grid (ceil(K/64), ceil(M/64)).
extern "C" __global__ void __launch_bounds__(128, 2) nf4_gemm_dx_bf16_64x64(NF4_GEMM_DX_ARGS) {
  nf4_gemm_dx_body<64, 64, 2, 2>(NF4_GEMM_DX_PASS);
}
