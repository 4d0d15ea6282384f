// bitsandbytes' 8-bit blockwise AdamW (`--optim paged_adamw_8bit`) over many tensors at once,
// bit for bit as its CPU spec. CPU spec: src/train/optim8.rs (`update_q8`, `update_f32`,
// `quantize_2d`, `quantize_m`, composed with the clip as in `CpuBackend::adamw_step`); launcher:
// src/backend/cuda/adamw8.rs (`DeviceAdamW8::step`, which also documents the paged memory).
//
// Math (bnb's kOptimizerStatic8bit2StateBlockwise, ADAM; f32, every operation one IEEE
// round-to-nearest-even operation, none fused), per quantization block of 256 values of a tensor
// with n ≥ 4096 values (u8 codes cm, cv; f32 absmax₁, absmax₂ per block; map₁ signed, map₂
// unsigned dynamic map, 256 f32 each):
//   g' = g·coef                                   (coef from the global norm, 1 unless clipping)
//   positions past n: g' = 0, cm = 128, cv = 0    (bnb's BlockLoad defaults; they enter absmax)
//   g' finite: v = ((map₂[cv]·absmax₂)·β2) + ((w2·g')·g'),  m = ((map₁[cm]·absmax₁)·β1) + (w1·g')
//   else:      m = v = 0
//   absmax₁ = max |m|, absmax₂ = max |v| over the block's 256 positions (as u32 bit patterns)
//   real positions: g' finite: p = p + (step_size·(m / (√v + ε̂))); wd > 0: p = p·decay
//                   cm = quantize_2d<signed>(map₁, m / absmax₁), sign fix (±1 towards m's sign,
//                        wrapping as u8); cv = quantize_2d<unsigned>(map₂, v / absmax₂)
// Tensors under 4096 values keep f32 m, v (bnb's min_8bit_size) and take bnb's 32-bit rule:
//   m = (m·β1) + (w1·g'),  v = (v·β2) + (w2·(g'·g')),  p as above.
// step_size, ε̂ per tensor (its step count) and β1, w1 = 1−β1, β2, w2, decay = 1−lr·wd (f32)
// are computed on the host exactly as the spec (`Consts8`, `Scalars8`).
//
// Exact rounding: this file is compiled with --use_fast_math, under which nvcc emits even the
// _rn intrinsics, comparisons (setp) and min/max with .ftz (subnormals flushed). Every f32
// operation and comparison therefore goes through the one-instruction PTX helpers of
// ieee_f32.cuh (no .ftz, never contracted), absmax is a maximum of integer bit patterns, and
// finiteness and sign are bit tests; so given the same clip coefficient p, codes and absmax are
// bit-identical to the spec's. The norm and coefficient come from kernels/adamw.cu (`adamw_sumsq_f32`,
// `adamw_norm_f32`, launched on this optimizer's table), so they are the 32-bit path's.
//
// Layout: the table `AdamTensor` (48 bytes, the same struct as kernels/adamw.cu so its norm
// kernels read it): {p, g, m, v, n, chunk0}, m and v pointing at u8 codes (8-bit tensor) or f32
// moments (small tensor); `Adam8Absmax` {absmax₁, absmax₂} per tensor (null for an f32 tensor);
// per step `float2` {step_size, ε̂} per tensor. Codes of a tensor start at a multiple of 256
// bytes, so quantization block q of tensor t is codes [256q, 256q + 256) and absmax[q].
//
// Launch: grid = Σ_t ceil(n_t / 2048) blocks (adamw.cu's chunks), 256 threads = 8 warps; warp w
// of block b owns quantization block (b − chunk0_t)·8 + w of tensor t (binary search on chunk0)
// and exits when that block starts past n_t; lane l handles positions l + 32k, k < 8
// (coalesced). The maps are staged in shared memory (2 KiB); the block absmax is a warp
// reduction (shuffles), so no barrier follows the early exits. Nothing is written when the norm
// in clip[0] is not finite.
#include <cstdint>

#include "ieee_f32.cuh"

#define ADAMW8_THREADS 256
#define ADAMW8_BLOCK 256  // values per quantization block = one warp's share
#define ADAMW8_WARPS (ADAMW8_THREADS / 32)
#define ADAMW8_CHUNK (ADAMW8_WARPS * ADAMW8_BLOCK)  // 2048 = ADAMW_CHUNK of kernels/adamw.cu
#define ADAMW8_PER_LANE (ADAMW8_BLOCK / 32)

struct AdamTensor {
  float* p;
  const float* g;
  void* m;  // u8 codes or f32 moments
  void* v;
  int64_t n;
  int64_t chunk0;
};
static_assert(sizeof(AdamTensor) == 48, "table layout shared with kernels/adamw.cu and src/backend/cuda/adamw8.rs");

struct Adam8Absmax {
  float* m;  // null: the tensor keeps f32 moments
  float* v;
};
static_assert(sizeof(Adam8Absmax) == 16, "layout shared with src/backend/cuda/adamw8.rs");

__device__ __forceinline__ unsigned abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

// The tensor block b works on: the last t with chunk0 ≤ b (tab[0].chunk0 = 0 ≤ b).
__device__ __forceinline__ int find_tensor(const AdamTensor* __restrict__ tab, int T, int64_t b) {
  int lo = 0, hi = T;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tab[mid].chunk0 <= b) lo = mid;
    else hi = mid;
  }
  return lo;
}

