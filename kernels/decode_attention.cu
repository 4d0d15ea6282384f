// Flash-decoding: causal grouped-query attention over a bf16 KV cache with the keys split across
// CTAs, plus the cache write. CPU spec (the split/combine math) in
// src/backend/cpu/decode_attention.rs, launcher in src/backend/cuda/decode_attention.rs.
//
//   q, out: [B, T, H, D] f32; k, v caches: [B, S, KV, D] bf16 bits (S = cache capacity), valid at
//   0..pos0+T. Query t of batch b, head h (kv head g = h / (H / KV)) at position p = pos0 + t:
//     s_j = (q · k_j) / sqrt(D),  j ≤ p;   out = Σ_j softmax(s)_j v_j      (f32 math)
//
// decode_attention_split_d{64,128}: grid (n_splits, KV, B · ceil(T / TQ)), 128 threads. One CTA
//   takes one (b, kv head g, block of TQ = 16 / G query positions) and keys
//   [split · split_len, min((split + 1) · split_len, pos0 + t_last + 1)): all G = H / KV query
//   heads of the group and all TQ positions (R = TQ · G ≤ 16 rows) share each K/V tile, so the
//   cache is read once per group, not once per head. Per tile of 64 keys: K, V → shared memory
//   (16-byte loads into registers, issued one tile ahead), scores S[r, j] (thread = key), an online softmax per row (warp = row), and
//   O[r, :] += P[r, :] · V (thread = bf16 pair of a column); m, l and the rescale e^{m−m'} as in
//   kernels/attention.cu. With n_splits = 1 the CTA writes out = O / l itself; otherwise the
//   partials (O unnormalised, m, l) go to part_o [B·T·H, n_splits, D] and part_ml
//   [B·T·H, n_splits, 2] (a split whose keys are all masked for a row writes m = −inf, l = 0,
//   O = 0) and decode_attention_combine merges them:
//     M = max_s m_s,  L = Σ_s l_s e^{m_s − M},  out = Σ_s O_s e^{m_s − M} / L.
// decode_attention_combine: grid B·T·H, D threads.
// kv_write_bf16: cache[off + i] = bf16(src[i]) (round to nearest even, NaN kept quiet), i < n.
//
// Device position (CUDA-graph decode steps, src/backend/cuda/step.rs): when `pos_dev` is not
// null the position is read from it instead of the pos0 / off arguments, so one captured launch
// serves every step. The split kernel then plans its own split (dec_split_plan, the device copy
// of split_plan) for pos0 + T keys over a grid sized for the whole cache: CTAs past the plan's
// n_splits exit at once, the combine recomputes the same plan and returns when it is one split
// (the split kernel normalised in place). kv_write_bf16 takes off = *pos_dev · stride.
#include "common.cuh"

#define DEC_THREADS 128
#define DEC_TK 64
#define DEC_MAX_ROWS 16
#define DEC_TARGET_CTAS 264  // src/backend/cpu/decode_attention.rs TARGET_CTAS

// split_plan of src/backend/cpu/decode_attention.rs: (split_len, n_splits) for n_keys keys when
// ctas CTAs exist without splitting.
__device__ __forceinline__ void dec_split_plan(int n_keys, int ctas, int* split_len, int* n_splits) {
  const int tiles = max(1, (n_keys + DEC_TK - 1) / DEC_TK);
  const int want = min(max((DEC_TARGET_CTAS + ctas - 1) / ctas, 1), tiles);
  *split_len = (tiles + want - 1) / want * DEC_TK;
  *n_splits = max(1, (n_keys + *split_len - 1) / *split_len);
}

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

