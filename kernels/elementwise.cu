// Elementwise ops of a Llama step; CPU spec in src/backend/cpu/elementwise.rs.
//   add_assign_f32: x[i] += y[i]                       (residual connection), i < n
//   swiglu_f32:     out[i] = silu(gate[i]) * up[i],    silu(g) = g / (1 + exp(-g)), i < n
// Launch: any 1-D grid; each kernel is a grid-stride loop.
#include "common.cuh"

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
