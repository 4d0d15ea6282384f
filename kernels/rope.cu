// Rotary position embedding in place, transformers' rotate-half convention; CPU spec in
// src/backend/cpu/rope.rs, launcher in src/backend/cuda/ops.rs.
//   x is [rows, heads, d]; for pair i < d/2 at position p = positions[r], θ = p · inv_freq[i]
//   (f32 product): (x_i, x_{i+d/2}) ← (x_i cosθ − x_{i+d/2} sinθ, x_{i+d/2} cosθ + x_i sinθ)
//   sign = −1 gives the transpose (the backward).
// Launch: grid-stride over rows · heads · d/2 pairs. The kernels build with --use_fast_math,
// which turns sincosf into the __sincosf intrinsic (far off for angles of thousands of radians),
// so sin and cos are computed in double from the f32 angle and rounded: within ~1 ulp of the
// CPU's f32 sin_cos at any position.
#include "common.cuh"

extern "C" __global__ void rope_f32(float* __restrict__ x, const uint32_t* __restrict__ positions,
                                    const float* __restrict__ inv_freq, int heads, int d,
                                    float sign, int64_t rows) {
  const int half = d / 2;
  GRID_STRIDE(t, rows * heads * half) {
    const int i = (int)(t % half);
    const int64_t rh = t / half;  // row * heads + head
    const int64_t r = rh / heads;
    const float theta = __fmul_rn((float)positions[r], inv_freq[i]);
    double sd, cd;
    sincos((double)theta, &sd, &cd);
    const float s = (float)sd * sign, c = (float)cd;
    float* h = x + rh * d;
    const float a = h[i], b = h[i + half];
    h[i] = a * c - b * s;
    h[i + half] = b * c + a * s;
  }
}