__device__ __forceinline__ uint16_t f32_to_bf16_rne(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

extern "C" __global__ void kv_write_bf16(uint16_t* __restrict__ cache, const float* __restrict__ src,
                                         int64_t off, int64_t n, const uint32_t* __restrict__ pos_dev,
                                         int64_t stride) {
  if (pos_dev) off = (int64_t)*pos_dev * stride;
  GRID_STRIDE(i, n) { cache[off + i] = f32_to_bf16_rne(src[i]); }
}

// K, V tile at key kb → registers (16-byte loads: thread tid takes chunks tid + i·128 of the
// tile's 64 × D/8); keys past k_hi read as zeros.
template <int D, int NLD>
__device__ __forceinline__ void load_kv_tile(uint4 (&kr)[NLD], uint4 (&vr)[NLD],
                                             const uint16_t* __restrict__ k,
                                             const uint16_t* __restrict__ v, int stride, int kb,
                                             int k_hi) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int i = 0; i < NLD; i++) {
    const int c = threadIdx.x + i * DEC_THREADS, key = kb + c / CH;
    kr[i] = vr[i] = make_uint4(0u, 0u, 0u, 0u);
    if (key < k_hi) {
      const int64_t off = (int64_t)key * stride + (c % CH) * 8;
      kr[i] = *reinterpret_cast<const uint4*>(k + off);
      vr[i] = *reinterpret_cast<const uint4*>(v + off);
    }
  }
}

