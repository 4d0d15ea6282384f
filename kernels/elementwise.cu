// Elementwise ops of a Llama step; CPU spec in src/backend/cpu/elementwise.rs (forward),
// src/backend/cpu/backward/swiglu.rs (swiglu_backward_f32) and bf16_round in
// src/backend/cpu/nf4_gemm.rs (the bf16 pair); launchers in src/backend/cuda/ops.rs.
//   add_assign_f32:      x[i] += y[i]                       (residual connection), i < n
//   swiglu_f32:          out[i] = silu(gate[i]) * up[i],    silu(g) = g / (1 + exp(-g)), i < n
//   f32_to_bf16:         out[i] = bf16(x[i]) (round to nearest even), i < n
//   bf16_to_f32:         out[i] = f32(x[i]) for bf16 bits x (exact widening: the bits shifted
//                        up by 16, subnormals, infinities and NaN payloads included), i < n;
//                        bf16_to_f32(f32_to_bf16(v)) = bf16_round(v), the activation stash
//   swiglu_backward_f32: s = σ(gate[i]) = 1 / (1 + exp(-gate[i])),                     i < n
//                        dgate[i] = dh[i] * up[i] * s * (1 + gate[i] * (1 - s))   (silu')
//                        dup[i]   = dh[i] * gate[i] * s                           (silu)
//                        (written; outputs must not alias inputs). Fast math: __expf and the
//                        approximate reciprocal give ~1e-6 relative; exp overflow (gate < −88)
//                        gives s = 0 and finite zero gradients, as on the CPU.
// Launch: any 1-D grid; each kernel is a grid-stride loop.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

extern "C" __global__ void f32_to_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ x,
                                       int64_t n) {
  GRID_STRIDE(i, n) { out[i] = __float2bfloat16_rn(x[i]); }
}

extern "C" __global__ void bf16_to_f32(float* __restrict__ out, const uint16_t* __restrict__ x,
                                       int64_t n) {
  GRID_STRIDE(i, n) { out[i] = __uint_as_float((uint32_t)x[i] << 16); }
}

extern "C" __global__ void add_assign_f32(float* __restrict__ x, const float* __restrict__ y, int64_t n) {
  GRID_STRIDE(i, n) { x[i] += y[i]; }
}

extern "C" __global__ void swiglu_f32(float* __restrict__ out, const float* __restrict__ gate,
                                      const float* __restrict__ up, int64_t n) {
  GRID_STRIDE(i, n) {
    float g = gate[i];
    out[i] = g / (1.0f + __expf(-g)) * up[i];
  }
}

extern "C" __global__ void swiglu_backward_f32(float* __restrict__ dgate, float* __restrict__ dup,
                                               const float* __restrict__ dh,
                                               const float* __restrict__ gate,
                                               const float* __restrict__ up, int64_t n) {
  GRID_STRIDE(i, n) {
    const float g = gate[i], d = dh[i];
    const float s = 1.0f / (1.0f + __expf(-g));
    dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
    dup[i] = d * g * s;
  }
}

// embedding_f32: out[r, j] = table[ids[r], j], r < rows, j < dim (ids checked on the host).
extern "C" __global__ void embedding_f32(float* __restrict__ out, const float* __restrict__ table,
                                         const uint32_t* __restrict__ ids, int64_t dim, int64_t rows) {
  GRID_STRIDE(i, rows * dim) {
    const int64_t r = i / dim, j = i % dim;
    out[i] = table[(int64_t)ids[r] * dim + j];
  }
}

// embedding_half: out[r, j] = widen(table[ids[r], j]) for a 16-bit table: IEEE half when f16 != 0,
// else bf16 (bits << 16); both widenings are exact.
extern "C" __global__ void embedding_half(float* __restrict__ out, const uint16_t* __restrict__ table,
                                          const uint32_t* __restrict__ ids, int64_t dim, int64_t rows,
                                          int f16) {
  GRID_STRIDE(i, rows * dim) {
    const int64_t r = i / dim, j = i % dim;
    const uint16_t b = table[(int64_t)ids[r] * dim + j];
    out[i] = f16 ? __half2float(__ushort_as_half(b)) : __uint_as_float((uint32_t)b << 16);
  }
}

// cross_entropy_f32: losses[r] = logsumexp(z[r, :]) − z[r, t_r], 0 where t_r = −100.
// Launch: one block of 256 threads per row (max, then Σ exp(z − max), reduced in shared memory).
extern "C" __global__ void cross_entropy_f32(float* __restrict__ losses, const float* __restrict__ z,
                                             const int32_t* __restrict__ targets, int64_t vocab) {
  __shared__ float red[256];
  const int64_t r = blockIdx.x;
  const float* row = z + r * vocab;
  const int t = targets[r];
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
  red[threadIdx.x] = m;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  m = red[0];
  __syncthreads();
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(row[j] - m);
  red[threadIdx.x] = sum;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) losses[r] = t < 0 ? 0.0f : (m + logf(red[0])) - row[t];
}
