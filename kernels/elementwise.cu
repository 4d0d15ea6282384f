// Elementwise ops of a Llama step; CPU spec in src/backend/cpu/elementwise.rs.
//   add_assign_f32: x[i] += y[i]                       (residual connection), i < n
//   swiglu_f32:     out[i] = silu(gate[i]) * up[i],    silu(g) = g / (1 + exp(-g)), i < n
//   f32_to_bf16:    out[i] = bf16(x[i]) (round to nearest even), i < n
// Launch: any 1-D grid; each kernel is a grid-stride loop.
#include <cuda_bf16.h>
#include "common.cuh"

extern "C" __global__ void f32_to_bf16(__nv_bfloat16* __restrict__ out, const float* __restrict__ x,
                                       int64_t n) {
  GRID_STRIDE(i, n) { out[i] = __float2bfloat16_rn(x[i]); }
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

// embedding_f32: out[r, j] = table[ids[r], j], r < rows, j < dim (ids checked on the host).
extern "C" __global__ void embedding_f32(float* __restrict__ out, const float* __restrict__ table,
                                         const uint32_t* __restrict__ ids, int64_t dim, int64_t rows) {
  GRID_STRIDE(i, rows * dim) {
    const int64_t r = i / dim, j = i % dim;
    out[i] = table[(int64_t)ids[r] * dim + j];
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