template <int D>
__device__ __forceinline__ void decode_split(float* __restrict__ out, float* __restrict__ part_o,
                                             float* __restrict__ part_ml, const float* __restrict__ q,
                                             const uint16_t* __restrict__ k,
                                             const uint16_t* __restrict__ v, int q_len, int pos0,
                                             int cap, int heads, int kv_heads, int split_len,
                                             int n_splits, const uint32_t* __restrict__ pos_dev) {
  constexpr int DW = D / 2;                      // bf16 pairs (32-bit words) per row
  constexpr int KS = DW + 1;                     // padded K row stride: conflict-free columns
  constexpr int CH = D / 8;                      // 16-byte chunks per row
  constexpr int NLD = DEC_TK * CH / DEC_THREADS; // chunks each thread loads per tile, K and V
  constexpr int RG_QK = DEC_THREADS / DEC_TK;    // row groups of the score phase
  constexpr int NQK = DEC_MAX_ROWS / RG_QK;
  constexpr int RG_PV = DEC_THREADS / DW;        // row groups of the P·V phase
  constexpr int NPV = DEC_MAX_ROWS / RG_PV;
  constexpr int WARPS = DEC_THREADS / 32;
  constexpr int NSM = DEC_MAX_ROWS / WARPS;      // rows per warp in the softmax phase
  __shared__ __align__(16) float qs[DEC_MAX_ROWS * D];
  __shared__ uint32_t ks[DEC_TK * KS];
  __shared__ __align__(16) uint32_t vs[DEC_TK * DW];
  __shared__ float ps[DEC_MAX_ROWS * DEC_TK];
  __shared__ float corr_s[DEC_MAX_ROWS];
  __shared__ float ml_s[2 * DEC_MAX_ROWS];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, g = blockIdx.y;
  if (pos_dev) {
    pos0 = (int)*pos_dev;
    dec_split_plan(pos0 + q_len, (int)(gridDim.y * gridDim.z), &split_len, &n_splits);
    if (split >= n_splits) return;  // the whole CTA: before any barrier
  }
  const int group = heads / kv_heads;
  const int tq = DEC_MAX_ROWS / group;
  const int n_qb = (q_len + tq - 1) / tq;
  const int b = blockIdx.z / n_qb, t0 = (int)(blockIdx.z % n_qb) * tq;
  const int t_end = min(q_len, t0 + tq);
  const int rows = (t_end - t0) * group;
  const int k_lo = split * split_len;
  const int k_hi = min(k_lo + split_len, pos0 + t_end);
  // Row r of this CTA is query position t0 + r / group, head g·group + r % group.
  auto qrow = [&](int r) -> int64_t {
    return ((int64_t)b * q_len + t0 + r / group) * heads + (int64_t)g * group + r % group;
  };

  const float scale = rsqrtf((float)D);
  for (int i = tid; i < DEC_MAX_ROWS * D; i += DEC_THREADS) {
    const int r = i / D;
    qs[i] = r < rows ? q[qrow(r) * D + i % D] * scale : 0.0f;
  }
  float m_r[NSM], l_r[NSM], o[NPV][2];
#pragma unroll
  for (int i = 0; i < NSM; i++) m_r[i] = -INFINITY, l_r[i] = 0.0f;
#pragma unroll
  for (int i = 0; i < NPV; i++) o[i][0] = o[i][1] = 0.0f;
  const int dw = tid % DW, rg_pv = tid / DW;
  const int jq = tid % DEC_TK, rg_qk = tid / DEC_TK;

  // The next tile's K, V loads are issued before this tile's math, so their latency overlaps it.
  uint4 kr[NLD], vr[NLD];
  const int64_t kv_base = ((int64_t)b * cap * kv_heads + g) * D;  // key 0 of (b, g)
  const uint16_t* kg = k + kv_base;
  const uint16_t* vg = v + kv_base;
  const int kv_stride = kv_heads * D;  // one position
  if (k_lo < k_hi) load_kv_tile<D, NLD>(kr, vr, kg, vg, kv_stride, k_lo, k_hi);
  for (int kb = k_lo; kb < k_hi; kb += DEC_TK) {
#pragma unroll
    for (int i = 0; i < NLD; i++) {
      const int c = tid + i * DEC_THREADS, j = c / CH, w = (c % CH) * 4;
      uint32_t* kd = ks + j * KS + w;
      kd[0] = kr[i].x, kd[1] = kr[i].y, kd[2] = kr[i].z, kd[3] = kr[i].w;
      *reinterpret_cast<uint4*>(vs + j * DW + w) = vr[i];
    }
    __syncthreads();
    if (kb + DEC_TK < k_hi) load_kv_tile<D, NLD>(kr, vr, kg, vg, kv_stride, kb + DEC_TK, k_hi);
    // Scores: thread = key jq, rows rg_qk + i·RG_QK; masked entries −inf.
    {
      float acc[NQK];
#pragma unroll
      for (int i = 0; i < NQK; i++) acc[i] = 0.0f;
      const uint32_t* kj = ks + jq * KS;
#pragma unroll 4
      for (int w = 0; w < DW; w++) {
        const uint32_t kw = kj[w];
        const float k0 = bf16_lo(kw), k1 = bf16_hi(kw);
#pragma unroll
        for (int i = 0; i < NQK; i++) {
          const int r = rg_qk + i * RG_QK;
          if (r < rows) {
            const float2 qq = *reinterpret_cast<const float2*>(qs + r * D + 2 * w);
            acc[i] += qq.x * k0 + qq.y * k1;
          }
        }
      }
      const int key = kb + jq;
#pragma unroll
      for (int i = 0; i < NQK; i++) {
        const int r = rg_qk + i * RG_QK;
        if (r < rows) {
          const bool ok = key < k_hi && key <= pos0 + t0 + r / group;
          ps[r * DEC_TK + jq] = ok ? acc[i] : -INFINITY;
        }
      }
    }
    __syncthreads();
    // Online softmax: warp = row (two keys per lane); P overwrites S, corr_s = e^{m − m'}.
#pragma unroll
    for (int i = 0; i < NSM; i++) {
      const int r = warp + i * WARPS;
      if (r < rows) {
        float* pr = ps + r * DEC_TK;
        const float s0 = pr[lane], s1 = pr[lane + 32];
        float mx = fmaxf(s0, s1);
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float mn = fmaxf(m_r[i], mx);
        float p0 = 0.0f, p1 = 0.0f, corr = 1.0f;
        if (mn != -INFINITY) {
          p0 = __expf(s0 - mn), p1 = __expf(s1 - mn), corr = __expf(m_r[i] - mn);
        }
        float sum = p0 + p1;
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        l_r[i] = l_r[i] * corr + sum;
        m_r[i] = mn;
        pr[lane] = p0, pr[lane + 32] = p1;
        if (lane == 0) corr_s[r] = corr;
      }
    }
    __syncthreads();
    // O = O·corr + P·V: thread = column pair dw, rows rg_pv + i·RG_PV.
    {
#pragma unroll
      for (int i = 0; i < NPV; i++) {
        const int r = rg_pv + i * RG_PV;
        if (r < rows) o[i][0] *= corr_s[r], o[i][1] *= corr_s[r];
      }
      const int nk = min(DEC_TK, k_hi - kb);
      for (int j = 0; j < nk; j++) {
        const uint32_t vw = vs[j * DW + dw];
        const float v0 = bf16_lo(vw), v1 = bf16_hi(vw);
#pragma unroll
        for (int i = 0; i < NPV; i++) {
          const int r = rg_pv + i * RG_PV;
          if (r < rows) {
            const float p = ps[r * DEC_TK + j];
            o[i][0] += p * v0, o[i][1] += p * v1;
          }
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < NSM; i++) {
    const int r = warp + i * WARPS;
    if (r < rows && lane == 0) ml_s[2 * r] = m_r[i], ml_s[2 * r + 1] = l_r[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NPV; i++) {
    const int r = rg_pv + i * RG_PV;
    if (r >= rows) continue;
    const int64_t qi = qrow(r);
    if (n_splits == 1) {
      const float inv = 1.0f / ml_s[2 * r + 1];
      out[qi * D + 2 * dw] = o[i][0] * inv;
      out[qi * D + 2 * dw + 1] = o[i][1] * inv;
    } else {
      const int64_t ps_row = qi * n_splits + split;
      part_o[ps_row * D + 2 * dw] = o[i][0];
      part_o[ps_row * D + 2 * dw + 1] = o[i][1];
      if (dw == 0) part_ml[2 * ps_row] = ml_s[2 * r], part_ml[2 * ps_row + 1] = ml_s[2 * r + 1];
    }
  }
}

#define DECODE_SPLIT(D)                                                                           \
  extern "C" __global__ void __launch_bounds__(DEC_THREADS, 2) decode_attention_split_d##D(      \
      float* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,           \
      const float* __restrict__ q, const uint16_t* __restrict__ k,                                \
      const uint16_t* __restrict__ v, int q_len, int pos0, int cap, int heads, int kv_heads,      \
      int split_len, int n_splits, const uint32_t* __restrict__ pos_dev) {                        \
    decode_split<D>(out, part_o, part_ml, q, k, v, q_len, pos0, cap, heads, kv_heads, split_len, \
                    n_splits, pos_dev);                                                           \
  }
DECODE_SPLIT(64)
DECODE_SPLIT(128)

extern "C" __global__ void decode_attention_combine(float* __restrict__ out,
                                                   const float* __restrict__ part_o,
                                                   const float* __restrict__ part_ml, int n_rows,
                                                   int n_splits, int d,
                                                   const uint32_t* __restrict__ pos_dev, int q_len,
                                                   int ctas) {
  const int64_t qi = blockIdx.x;
  if (qi >= n_rows) return;
  if (pos_dev) {
    int split_len;
    dec_split_plan((int)*pos_dev + q_len, ctas, &split_len, &n_splits);
    if (n_splits == 1) return;  // normalised in place by the split kernel
  }
  const float* ml = part_ml + qi * n_splits * 2;
  float mx = -INFINITY;
  for (int s = 0; s < n_splits; s++) mx = fmaxf(mx, ml[2 * s]);
  float l = 0.0f;
  for (int s = 0; s < n_splits; s++)
    if (ml[2 * s] != -INFINITY) l += ml[2 * s + 1] * __expf(ml[2 * s] - mx);
  const float inv = 1.0f / l;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < n_splits; s++)
      if (ml[2 * s] != -INFINITY) acc += part_o[(qi * n_splits + s) * d + e] * __expf(ml[2 * s] - mx);
    out[qi * d + e] = acc * inv;
  }
}
