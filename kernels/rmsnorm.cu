// RMSNorm; CPU spec in src/backend/cpu/rmsnorm.rs, launcher in src/backend/cuda/rmsnorm.rs.
//   out[r, j] = x[r, j] / sqrt(mean_j x[r, j]² + eps) * weight[j],   r < rows, j < dim
// Launch: one block of 256 threads per row; the sum of squares is reduced in f32 through warp
// shuffles and shared memory (the CPU sums sequentially, so results agree to rounding, ~1e-6).
#include "common.cuh"

extern "C" __global__ void rmsnorm_f32(float* __restrict__ out, const float* __restrict__ x,
                                       const float* __restrict__ weight, int dim, float eps) {
  __shared__ float partial[32];
  const float* row = x + (int64_t)blockIdx.x * dim;
  float* orow = out + (int64_t)blockIdx.x * dim;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) ss += row[j] * row[j];
  for (int s = 16; s > 0; s >>= 1) ss += __shfl_down_sync(0xffffffffu, ss, s);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
    for (int s = 16; s > 0; s >>= 1) v += __shfl_down_sync(0xffffffffu, v, s);
    if (threadIdx.x == 0) partial[0] = v;
  }
  __syncthreads();
  const float inv = rsqrtf(partial[0] / (float)dim + eps);
  for (int j = threadIdx.x; j < dim; j += blockDim.x) orow[j] = row[j] * inv * weight[j];
}
