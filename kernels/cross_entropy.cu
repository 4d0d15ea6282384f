// Fused cross-entropy loss + gradient, in place over the logits (llm.c's fused classifier: the
// probabilities never exist as a separate buffer). CPU spec: cross_entropy_fused in
// src/backend/cpu/backward/cross_entropy.rs; launcher: src/backend/cuda/cross_entropy.rs.
//
//   For each row r < rows with target t = targets[r] (z = logits[r, :], V = vocab):
//     t ≥ 0:    losses[r] = logsumexp(z) − z[t]                  (read before z is overwritten)
//               z[j]     ← scale · (softmax(z)_j − [j = t])      j < V
//     t = −100: losses[r] = 0, z ← 0                            (ignored position)
//   with logsumexp(z) = M + log S, M = max_j z[j], S = Σ_j exp(z[j] − M).
// Shapes: logits [rows, V] f32 row-major (read, then overwritten with dlogits), losses [rows]
// f32 (unscaled), targets [rows] i32, each −100 or in [0, V) (the launcher checks). Logits of
// −inf (masked tokens) get probability 0, as on the CPU, as long as z[t] is finite.
//
// Launch: one block of CE_THREADS (512) threads per row, grid = rows. Pass 1 reads the row once
// and keeps a running (max m, sum s) per thread (online softmax: a new maximum m' rescales
// s ← s·exp(m − m') + Σ exp(z − m')), f32; the block then merges the pairs with warp shuffles
// and one warp over the per-warp partials, (m, s) ⊕ (m', s') = (M, s·e^{m−M} + s'·e^{m'−M}).
// Pass 2 re-reads the row and writes the gradient. Two reads and one write of the row in all.
// Rows are read as float4 when V % 4 == 0 and the pointer is 16-byte aligned (Llama's 32,000,
// SmolLM2's 49,152, Llama 3's 128,256), else element by element.
//
// Accuracy: the CPU accumulates S in f64 with libm's exp; here S is f32 (a sequential sum of
// ≤ V / (4 · 512) float4 groups per thread, then a 9-level tree) with fast-math __expf
// (≲ 2 + 1.2·|x| ulp for an argument x ≤ 0). Both give ~1e-6 relative on the loss and on the
// large probabilities; small probabilities carry the same relative error, negligible in
// absolute terms.
#include "common.cuh"

#define CE_THREADS 512

struct MaxSum {
  float m, s;
};

// (m, s) ⊕ (m', s'): the pair of the union of two sets. A thread that saw no element holds
// (−inf, 0); two such give (−inf, 0) instead of NaN from (−inf) − (−inf).
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.0f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum w;
    w.m = __shfl_xor_sync(0xffffffffu, v.m, o);
    w.s = __shfl_xor_sync(0xffffffffu, v.s, o);
    v = merge(v, w);
  }
  return v;
}

// Adds four values to a running (m, s): one rescale per float4. Values of −inf (masked logits)
// add nothing; while every value seen is −inf the pair stays (−inf, 0).
__device__ __forceinline__ MaxSum add4(MaxSum a, float4 z) {
  const float m = fmaxf(fmaxf(a.m, fmaxf(z.x, z.y)), fmaxf(z.z, z.w));
  if (m == -INFINITY) return a;
  const float s = a.s * __expf(a.m - m) + __expf(z.x - m) + __expf(z.y - m) + __expf(z.z - m) +
                  __expf(z.w - m);
  return {m, s};
}

__device__ __forceinline__ MaxSum add1(MaxSum a, float z) {
  const float m = fmaxf(a.m, z);
  if (m == -INFINITY) return a;
  return {m, a.s * __expf(a.m - m) + __expf(z - m)};
}

extern "C" __global__ void __launch_bounds__(CE_THREADS)
    cross_entropy_fused_f32(float* __restrict__ logits, float* __restrict__ losses,
                            const int32_t* __restrict__ targets, int64_t vocab, float scale) {
  __shared__ MaxSum partial[CE_THREADS / 32];
  __shared__ float zt_shared;
  const int64_t r = blockIdx.x;
  float* row = logits + r * vocab;
  const int t = targets[r];  // block-uniform: the early return below keeps barriers uniform
  const bool vec = (vocab & 3) == 0 && ((uintptr_t)row & 15) == 0;
  const int64_t n4 = vec ? vocab >> 2 : 0;
  if (t < 0) {
    float4* row4 = reinterpret_cast<float4*>(row);
    for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) row4[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int64_t j = 4 * n4 + threadIdx.x; j < vocab; j += blockDim.x) row[j] = 0.0f;
    if (threadIdx.x == 0) losses[r] = 0.0f;
    return;
  }
  if (threadIdx.x == 0) zt_shared = row[t];  // before any thread overwrites the row

  // Pass 1: running (max, Σ exp) per thread, then over the block.
  MaxSum acc = {-INFINITY, 0.0f};
  const float4* row4 = reinterpret_cast<const float4*>(row);
  for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) acc = add4(acc, row4[j]);
  for (int64_t j = 4 * n4 + threadIdx.x; j < vocab; j += blockDim.x) acc = add1(acc, row[j]);
  acc = warp_merge(acc);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = acc;
  __syncthreads();  // also publishes zt_shared and orders its read before pass 2's writes
  if (warp == 0) {
    MaxSum v = lane < (int)(blockDim.x >> 5) ? partial[lane] : MaxSum{-INFINITY, 0.0f};
    v = warp_merge(v);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  const MaxSum tot = partial[0];
  // M − z[t] first: exact for a confident row (Sterbenz), where the loss is small.
  if (threadIdx.x == 0) losses[r] = (tot.m - zt_shared) + __logf(tot.s);

  // Pass 2: z ← exp(z − M) · (scale / S), then − scale at j = t (the CPU's order).
  const float f = scale / tot.s;
  float4* w4 = reinterpret_cast<float4*>(row);
  for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
    const float4 z = w4[j];
    float4 d = make_float4(__expf(z.x - tot.m) * f, __expf(z.y - tot.m) * f,
                           __expf(z.z - tot.m) * f, __expf(z.w - tot.m) * f);
    if (j == (t >> 2)) {
      const int c = t & 3;
      if (c == 0) d.x -= scale;
      else if (c == 1) d.y -= scale;
      else if (c == 2) d.z -= scale;
      else d.w -= scale;
    }
    w4[j] = d;
  }
  for (int64_t j = 4 * n4 + threadIdx.x; j < vocab; j += blockDim.x) {
    const float d = __expf(row[j] - tot.m) * f;
    row[j] = j == t ? d - scale : d;
  }
}
