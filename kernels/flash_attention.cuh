// Helpers of kernels/flash_attention.cu (see its header for the math and the layouts): fragment
// loads from shared tiles (the mma / ldmatrix instructions are in mma.cuh), the f32 → bf16 tile
// loader, quad and warp reductions, the per-lane vectors of the f32 kernels and the row →
// sequence search of a packed batch.
#pragma once
#include "common.cuh"
#include "mma.cuh"

#define FA_THREADS 128
#define FA_MAX_D 256   // the f32 path's limit

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ uint32_t lds32(const bf16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// B fragments of n-tiles n0 and n0 + 8 for the k16 step at row k0 of a [k][n] tile with row
// stride `ld`: matrices (k0..+8, n0), (k0+8.., n0), (k0.., n0+8), (k0+8.., n0+8), transposed.
__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, const bf16* tile, int ld, int k0,
                                              int n0) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4_trans(r, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// A fragment of the 16-row block at `row` (k16 step at column k0) of a row-major tile.
__device__ __forceinline__ void lds_a(uint32_t* a, const bf16* tile, int ld, int row, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bf16* p = tile + (row + g) * ld + k0 + 2 * t;
  a[0] = lds32(p);
  a[1] = lds32(p + 8 * ld);
  a[2] = lds32(p + 8);
  a[3] = lds32(p + 8 * ld + 8);
}

// Stages R rows of D f32 (row i at src + i·stride, rows ≥ valid read as 0) into a bf16 tile.
template <int R, int D>
__device__ __forceinline__ void load_tile(bf16* dst, const float* __restrict__ src, int64_t stride,
                                          int valid) {
  constexpr int V = D / 4, ITERS = R * V / FA_THREADS;
  static_assert(ITERS * FA_THREADS == R * V, "tile must split evenly over the threads");
#pragma unroll 4
  for (int i = 0; i < ITERS; i++) {
    const int idx = threadIdx.x + i * FA_THREADS, r = idx / V, c = (idx % V) * 4;
    const float4 x = r < valid ? __ldg(reinterpret_cast<const float4*>(src + r * stride + c))
                               : make_float4(0.f, 0.f, 0.f, 0.f);
    *reinterpret_cast<uint2*>(dst + r * (D + 8) + c) =
        make_uint2(pack_bf16x2(x.x, x.y), pack_bf16x2(x.z, x.w));
  }
}

// Sum over the 4 lanes of a quad (the lanes holding one C row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

#define FA_PER (FA_MAX_D / 32)  // values per lane of a D-vector in the f32 kernels

// Loads this lane's elements of a D-vector (zeros past d).
__device__ __forceinline__ void lane_load(float* x, const float* __restrict__ p, int d) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < FA_PER; i++) x[i] = lane + 32 * i < d ? p[lane + 32 * i] : 0.f;
}

// This lane's part of the dot product a·x (a: the lane's values, x: a D-vector in memory).
__device__ __forceinline__ float lane_dot(const float* a, const float* __restrict__ x, int d) {
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < FA_PER; i++)
    if (lane + 32 * i < d) acc += a[i] * x[lane + 32 * i];
  return acc;
}

// The sequence holding row r of a packed batch: the largest s < nseq with cu_seqlens[s] ≤ r
// (empty sequences are skipped). Binary search over the nseq + 1 offsets.
__device__ __forceinline__ int seq_of(const int* __restrict__ cu_seqlens, int nseq, int r) {
  int lo = 0, hi = nseq;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (cu_seqlens[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
