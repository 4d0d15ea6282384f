// Token sampling on the device: greedy argmax, temperature, top-k, top-p and the draw, one row of
// logits in, one token id (4 bytes) out. CPU spec: src/backend/cpu/sample.rs (read it first: the
// order, the tie rules, the weights and the draw are defined there); launcher:
// src/backend/cuda/sample.rs.
//
// Shapes: logits [V] f32 (one row), out [1] u32. The uniform u ∈ [0, 1) comes from the host.
//
// The order as an integer. Each token i gets a 64-bit key whose descending order is the spec's
// order (z descending, index ascending on ties):
//   key32(z) = bits(z) with −0 → +0, then flipped to sort as unsigned (negatives inverted,
//              positives with the sign bit set);
//   key64(i) = key32(z_i) << 32 | (2³² − 1 − i),
// with z_i = canonical(x_i) / T by an IEEE division (inline PTX div.rn.f32: neither fast math
// nor flush-to-zero touches it), so z, ties and order equal the CPU's bit for bit. Every set the
// spec keeps is a prefix of this order, i.e. an interval [lo, hi] of keys.
//
// Weights as integers: w_i = ⌊e_i · 2⁴⁰⌋ with e_i = 1 when key32_i equals the maximum's key32,
// else __expf(z_i − m). Sums over ≤ 2¹⁷ tokens stay below 2⁵⁸, and integer sums are exact in any
// order, so the device is deterministic however threads interleave. A weight below 2⁻⁴⁰ is 0.
//
// The one primitive, search(target): among the keys in [lo, hi], the first token (in the order)
// whose cumulative weight, or count, reaches target. It is a descent over bins, one pass over the
// row per level: each pass histograms the candidates into 256 bins that are intervals of the
// order (weight or count, smallest and largest key per bin, shared-memory atomics), walks the
// bins from the top to the first non-empty one where the running sum reaches the target, and
// narrows [lo, hi] to that bin's [smallest, largest] key; a bin of one token ends it. Level 0
// bins by value (256 linear buckets over the candidates' z range, so a row spreads over many
// bins: the exponent bits alone would pile most of it onto a few addresses); later levels by the
// 8 key bits below the highest bit in which lo and hi differ, so they drop ≥ 8 bits each. At
// most 9 levels; 2–3 on a 32,000-token row (the emulator's count).
//
// sample_f32 (T > 0):
//   pass 0: lo, hi = smallest and largest key64 (block reduction);
//   top-k (0 < k < V): search(count ≥ k) → token x_k; lo = key64(x_k);
//   S = Σ w over [lo, hi] (block reduction);
//   top-p (p < 1): search(weight ≥ ⌈p·S⌉) → token x_p with cumulative weight M; lo = key64(x_p);
//   else M = S;
//   draw: search(weight ≥ ⌈u·M⌉) → the token (u = 0: target 0, the first token).
// argmax_f32 (greedy): the largest key64 of canonical(x_i) (no division), one block reduction.
//
// Versus the CPU: identical order and top-k; the top-p cut and the draw compare exact integer
// sums of __expf weights with ⌈p·S⌉ and ⌈u·M⌉, where the CPU compares f32 sequential sums of
// normalised libm-exp probabilities. They choose differently only when a cumulative probability
// lies within rounding distance of p or u (src/check/sample.rs measures that band).
//
// Launch: one block of SAMPLE_THREADS (1024) threads (a row is 128–512 KB, read from L2 once per
// pass: ~7 passes for top-k + top-p + draw on a 32,000-token row); static shared memory 6.3 KB
// (256 bins × 24 bytes, the reduction partials, the search state).
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_BINS 256

// 2⁴⁰: the weight of the maximum (e = 1).
#define SAMPLE_ONE 1099511627776.0f

typedef unsigned long long u64;

