// Causal grouped-query attention over a bf16 KV cache, flash-style (online softmax, no score
// matrix in global memory); CPU spec in src/backend/cpu/attention.rs, launcher in
// src/backend/cuda/ops.rs. The general path: head_dim 64 and 128 go to decode_attention.cu.
//   q, out: [B, T, H, D] f32; k, v caches: [B, S, KV, D] bf16 bits (S = cache capacity), valid
//   at 0..pos0+T; all math f32.
//   Query t of batch b, head h (kv head g = h / (H / KV)) at position p = pos0 + t:
//     s_j = (q · k_j) / sqrt(D),  j ≤ p;   out = Σ_j softmax(s)_j v_j
// Launch: one warp per (b, t, h), 4 warps per block; D ≤ 256 (each lane holds D/32 values of q
// and of the running output). Running max m and denominator l are rescaled as keys stream by:
//   m' = max(m, s), l' = l·e^{m−m'} + e^{s−m'}, o' = o·e^{m−m'} + e^{s−m'}·v_j;  out = o / l.
#include "common.cuh"

#define ATT_MAX_D 256

__device__ __forceinline__ float bf16_at(const uint16_t* p, int64_t i) {
  return __uint_as_float((uint32_t)p[i] << 16);
}

extern "C" __global__ void attention_bf16kv(float* __restrict__ out, const float* __restrict__ q,
                                            const uint16_t* __restrict__ k,
                                            const uint16_t* __restrict__ v, int batch, int q_len,
                                            int pos0, int cap, int heads, int kv_heads, int d,
                                            const uint32_t* __restrict__ pos_dev) {
  if (pos_dev) pos0 = (int)*pos_dev;  // a captured decode step (see decode_attention.cu)
  const int lane = threadIdx.x & 31;
  const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (w >= (int64_t)batch * q_len * heads) return;
  const int h = (int)(w % heads);
  const int t = (int)((w / heads) % q_len);
  const int b = (int)(w / ((int64_t)heads * q_len));
  const int g = h / (heads / kv_heads);
  const int p = pos0 + t;
  const int per = (d + 31) / 32;
  const float scale = rsqrtf((float)d);
  const float* qr = q + w * d;
  float qv[ATT_MAX_D / 32], o[ATT_MAX_D / 32];
#pragma unroll
  for (int c = 0; c < ATT_MAX_D / 32; c++) {
    const int e = c * 32 + lane;
    qv[c] = (c < per && e < d) ? qr[e] : 0.0f;
    o[c] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int j = 0; j <= p; j++) {
    const uint16_t* kr = k + (((int64_t)b * cap + j) * kv_heads + g) * d;
    const uint16_t* vr = v + (((int64_t)b * cap + j) * kv_heads + g) * d;
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < ATT_MAX_D / 32; c++) {
      const int e = c * 32 + lane;
      if (c < per && e < d) s += qv[c] * bf16_at(kr, e);
    }
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    s *= scale;
    const float mn = fmaxf(m, s);
    const float corr = expf(m - mn), e_s = expf(s - mn);
    l = l * corr + e_s;
#pragma unroll
    for (int c = 0; c < ATT_MAX_D / 32; c++) {
      const int e = c * 32 + lane;
      if (c < per && e < d) o[c] = o[c] * corr + e_s * bf16_at(vr, e);
    }
    m = mn;
  }
  float* orow = out + w * d;
#pragma unroll
  for (int c = 0; c < ATT_MAX_D / 32; c++) {
    const int e = c * 32 + lane;
    if (c < per && e < d) orow[e] = o[c] / l;
  }
}
