// RMSNorm forward and backward; CPU specs in src/backend/cpu/rmsnorm.rs (forward) and
// src/backend/cpu/backward/rmsnorm.rs (backward), launchers in src/backend/cuda/rmsnorm.rs.
//
// rmsnorm_f32 (forward, inference and training):
//   out[r, j] = x[r, j] / sqrt(mean_j x[r, j]² + eps) * weight[j],   r < rows, j < dim
// Launch: one block of 256 threads per row; the sum of squares is reduced in f32 through warp
// shuffles and shared memory (the CPU sums sequentially, so results agree to rounding, ~1e-6).
//
// rmsnorm_backward_f32 (frozen weight: only dx, written, not accumulated):
//   rms_r = sqrt(mean_j x[r, j]² + eps),   dot_r = Σ_j w[j] · dy[r, j] · x[r, j]
//   dx[r, k] = w[k] · dy[r, k] / rms_r − x[r, k] · dot_r / (dim · rms_r³)
// Shapes: dx, dy, x [rows, dim] row-major, weight [dim]. dx must not alias dy or x.
// Launch: one block of RMS_BWD_THREADS (256) threads per row, grid = rows. Pass 1 accumulates
// both row sums per thread in f32 and reduces them together (warp shuffles, then one warp over
// the per-warp partials in shared memory); pass 2 re-reads the row and writes dx. Rows are read
// as float4 when dim % 4 == 0 and every pointer is 16-byte aligned (so is every row start),
// else element by element. The CPU sums sequentially, so the two agree to f32 rounding of the
// sums (~1e-6 relative; fast-math rsqrtf adds ~2 ulp).
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

#define RMS_BWD_THREADS 256

// (a, b) summed over the block; every thread gets the totals. `partial` holds 32 float2.
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* partial) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int s = 16; s > 0; s >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, s);
    b += __shfl_down_sync(0xffffffffu, b, s);
  }
  if (lane == 0) partial[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    float2 v = lane < (int)(blockDim.x >> 5) ? partial[lane] : make_float2(0.0f, 0.0f);
    for (int s = 16; s > 0; s >>= 1) {
      v.x += __shfl_down_sync(0xffffffffu, v.x, s);
      v.y += __shfl_down_sync(0xffffffffu, v.y, s);
    }
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

extern "C" __global__ void __launch_bounds__(RMS_BWD_THREADS)
    rmsnorm_backward_f32(float* __restrict__ dx, const float* __restrict__ dy,
                         const float* __restrict__ x, const float* __restrict__ weight, int dim,
                         float eps) {
  __shared__ float2 partial[32];
  const int64_t off = (int64_t)blockIdx.x * dim;
  const float* xr = x + off;
  const float* gr = dy + off;
  float* dxr = dx + off;
  const bool vec = (dim & 3) == 0 &&
                   (((uintptr_t)dx | (uintptr_t)dy | (uintptr_t)x | (uintptr_t)weight) & 15) == 0;
  float ss = 0.0f, dot = 0.0f;
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* g4 = reinterpret_cast<const float4*>(gr);
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    for (int j = threadIdx.x; j < (dim >> 2); j += blockDim.x) {
      const float4 v = x4[j], g = g4[j], w = w4[j];
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      dot += w.x * g.x * v.x + w.y * g.y * v.y + w.z * g.z * v.z + w.w * g.w * v.w;
    }
  } else {
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
      const float v = xr[j];
      ss += v * v;
      dot += weight[j] * gr[j] * v;
    }
  }
  const float2 sums = block_sum2(ss, dot, partial);
  const float inv = rsqrtf(sums.x / (float)dim + eps);  // 1 / rms
  const float c = sums.y * inv * inv * inv / (float)dim;  // dot / (dim · rms³)
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(xr);
    const float4* g4 = reinterpret_cast<const float4*>(gr);
    const float4* w4 = reinterpret_cast<const float4*>(weight);
    float4* d4 = reinterpret_cast<float4*>(dxr);
    for (int j = threadIdx.x; j < (dim >> 2); j += blockDim.x) {
      const float4 v = x4[j], g = g4[j], w = w4[j];
      d4[j] = make_float4(w.x * g.x * inv - v.x * c, w.y * g.y * inv - v.y * c,
                          w.z * g.z * inv - v.z * c, w.w * g.w * inv - v.w * c);
    }
  } else {
    for (int j = threadIdx.x; j < dim; j += blockDim.x) dxr[j] = weight[j] * gr[j] * inv - xr[j] * c;
  }
}