// NaN → −∞, then −0 → +0 (as bits), flipped to sort as unsigned.
__device__ __forceinline__ float sample_canonical(float x) {
  return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u ? -INFINITY : x;
}
__device__ __forceinline__ uint32_t sample_key32(float z) {
  uint32_t b = __float_as_uint(z);
  if ((b << 1) == 0u) b = 0u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float sample_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ u64 sample_key64(uint32_t k32, int64_t i) {
  return ((u64)k32 << 32) | (u64)(0xffffffffu - (uint32_t)i);
}
// Key of token i at temperature t (IEEE division, no flush-to-zero).
__device__ __forceinline__ u64 sample_key(const float* __restrict__ x, int64_t i, float t) {
  const float c = sample_canonical(x[i]);
  float z;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(z) : "f"(c), "f"(t));
  return sample_key64(sample_key32(z), i);
}
// Integer weight of a key given the maximum's key32 and value m.
__device__ __forceinline__ u64 sample_weight(u64 key, uint32_t mkey, float m) {
  const uint32_t k32 = (uint32_t)(key >> 32);
  if (k32 == mkey) return (u64)SAMPLE_ONE;
  return (u64)(__expf(sample_value(k32) - m) * SAMPLE_ONE);
}

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
  for (int o = 16; o > 0; o >>= 1) {
    const u64 w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
__device__ __forceinline__ u64 warp_min_u64(u64 v) {
  for (int o = 16; o > 0; o >>= 1) {
    const u64 w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}
__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide op over one u64 per thread (0: sum, 1: max, 2: min); every thread gets the result.
// `red` holds SAMPLE_THREADS / 32 partials; the call starts and ends with a barrier.
__device__ u64 block_u64(u64 v, int op, u64* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = op == 0 ? warp_sum_u64(v) : op == 1 ? warp_max_u64(v) : warp_min_u64(v);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const u64 none = op == 2 ? ~0ull : 0ull;
    u64 w = lane < (int)(blockDim.x >> 5) ? red[lane] : none;
    w = op == 0 ? warp_sum_u64(w) : op == 1 ? warp_max_u64(w) : warp_min_u64(w);
    if (lane == 0) red[0] = w;
  }
  __syncthreads();
  return red[0];
}

// What one block shares across the passes of a search.
struct SampleState {
  u64 lo, hi;   // the candidates' keys, inclusive
  u64 above;    // weight (or count) of the candidates ranked above [lo, hi]
  u64 found;    // the token's key, once found
  u64 cum;      // cumulative weight (or count) through the token
  int done;
};

// Bin of key k at the first level of a search: a linear bucket of z below the interval's top
// value zh, 255 for the top key itself. Non-decreasing in k (a rounded (zh − z)·c never grows
// with z), so every bin is an interval of the order; NaN, ∞ and overflow fall into bin 0.
__device__ __forceinline__ int sample_range_bin(u64 k, uint32_t hi32, float zh, float c) {
  const uint32_t k32 = (uint32_t)(k >> 32);
  if (k32 == hi32) return SAMPLE_BINS - 1;
  const float d = (zh - sample_value(k32)) * c;
  return d < (float)(SAMPLE_BINS - 1) ? SAMPLE_BINS - 1 - (int)d : 0;
}

// search(target) of the header over [st->lo, st->hi], with st->above = 0 on entry. Leaves
// st->found and st->cum. All threads call it; it starts and ends with a barrier.
//
// Level 0 bins the candidates by value (sample_range_bin: 256 buckets spanning their z range,
// so the row spreads over many bins instead of the few its exponent bits would give, which
// keeps the shared atomics from piling onto one address); later levels by the 8 key bits below
// the highest bit in which lo and hi differ. Each bin records its weight (or count), smallest
// and largest key, so the chosen bin's [kmin, kmax] is the next interval, tight; a bin with
// kmin = kmax holds one token.
__device__ void sample_search(const float* __restrict__ x, int64_t vocab, float t, uint32_t mkey,
                              float m, bool by_weight, u64 target, SampleState* st, u64* bw,
                              u64* kmin, u64* kmax) {
  const int lane = threadIdx.x & 31;
  __syncthreads();
  if (threadIdx.x == 0) st->done = 0;
  for (int level = 0; level < 10; level++) {
    __syncthreads();
    const u64 lo = st->lo, hi = st->hi;
    if (st->done) break;
    if (lo == hi) {  // one candidate left (only possible on entry)
      __syncthreads();
      if (threadIdx.x == 0) {
        st->found = lo;
        st->cum = st->above + (by_weight ? sample_weight(lo, mkey, m) : 1ull);
        st->done = 1;
      }
      continue;
    }
    const int hb = 63 - __clzll((long long)(lo ^ hi));
    const int shift = hb >= 7 ? hb - 7 : 0;
    const uint32_t hi32 = (uint32_t)(hi >> 32);
    const float zh = sample_value(hi32), span = zh - sample_value((uint32_t)(lo >> 32));
    // Buckets of span / 256; when the span is not finite (masked −∞ tokens, say) but the top
    // value is, buckets of 1/4 over [zh − 64, zh] (weights below e⁻⁶⁴ are 0 anyway).
    const bool zh_finite = (__float_as_uint(zh) & 0x7f800000u) != 0x7f800000u;
    const float c = span > 0.0f && span < 3.0e38f ? (float)SAMPLE_BINS / span
                    : zh_finite                   ? (float)SAMPLE_BINS / 64.0f
                                                  : 0.0f;
    for (int b = threadIdx.x; b < SAMPLE_BINS; b += blockDim.x) {
      bw[b] = 0ull;
      kmin[b] = ~0ull;
      kmax[b] = 0ull;
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const u64 k = sample_key(x, i, t);
      if (k < lo || k > hi) continue;
      const int d = level == 0 ? sample_range_bin(k, hi32, zh, c)
                               : (int)((k >> shift) & (SAMPLE_BINS - 1));
      atomicAdd(&bw[d], by_weight ? sample_weight(k, mkey, m) : 1ull);
      atomicMin(&kmin[d], k);
      atomicMax(&kmax[d], k);
    }
    __syncthreads();  // the histogram is complete
    if (threadIdx.x < 32) {
      // Lane l owns bins 255 − 8l … 248 − 8l (top first); exclusive scan of their sums.
      u64 local = 0;
      for (int j = 0; j < 8; j++) local += bw[SAMPLE_BINS - 1 - 8 * lane - j];
      u64 incl = local;
      for (int o = 1; o < 32; o <<= 1) {
        const u64 v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      u64 run = st->above + (incl - local);
      // Highest non-empty bin whose running sum reaches the target; the lowest non-empty bin
      // if none does (rounding: take the last candidate).
      int hit = -1, last = -1;
      u64 hit_above = 0, last_above = 0;
      for (int j = 0; j < 8; j++) {
        const int b = SAMPLE_BINS - 1 - 8 * lane - j;
        if (kmax[b] != 0ull) {  // no key is 0 (its index part is 2³² − 1 − i ≥ 1)
          if (hit < 0 && run + bw[b] >= target) {
            hit = b;
            hit_above = run;
          }
          last = b;
          last_above = run;
        }
        run += bw[b];
      }
      const u64 best_hit = warp_max_u64((u64)(hit + 1));  // 0: no lane hit
      const u64 lowest = ~warp_max_u64(~(u64)(last < 0 ? SAMPLE_BINS : last));
      const int b = best_hit ? (int)best_hit - 1 : (int)lowest;
      const bool mine = best_hit ? hit == b : last == b;
      if (mine) {
        const u64 above = best_hit ? hit_above : last_above;
        st->above = above;
        st->lo = kmin[b];
        st->hi = kmax[b];
        if (kmin[b] == kmax[b]) {
          st->found = kmax[b];
          st->cum = above + bw[b];
          st->done = 1;
        }
      }
    }
  }
  __syncthreads();
}

// The token id in a key64.
__device__ __forceinline__ uint32_t sample_index(u64 key) {
  return 0xffffffffu - (uint32_t)(key & 0xffffffffull);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    argmax_f32(const float* __restrict__ x, int64_t vocab, uint32_t* __restrict__ out) {
  __shared__ u64 red[SAMPLE_THREADS / 32];
  u64 best = 0ull;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const u64 k = sample_key64(sample_key32(sample_canonical(x[i])), i);
    best = k > best ? k : best;
  }
  best = block_u64(best, 1, red);
  if (threadIdx.x == 0) out[0] = sample_index(best);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_f32(const float* __restrict__ x, int64_t vocab, float temperature, int64_t top_k,
               float top_p, float u, uint32_t* __restrict__ out) {
  __shared__ u64 red[SAMPLE_THREADS / 32];
  __shared__ u64 bw[SAMPLE_BINS];
  __shared__ u64 kmin[SAMPLE_BINS];
  __shared__ u64 kmax[SAMPLE_BINS];
  __shared__ SampleState st;
  const float t = temperature;

  // Pass 0: the extreme keys.
  u64 k_lo = ~0ull, k_hi = 0ull;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const u64 k = sample_key(x, i, t);
    k_lo = k < k_lo ? k : k_lo;
    k_hi = k > k_hi ? k : k_hi;
  }
  const u64 hi = block_u64(k_hi, 1, red);
  const u64 lo_all = block_u64(k_lo, 2, red);
  const uint32_t mkey = (uint32_t)(hi >> 32);
  const float m = sample_value(mkey);
  if (threadIdx.x == 0) {
    st.lo = lo_all;
    st.hi = hi;
    st.above = 0ull;
  }

  // Top-k: the k-th token of the order bounds the candidates from below.
  if (top_k > 0 && top_k < vocab) {
    sample_search(x, vocab, t, mkey, m, false, (u64)top_k, &st, bw, kmin, kmax);
    if (threadIdx.x == 0) {
      st.lo = st.found;
      st.hi = hi;
      st.above = 0ull;
    }
  }
  __syncthreads();
  const u64 lo = st.lo;

  // S: the candidates' total weight.
  u64 s = 0ull;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const u64 k = sample_key(x, i, t);
    if (k >= lo) s += sample_weight(k, mkey, m);
  }
  u64 mass = block_u64(s, 0, red);

  // Top-p: the shortest prefix whose weight reaches ⌈p·S⌉.
  if (top_p < 1.0f) {
    const u64 target = (u64)ceil((double)top_p * (double)mass);
    sample_search(x, vocab, t, mkey, m, true, target, &st, bw, kmin, kmax);
    mass = st.cum;
    __syncthreads();
    if (threadIdx.x == 0) {
      st.hi = hi;
      st.lo = st.found;
      st.above = 0ull;
    }
  }

  // The draw.
  const u64 target = (u64)ceil((double)u * (double)mass);
  if (threadIdx.x == 0) {
    st.hi = hi;
    st.above = 0ull;
  }
  sample_search(x, vocab, t, mkey, m, true, target, &st, bw, kmin, kmax);
  if (threadIdx.x == 0) out[0] = sample_index(st.found);
}
