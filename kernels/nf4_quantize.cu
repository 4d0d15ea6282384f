// NF4 quantization on the device, bit-identical with the CPU spec `quantize_nf4` (src/quant/nf4.rs,
// bitsandbytes' `quantize_4bit(..., quant_type="nf4")`) without double quantization; the launcher
// (src/backend/cuda/nf4_quantize.rs) runs the nested 8-bit quantization of the absmax on the host
// with the spec's own code. Checked byte for byte by src/check/quantize.rs.
//
// Input: x, n elements of a checkpoint tensor, row-major flattened, as stored in the safetensors
// file (little-endian f16, bf16 or f32; widened to f32 exactly). Output, per block b of
// bs = 2^blocksize_log2 consecutive elements (32 <= bs <= 4096; blocks cross rows; the last one
// may be partial):
//     am_b      = max |x_i| over the block (f32, exact in any order)
//     c_b       = max(am_b, 1e-38f)                     (1e-38f is subnormal: bits 0x006ce3ee)
//     s_i       = x_i * (1 / c_b)   for a full block    (two roundings, as bnb writes it)
//                 x_i / c_b         for the partial last block (one rounding)
//     s_i       = min(max(s_i, -1), 1)
//     code_i    = #{ j < 15 : mid_j < s_i },  mid_j = (NF4[j] + NF4[j+1]) / 2 in f32
//     packed[i/2] = code_{2k} << 4 | code_{2k+1}     (an odd n pads the last low nibble with 7)
//     absmax[b] = am_b for a full block, c_b for the partial last one (bnb clamps it first)
// An all-zero full block keeps am_b = 0 and codes 7 (0 * 1e38 = 0). Non-finite inputs are an
// error: `bad[0]` receives the smallest flat index of a NaN / ±Inf element (atomicMin; the caller
// sets it to u64::MAX first) and the launcher reports it; codes and scales are then meaningless.
//
// Exactness: this file is in build.rs' EXACT_MATH list (no fast math, so subnormal inputs, the
// subnormal clamp 1e-38 and the subnormal reciprocal of a huge absmax are kept, not flushed), and
// every rounding step is an explicit IEEE round-to-nearest intrinsic (__fdiv_rn, __fmul_rn,
// __fadd_rn), so nvcc can neither contract nor approximate it. Max, min, abs, comparisons and the
// f16/bf16 -> f32 widenings are exact.
//
// Launch: blockDim 256 = 8 warps, one warp per quantization block (grid-stride over blocks, grid
// ceil(nblocks / 8) capped; any grid works). Lane l takes element pairs p = l, l+32, ... of its
// block (pair p = elements 2p, 2p+1, one 4-byte load for 16-bit input, 8-byte for f32; coalesced
// across the warp) in two passes: (1) the block's absmax (lane max, then a butterfly of
// __shfl_xor_sync, exact) and the first non-finite index; (2) re-reading the block (from L1/L2:
// at most 16 KiB per warp) to encode each pair into one output byte. Registers hold no per-block
// array, so every blocksize uses the same code. The 15 midpoints are computed once per CTA into
// shared memory, then into registers (the count is 15 compare-and-adds per element).
//
//   nf4_quantize_f16(packed, absmax, bad, x: const uint16_t*, n, blocksize_log2)
//   nf4_quantize_bf16(packed, absmax, bad, x: const uint16_t*, n, blocksize_log2)
//   nf4_quantize_f32(packed, absmax, bad, x: const float*, n, blocksize_log2)
// x must be 4-byte aligned (16-bit input) or 8-byte aligned (f32): a fresh allocation is.
#include <cuda_fp16.h>
#include "nf4.cuh"

#define NF4Q_THREADS 256

// bnb's clamp of the absmax before dividing: the f32 nearest 1e-38 (a subnormal), by its bits so
// that no decimal parsing is involved (src/backend/cuda/nf4_quantize.rs tests the value).
#define NF4Q_MIN_ABSMAX_BITS 0x006ce3eeu

// Exact widenings of one stored element to f32.
struct F16In {
  const uint16_t* __restrict__ x;
  __device__ __forceinline__ float at(int64_t i) const { return __half2float(__ushort_as_half(x[i])); }
  // Elements 2p (low half of the little-endian word) and 2p + 1.
  __device__ __forceinline__ float2 pair(int64_t p) const {
    const uint32_t w = reinterpret_cast<const uint32_t*>(x)[p];
    return make_float2(__half2float(__ushort_as_half((unsigned short)(w & 0xffffu))),
                       __half2float(__ushort_as_half((unsigned short)(w >> 16))));
  }
};

