// AdamW with 32-bit states over many tensors at once, with global gradient-norm clipping, bit
// for bit as the host optimizer. CPU spec: src/train/optim.rs (`clip_grad_norm`, `grad_norm`,
// `AdamW::update`, composed as in `CpuBackend::adamw_step`); launcher: src/backend/cuda/adamw.rs
// (`DeviceAdamW::step`, which also documents the paged state memory).
//
// Math, per tensor t of n_t elements (params p, grads g, moments m, v; f32 unless noted):
//   s_t   = Σ_i (f64)g_i²                                    (f64; summation order differs from
//                                                             the host's sequential sum)
//   N_t   = (f32)√s_t,  total = (f32)√(Σ_t (f64)N_t²)       (f64, t in order, as the host)
//   coef  = max_norm / (total + 1e-6) if max_norm > 0 and that is < 1, else 1 (f32)
//   if total is not finite: nothing is written (the launcher then leaves the step counts).
//   g'    = g·coef                                           (g·1 = g exactly)
//   p     = p·decay                   if weight_decay ≠ 0, decay = (f32)(1 − lr·wd)
//   m     = lerp(m, g', w1)           = fma(w1, g'−m, m) if |w1| < 0.5 else fma(w1−1, g'−m, g')
//   v     = (v·β2) + ((w2·g')·g')     w1 = (f32)(1−β1), w2 = (f32)(1−β2), two roundings each
//   p     = p + ((neg_step_t·m) / (√v / bc2_sqrt_t + eps))
// neg_step_t = (f32)(−lr / (1 − β1^k)) and bc2_sqrt_t = (f32)√(1 − β2^k) for the tensor's step
// k = steps_t + 1 are computed on the host in f64 exactly as `AdamW::update` does.
//
// Exact rounding: this file is compiled with --use_fast_math, under which nvcc emits even the
// __fadd_rn/__fmul_rn/__fdiv_rn/__fsqrt_rn/__fmaf_rn intrinsics and f32↔f64 conversions with
// .ftz (subnormal inputs and results flushed to zero), which would differ from the host as soon
// as a value is subnormal (v = w2·g² is, for |g| < ~3e-18). Every f32 operation of the math
// above therefore goes through the one-instruction PTX helpers of ieee_f32.cuh
// (add/sub/mul/div/sqrt/fma .rn without .ftz: IEEE-754 round-to-nearest-even, subnormals kept,
// never contracted or reassociated), and the f64 ones through __dadd_rn/__dmul_rn/__dsqrt_rn (f64 is never
// flushed; the intrinsics stop -fmad contraction). Given the same clip coefficient, p, m and v
// are then bit-identical to the host's; the returned norm may differ from the host's in its last
// bit(s) only through the order of the f64 sums.
//
// Table (`AdamTensor`, 48 bytes, built and uploaded by the launcher while the pointers stay the
// same): {p, g, m, v pointers, n, chunk0}. Tensor t is split into ceil(n_t / CHUNK) chunks of
// CHUNK = 2048 elements; chunk0 is the index of its first chunk (prefix sum), so block b of a
// multi-tensor launch works on the tensor with the last chunk0 ≤ b (binary search; tensors with
// n = 0 own no chunk) and on elements [(b − chunk0)·CHUNK, min(+CHUNK, n)). Per-step scalars
// (`float2` {neg_step, bc2_sqrt} per tensor) come in a second array, uploaded every step.
//
// Launches (one stream, in order; grid = Σ_t ceil(n_t / CHUNK) blocks of 256 threads):
//   1. adamw_sumsq_f32:  per block a f64 partial Σg² (warp shuffles, then shared memory), one
//                        f64 atomicAdd into sumsq[t] (zeroed by the launcher before).
//   2. adamw_norm_f32:   <<<1, 256>>>: N_t² per tensor in parallel (in place in sumsq), then
//                        thread 0 sums them in tensor order and writes out = {total, coef}.
//   3. adamw_update_f32: reads {total, coef} from device memory, returns at once when total is
//                        not finite, else applies clip + AdamW to its chunk (8 elements per
//                        thread, stride 256: coalesced).
#include <cstdint>

#include "ieee_f32.cuh"

#define ADAMW_THREADS 256
#define ADAMW_CHUNK 2048  // elements per block; src/backend/cuda/adamw.rs CHUNK must match

struct AdamTensor {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t n;
  int64_t chunk0;
};
static_assert(sizeof(AdamTensor) == 48, "table layout shared with src/backend/cuda/adamw.rs");

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

