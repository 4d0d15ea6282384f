// Rotary position embedding in place, transformers' rotate-half convention; CPU spec in
// src/backend/cpu/rope.rs, launcher in src/backend/cuda/ops.rs.
//   x is [rows, heads, d]; for pair i < d/2 at position p = positions[r], θ = p · inv_freq[i]
//   (f32 product): (x_i, x_{i+d/2}) ← (x_i cosθ − x_{i+d/2} sinθ, x_{i+d/2} cosθ + x_i sinθ)
//   sign = −1 gives the transpose (the backward).
// Launch: grid-stride over rows · heads · d/2 pairs. sincosf is the accurate (non-intrinsic)
// version, so results agree with the CPU to ~1 ulp of the angle.
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
    float s, c;
    sincosf(theta, &s, &c);
    s *= sign;
    float* h = x + rh * d;
    const float a = h[i], b = h[i + half];
    h[i] = a * c - b * s;
    h[i + half] = b * c + a * s;
  }
}