// bnb's quantize_2D<SIGNED> (non-stochastic): binary search of the sorted map from index 127 in
// steps 64..1, then the nearer bracketing code by its midpoint (a + b)·0.5. Spec: `quantize_2d`.
template <bool SIGNED>
__device__ __forceinline__ int quantize_2d(const float* __restrict__ map, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = SIGNED ? -1.0f : 0.0f;
  float upper = 1.0f;
  float val = map[127];
#pragma unroll
  for (int i = 64; i > 0; i >>= 1) {
    if (f_gt(x, val)) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = map[pivot];
  }
  if (f_gt(x, val)) return f_gt(x, f_mul(f_add(upper, val), 0.5f)) ? upper_pivot : pivot;
  return f_lt(x, f_mul(f_add(lower, val), 0.5f)) ? lower_pivot : pivot;
}

// The m code: quantize_2d<signed>, then bnb's sign fix (spec: `quantize_m`).
__device__ __forceinline__ uint8_t quantize_m(const float* __restrict__ map1, float x, float m) {
  int c = quantize_2d<true>(map1, x);
  if ((__float_as_uint(map1[c]) >> 31) != (__float_as_uint(m) >> 31)) c = f_gt(m, 0.0f) ? c + 1 : c - 1;
  return (uint8_t)c;  // wraps as bnb's unsigned char
}

// Clip + 8-bit AdamW on this block's 8 quantization blocks (see the header).
extern "C" __global__ void __launch_bounds__(ADAMW8_THREADS)
    adamw8_update_f32(const AdamTensor* __restrict__ tab, const Adam8Absmax* __restrict__ amx,
                      const float2* __restrict__ scal, int T, const float* __restrict__ clip,
                      const float* __restrict__ maps, float beta1, float w1, float beta2, float w2,
                      float decay, int use_decay) {
  if (!finite_f32(clip[0])) return;  // uniform over the grid: before any barrier
  __shared__ float map1[256];
  __shared__ float map2[256];
  map1[threadIdx.x] = maps[threadIdx.x];
  map2[threadIdx.x] = maps[256 + threadIdx.x];
  __syncthreads();

  const float coef = clip[1];
  const int64_t b = blockIdx.x;
  const int t = find_tensor(tab, T, b);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = tab[t].n;
  const int64_t start = (b - tab[t].chunk0) * ADAMW8_CHUNK + (int64_t)warp * ADAMW8_BLOCK;
  if (start >= n) return;  // the tensor's last chunk is partial
  float* __restrict__ p = tab[t].p;
  const float* __restrict__ g = tab[t].g;
  const float2 s = scal[t];  // {step_size, eps_hat}
  float* am1 = amx[t].m;
  float* am2 = amx[t].v;

  if (am1 == nullptr) {
    // f32 moments (n < 4096): bnb's 32-bit rule (spec: `update_f32`).
    float* __restrict__ m = static_cast<float*>(tab[t].m);
    float* __restrict__ v = static_cast<float*>(tab[t].v);
#pragma unroll
    for (int k = 0; k < ADAMW8_PER_LANE; ++k) {
      const int64_t i = start + lane + 32 * k;
      if (i >= n) break;
      const float gi = f_mul(g[i], coef);
      const float mi = f_add(f_mul(m[i], beta1), f_mul(w1, gi));
      const float vi = f_add(f_mul(v[i], beta2), f_mul(w2, f_mul(gi, gi)));
      float pi = f_add(p[i], f_mul(s.x, f_div(mi, f_add(f_sqrt(vi), s.y))));
      if (use_decay) pi = f_mul(pi, decay);
      p[i] = pi;
      m[i] = mi;
      v[i] = vi;
    }
    return;
  }

  // 8-bit moments (spec: `update_q8`).
  uint8_t* __restrict__ mc = static_cast<uint8_t*>(tab[t].m);
  uint8_t* __restrict__ vc = static_cast<uint8_t*>(tab[t].v);
  const int64_t q = start / ADAMW8_BLOCK;
  const float a1 = am1[q], a2 = am2[q];
  float m[ADAMW8_PER_LANE], v[ADAMW8_PER_LANE];
  unsigned fin = 0;  // bit k: position k's g' is finite
  unsigned mx1 = 0, mx2 = 0;
#pragma unroll
  for (int k = 0; k < ADAMW8_PER_LANE; ++k) {
    const int64_t i = start + lane + 32 * k;
    float gi = 0.0f;
    int c1 = 128, c2 = 0;  // padding past n, as bnb's loads
    if (i < n) {
      gi = f_mul(g[i], coef);
      c1 = mc[i];
      c2 = vc[i];
    }
    if (finite_f32(gi)) {
      fin |= 1u << k;
      v[k] = f_add(f_mul(f_mul(map2[c2], a2), beta2), f_mul(f_mul(w2, gi), gi));
      m[k] = f_add(f_mul(f_mul(map1[c1], a1), beta1), f_mul(w1, gi));
    } else {
      m[k] = 0.0f;
      v[k] = 0.0f;
    }
    mx1 = max(mx1, abs_bits(m[k]));
    mx2 = max(mx2, abs_bits(v[k]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mx1 = max(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
    mx2 = max(mx2, __shfl_xor_sync(0xffffffffu, mx2, o));
  }
  const float n1 = __uint_as_float(mx1), n2 = __uint_as_float(mx2);
  // Every lane read a1, a2 before the shuffles above consumed values computed from them.
  if (lane == 0) {
    am1[q] = n1;
    am2[q] = n2;
  }
#pragma unroll
  for (int k = 0; k < ADAMW8_PER_LANE; ++k) {
    const int64_t i = start + lane + 32 * k;
    if (i >= n) break;
    if ((fin >> k) & 1u) {
      float pi = f_add(p[i], f_mul(s.x, f_div(m[k], f_add(f_sqrt(v[k]), s.y))));
      if (use_decay) pi = f_mul(pi, decay);
      p[i] = pi;
    }
    mc[i] = quantize_m(map1, f_div(m[k], n1), m[k]);
    vc[i] = (uint8_t)quantize_2d<false>(map2, f_div(v[k], n2));
  }
}