// sumsq[t] += Σ (f64)g² over this block's chunk of tensor t.
extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
    adamw_sumsq_f32(const AdamTensor* __restrict__ tab, int T, double* __restrict__ sumsq) {
  const int64_t b = blockIdx.x;
  const int t = find_tensor(tab, T, b);
  const float* __restrict__ g = tab[t].g;
  const int64_t start = (b - tab[t].chunk0) * ADAMW_CHUNK;
  const int64_t end = min(start + ADAMW_CHUNK, tab[t].n);
  double acc = 0.0;
#pragma unroll 4
  for (int64_t i = start + threadIdx.x; i < end; i += ADAMW_THREADS) {
    const double x = f_to_d(g[i]);
    acc = __dadd_rn(acc, __dmul_rn(x, x));  // x² is exact in f64
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc = __dadd_rn(acc, __shfl_down_sync(0xffffffffu, acc, o));
  __shared__ double warp_sum[ADAMW_THREADS / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sum[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = warp_sum[0];
#pragma unroll
    for (int w = 1; w < ADAMW_THREADS / 32; ++w) s = __dadd_rn(s, warp_sum[w]);
    atomicAdd(&sumsq[t], s);
  }
}

// out = {total, coef} from the per-tensor sums (one block; sumsq is overwritten with N_t²).
// `clip` = 0 (the host's max_norm is not > 0) gives coef = 1. The comparisons are made on the
// host (clip) or on the bits (c < 1: c ≥ 0 here, and fast math's setp/min.ftz would flush a
// subnormal c). A NaN c only arises from a non-finite total, for which adamw_update_f32 does
// nothing.
extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
    adamw_norm_f32(double* __restrict__ sumsq, int T, int clip, float max_norm,
                   float* __restrict__ out) {
  for (int t = threadIdx.x; t < T; t += blockDim.x) {
    const double n = f_to_d(d_to_f(__dsqrt_rn(sumsq[t])));  // per-tensor norm, rounded to f32
    sumsq[t] = __dmul_rn(n, n);
  }
  __syncthreads();  // makes the block's global writes visible to thread 0
  if (threadIdx.x != 0) return;
  double acc = 0.0;
  for (int t = 0; t < T; ++t) acc = __dadd_rn(acc, sumsq[t]);  // tensor order, as the host
  const float total = d_to_f(__dsqrt_rn(acc));
  float coef = 1.0f;
  if (clip) {
    const float c = f_div(max_norm, f_add(total, 1e-6f));
    if (__float_as_uint(c) < 0x3f800000u) coef = c;  // 0 ≤ c < 1
  }
  out[0] = total;
  out[1] = coef;
}

// Clip + AdamW on this block's chunk; nothing when the norm in clip[0] is not finite.
extern "C" __global__ void __launch_bounds__(ADAMW_THREADS)
    adamw_update_f32(const AdamTensor* __restrict__ tab, const float2* __restrict__ scal, int T,
                     const float* __restrict__ clip, float decay, int use_decay, int lerp_lo,
                     float w1, float w1m1, float beta2, float w2, float eps) {
  if (!finite_f32(clip[0])) return;
  const float coef = clip[1];
  const int64_t b = blockIdx.x;
  const int t = find_tensor(tab, T, b);
  float* __restrict__ p = tab[t].p;
  const float* __restrict__ g = tab[t].g;
  float* __restrict__ m = tab[t].m;
  float* __restrict__ v = tab[t].v;
  const int64_t start = (b - tab[t].chunk0) * ADAMW_CHUNK;
  const int64_t end = min(start + ADAMW_CHUNK, tab[t].n);
  const float2 s = scal[t];  // {neg_step, bc2_sqrt}
#pragma unroll 4
  for (int64_t i = start + threadIdx.x; i < end; i += ADAMW_THREADS) {
    const float gi = f_mul(g[i], coef);
    float pi = p[i];
    if (use_decay) pi = f_mul(pi, decay);
    float mi = m[i];
    const float d = f_sub(gi, mi);
    mi = lerp_lo ? f_fma(w1, d, mi) : f_fma(w1m1, d, gi);
    const float vi = f_add(f_mul(v[i], beta2), f_mul(f_mul(w2, gi), gi));
    const float denom = f_add(f_div(f_sqrt(vi), s.y), eps);
    pi = f_add(pi, f_div(f_mul(s.x, mi), denom));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}