struct Bf16In {
  const uint16_t* __restrict__ x;
  __device__ __forceinline__ float at(int64_t i) const { return __uint_as_float((uint32_t)x[i] << 16); }
  __device__ __forceinline__ float2 pair(int64_t p) const {
    const uint32_t w = reinterpret_cast<const uint32_t*>(x)[p];
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
};

struct F32In {
  const float* __restrict__ x;
  __device__ __forceinline__ float at(int64_t i) const { return x[i]; }
  __device__ __forceinline__ float2 pair(int64_t p) const {
    return reinterpret_cast<const float2*>(x)[p];
  }
};

// Elements 2p and 2p + 1 of the tensor; the second is 0 (and unused) past the end of an odd n.
template <typename In>
__device__ __forceinline__ float2 load_pair(const In& in, int64_t p, int64_t n) {
  if (2 * p + 1 < n) return in.pair(p);
  return make_float2(in.at(2 * p), 0.0f);
}

// The number of midpoints strictly below s (torch.bucketize, right=False).
__device__ __forceinline__ uint32_t nf4_encode(float s, const float (&mid)[15]) {
  uint32_t c = 0;
#pragma unroll
  for (int j = 0; j < 15; j++) c += (mid[j] < s) ? 1u : 0u;
  return c;
}

// Scaled and clamped value of x in a block with clamped absmax c (reciprocal r = 1 / c).
__device__ __forceinline__ float nf4_scaled(float x, bool full, float r, float c) {
  const float s = full ? __fmul_rn(x, r) : __fdiv_rn(x, c);
  return fminf(fmaxf(s, -1.0f), 1.0f);
}

template <typename In>
__device__ __forceinline__ void nf4_quantize(const In in, uint8_t* __restrict__ packed,
                                             float* __restrict__ absmax,
                                             unsigned long long* __restrict__ bad, int64_t n,
                                             int blocksize_log2) {
  __shared__ float mid_s[15];
  if (threadIdx.x < 15)
    mid_s[threadIdx.x] = __fdiv_rn(__fadd_rn(NF4[threadIdx.x], NF4[threadIdx.x + 1]), 2.0f);
  __syncthreads();
  float mid[15];
#pragma unroll
  for (int j = 0; j < 15; j++) mid[j] = mid_s[j];

  const int lane = threadIdx.x & 31;
  const int64_t bs = (int64_t)1 << blocksize_log2;
  const int64_t nblocks = (n + bs - 1) >> blocksize_log2;
  const int64_t full = n >> blocksize_log2;  // blocks before `full` are whole
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  for (int64_t b = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); b < nblocks;
       b += warps) {
    const int64_t p0 = (b << blocksize_log2) >> 1;  // first pair of the block
    const int64_t len = min(bs, n - (b << blocksize_log2));
    const int64_t pairs = (len + 1) >> 1;

    // Pass 1: absmax and the first non-finite element.
    float am = 0.0f;
    unsigned long long first_bad = ~0ull;
    for (int64_t p = lane; p < pairs; p += 32) {
      const float2 v = load_pair(in, p0 + p, n);
      am = fmaxf(am, fmaxf(fabsf(v.x), fabsf(v.y)));
      const int64_t i = 2 * (p0 + p);
      if (!isfinite(v.x)) first_bad = min(first_bad, (unsigned long long)i);
      if (!isfinite(v.y)) first_bad = min(first_bad, (unsigned long long)(i + 1));
    }
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, m));
    if (first_bad != ~0ull) atomicMin(bad, first_bad);

    // Pass 2: encode (the block's data is in L1/L2 from pass 1).
    const bool is_full = b < full;
    const float c = fmaxf(am, __uint_as_float(NF4Q_MIN_ABSMAX_BITS));
    const float r = __fdiv_rn(1.0f, c);
    for (int64_t p = lane; p < pairs; p += 32) {
      const float2 v = load_pair(in, p0 + p, n);
      const uint32_t hi = nf4_encode(nf4_scaled(v.x, is_full, r, c), mid);
      const uint32_t lo =
          2 * (p0 + p) + 1 < n ? nf4_encode(nf4_scaled(v.y, is_full, r, c), mid) : 7u;
      packed[p0 + p] = (uint8_t)((hi << 4) | lo);
    }
    if (lane == 0) absmax[b] = is_full ? am : c;
  }
}

#define NF4_QUANTIZE_KERNEL(name, In, T)                                                         \
  extern "C" __global__ void                                                                     \
      name(uint8_t* __restrict__ packed, float* __restrict__ absmax,                             \
           unsigned long long* __restrict__ bad, const T* __restrict__ x, int64_t n,             \
           int blocksize_log2) {                                                                 \
    nf4_quantize(In{x}, packed, absmax, bad, n, blocksize_log2);                                 \
  }

NF4_QUANTIZE_KERNEL(nf4_quantize_f16, F16In, uint16_t)
NF4_QUANTIZE_KERNEL(nf4_quantize_bf16, Bf16In, uint16_t)
NF4_QUANTIZE_KERNEL(nf4_quantize_f32, F32In, float)
