// Inverted-dropout mask from a counter-based hash; CPU spec in src/backend/cpu/dropout.rs
// (`dropout_mask`, `dropout_uniform`, `splitmix64`), launcher in src/backend/cuda/dropout.rs.
//
//   keep[i] = element e = offset + i of the mask (seed, p), i < len:
//   z = splitmix64(seed ⊕ (e · 0x9E3779B97F4A7C15))   (u64 arithmetic, wrapping)
//   k = z >> 40                                        (24 uniform bits; u = k · 2⁻²⁴ on the CPU)
//   keep[i] = k < threshold ? 0 : scale
//
// The kernel must be bit-identical to the CPU mask, so it does no floating-point arithmetic at
// all (fast math cannot touch it): the launcher computes, from the CPU's own definitions,
//   threshold = ceil(p · 2²⁴)   (in f64, exact: k · 2⁻²⁴ < p  ⇔  k < p · 2²⁴  ⇔  k < ceil(p · 2²⁴)
//                                for an integer k, including p = 0 and subnormal p)
//   scale     = 1 / (1 − p)     (f32, IEEE division, the CPU expression)
// The hash constants below (golden-ratio increment, the two SplitMix64 multipliers and the
// shifts 30, 27, 31, 40) MUST match src/backend/cpu/dropout.rs, which is their source;
// `qlora check` (src/check/ops.rs) compares the two masks bit for bit.
//
// Shapes: keep [len] f32. Launch: any 1-D grid (grid-stride loop), one element per step.
#include "common.cuh"

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

extern "C" __global__ void dropout_mask_f32(float* __restrict__ keep, int64_t len, uint64_t seed,
                                            uint64_t offset, uint32_t threshold, float scale) {
  GRID_STRIDE(i, len) {
    const uint64_t z = splitmix64(seed ^ ((offset + (uint64_t)i) * 0x9E3779B97F4A7C15ull));
    keep[i] = (uint32_t)(z >> 40) < threshold ? 0.0f : scale;
  }
}
