// Runs the grid-stride elementwise kernels under the host emulator: kernels/elementwise.cu
// (f32_to_bf16, bf16_to_f32, add_assign_f32, swiglu_f32, swiglu_backward_f32, embedding_f32,
// embedding_half, cross_entropy_f32), kernels/rope.cu (rope_f32, both signs),
// kernels/dropout.cu (dropout_mask_f32) and kernels/lora.cu (lora_keep_bf16, lora_dx_keep_f32),
// with the launch configurations of src/backend/cuda/ops.rs, dropout.rs and lora.rs (ops.rs
// `grid`: ⌈n / 256⌉ blocks of 256, clamped), against references written here from the kernels'
// headers and the CPU specs (src/backend/cpu/*.rs), not from the shim's helpers:
// - exact ops, bit for bit (the row counts the elements whose bits differ, bound 0): the bf16
//   conversions (round to nearest even from the value in f64: ties, overflow to ±inf, ±0, f32
//   subnormals; NaN must stay NaN, its payload is not specified: the GPU's cvt gives the
//   canonical NaN, the CPU's `half` crate and the shim keep the payload), the f16/bf16 widenings,
//   the residual add, the embedding gathers, the dropout mask (src/backend/cpu/dropout.rs's f32
//   decision `u < p`, ported below, against the kernel's integer threshold from the launcher),
//   and the LoRA mask steps (`bf16(x · keep)` with the product rounded to f32, and
//   `fma(keep, ga, dx)`, the spec's one rounding);
// - fast-math ops (SwiGLU and its backward, RoPE, cross-entropy): f64 references, max rel err
//   against src/check/ops.rs's F32_REORDER = 1e-5 (a few ulp of __expf/__logf/division on the
//   device; the emulator's libm is within an ulp, so the figures printed here are the kernels'
//   f32 rounding alone, ~1e-7).
// Every output starts as a marker (7.25, bf16 bits 0xdead), so a skipped element fails; each
// kernel also runs once on a grid smaller than its work (the launchers clamp the grid at
// 65535·16 blocks, out of the emulator's reach: the cap here is a few blocks) so the
// grid-stride loop takes several steps, and with n = 0 where its launcher still launches.
// Add-type kernels (add_assign, lora_dx_keep) would show an element visited twice.
// f32 subnormal inputs are used only where the device does not flush them (the bf16 conversions
// and widenings, integer-only code): elementwise.cu builds with --use_fast_math (.ftz on f32
// arithmetic), so the residual add flushes them on the GPU, unlike this host.
#include "dropout.cu"
#include "elementwise.cu"
#include "lora.cu"
#include "rope.cu"

#include "driver.h"

using drv::Buf;
using std::vector;

namespace {

constexpr double kF32Reorder = 1e-5;  // src/check/ops.rs F32_REORDER
constexpr float kMarker = 7.25f;      // what a float output holds before the kernel writes it
constexpr uint16_t kMarker16 = 0xdead;
constexpr unsigned kThreads = 256;                 // ops.rs grid's block
constexpr unsigned kMaxBlocks = 65535u * 16;       // ops.rs grid's clamp
constexpr unsigned kStride = 3;                    // the grid-stride cases' clamp

// ops.rs grid(n): ⌈n / 256⌉ blocks clamped to [1, cap].
dim3 grid(size_t n, unsigned cap = kMaxBlocks) {
  return dim3((unsigned)std::clamp<size_t>((n + kThreads - 1) / kThreads, 1, cap));
}

uint32_t bits(float f) { return emu::f32_bits(f); }

// f32 → bf16 bits, round to nearest even, from the value: |x| is an integer multiple q of
// the bf16 ulp at its binade (exact in f64), q rounded with nearbyint (ties to even), a result
// at or past 2¹²⁸ is infinity. NaN gives a quiet NaN (callers compare NaNs as NaNs).
uint16_t ref_bf16(float x) {
  const uint16_t sign = (uint16_t)((bits(x) >> 16) & 0x8000u);
  if (std::isnan(x)) return sign | 0x7fc0u;
  if (std::isinf(x)) return sign | 0x7f80u;
  const double a = std::fabs((double)x);
  if (a == 0) return sign;
  int e;
  std::frexp(a, &e);  // a = f · 2^e, f ∈ [0.5, 1): leading bit 2^(e−1)
  const double ulp = std::ldexp(1.0, std::max(e - 1, -126) - 7);
  const double r = std::nearbyint(a / ulp) * ulp;
  if (r >= std::ldexp(1.0, 128)) return sign | 0x7f80u;
  const uint32_t rb = bits((float)r);
  if (rb & 0xffffu) std::abort();  // not a bf16 value: the reference is wrong
  return sign | (uint16_t)(rb >> 16);
}
float bf16_value(uint16_t b) { return emu::bits_f32((uint32_t)b << 16); }
bool is_nan16(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu); }

// IEEE half bits → f32 from the value: m·2⁻²⁴ (subnormal), (1024 + m)·2^(e−25), ±inf, NaN.
float ref_f16(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v = e == 0 ? std::ldexp((double)m, -24)
             : e == 31 ? (m ? NAN : INFINITY)
                       : std::ldexp(1024.0 + m, e - 25);
  return (float)((h & 0x8000u) ? -v : v);
}

// Elements whose bits differ; two NaNs match when `nan_any` (payload unspecified).
template <class T>
size_t mismatches(const vector<T>& got, const vector<T>& want, bool nan_any) {
  if (got.size() != want.size()) return std::max(got.size(), want.size());
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); i++) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) == 0) continue;
    if constexpr (sizeof(T) == 4) {
      float g, w;
      std::memcpy(&g, &got[i], 4);
      std::memcpy(&w, &want[i], 4);
      if (nan_any && std::isnan(g) && std::isnan(w)) continue;
    } else {
      uint16_t g, w;
      std::memcpy(&g, &got[i], 2);
      std::memcpy(&w, &want[i], 2);
      if (nan_any && is_nan16(g) && is_nan16(w)) continue;
    }
    bad++;
  }
  return bad;
}
vector<uint16_t> u16(const vector<__nv_bfloat16>& v) {
  vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); i++) o[i] = v[i].bits;
  return o;
}

// Conversion inputs: random values, ±0, ties (low 16 bits 0x8000 on random high halves, both
// parities), their neighbours, the largest finite bf16, values that round up to ±inf, ±inf,
// NaNs (quiet, signalling, negative) and, with `subnormals`, f32 subnormals.
vector<float> conversion_inputs(size_t n, uint64_t seed, bool subnormals) {
  vector<float> x = drv::test_values(seed, n, 4.0f);
  const uint32_t special[] = {0x00000000u, 0x80000000u, 0x00800000u, 0x3f808000u, 0x3f818000u,
                              0xbf80c001u, 0x7f7f0000u, 0x7f7f7fffu, 0x7f7f8000u, 0x7f7fffffu,
                              0xff7fffffu, 0x7f800000u, 0xff800000u, 0x7fc00000u, 0xffc00001u,
                              0x7f800001u, 0x7fffffffu, 0xff812345u, 0x00ff8000u, 0x80808000u};
  const uint32_t tiny_bits[] = {0x00000001u, 0x80018000u, 0x007f8000u, 0x00008000u,
                                0x00018000u, 0x807fffffu, 0x007fffffu};
  size_t k = 0;
  for (uint32_t s : special)
    if (k < n) x[k++] = emu::bits_f32(s);
  if (subnormals) {
    for (uint32_t s : tiny_bits)
      if (k < n) x[k++] = emu::bits_f32(s);
    for (float t : drv::test_values(seed + 1, 64, 1e-38f))
      if (k < n) x[k++] = t;
  }
  const uint32_t lows[] = {0x8000u, 0x7fffu, 0x8001u, 0x0000u, 0xffffu};
  for (int i = 0; i < 2000 && k < n; i++) {
    uint32_t hi = (uint32_t)(drv::splitmix64(seed ^ (uint64_t)i) >> 48);
    if ((hi & 0x7f80u) == 0x7f80u) hi ^= 0x4000u;  // keep ties finite
    if (!subnormals && (hi & 0x7f80u) == 0) hi |= 0x0080u;
    x[k++] = emu::bits_f32(hi << 16 | lows[i % 5]);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// f32_to_bf16 and bf16_to_f32 (the bf16 activation stash): out = bf16(x), out = x << 16.

void conversion_case(size_t n, unsigned cap, uint64_t seed) {
  const vector<float> x = conversion_inputs(n, seed, true);
  vector<uint16_t> want(n);
  for (size_t i = 0; i < n; i++) want[i] = ref_bf16(x[i]);
  Buf<float> gx(x);
  Buf<__nv_bfloat16> out(n, {kMarker16});
  const dim3 g = grid(n, cap);
  emu::launch("f32_to_bf16", g, kThreads, 0, [&] { f32_to_bf16(out, gx, (int64_t)n); });
  const vector<uint16_t> got = u16(out.get());
  drv::row(drv::fmt("f32_to_bf16 n=%zu grid %u (mismatches; NaN as NaN)", n, g.x),
           (double)mismatches(got, want, true), 0);
  // The round trip of the stash: bf16_to_f32(f32_to_bf16(x)) = bf16_round(x).
  Buf<uint16_t> gb(got);
  Buf<float> wide(n, kMarker);
  emu::launch("bf16_to_f32", g, kThreads, 0, [&] { bf16_to_f32(wide, gb, (int64_t)n); });
  vector<float> want_rt(n);
  for (size_t i = 0; i < n; i++) want_rt[i] = bf16_value(want[i]);
  drv::row(drv::fmt("bf16_to_f32(f32_to_bf16(x)) = bf16_round(x) n=%zu grid %u (mismatches)", n,
                    g.x),
           (double)mismatches(wide.get(), want_rt, true), 0);
}

// A sweep of the f32 bit space: pattern i · 16411 (mod 2³²), every sign, exponent and rounding
// position, subnormals and NaNs included.
void conversion_sweep_case(size_t n) {
  vector<float> x(n);
  vector<uint16_t> want(n);
  for (size_t i = 0; i < n; i++) {
    x[i] = emu::bits_f32((uint32_t)(i * 16411u));
    want[i] = ref_bf16(x[i]);
  }
  Buf<float> gx(x);
  Buf<__nv_bfloat16> out(n, {kMarker16});
  const dim3 g = grid(n);
  emu::launch("f32_to_bf16", g, kThreads, 0, [&] { f32_to_bf16(out, gx, (int64_t)n); });
  drv::row(drv::fmt("f32_to_bf16 sweep of %zu f32 patterns grid %u (mismatches; NaN as NaN)", n,
                    g.x),
           (double)mismatches(u16(out.get()), want, true), 0);
}

// Every bf16 pattern widened (NaN payloads kept: the spec is the shift), on the launcher's
// grid and a clamped one.
void widen_all_case() {
  vector<uint16_t> all(65536);
  vector<float> want(65536);
  for (uint32_t b = 0; b < 65536; b++) {
    all[b] = (uint16_t)b;
    want[b] = std::isnan(bf16_value((uint16_t)b)) ? bf16_value((uint16_t)b)
                                                  : (float)((double)bf16_value((uint16_t)b));
  }
  Buf<uint16_t> gb(all);
  for (unsigned cap : {kMaxBlocks, 5u}) {
    Buf<float> out(65536, kMarker);
    const dim3 g = grid(65536, cap);
    emu::launch("bf16_to_f32", g, kThreads, 0, [&] { bf16_to_f32(out, gb, 65536); });
    drv::row(drv::fmt("bf16_to_f32 all 65536 patterns grid %u (mismatches, NaN bits too)", g.x),
             (double)mismatches(out.get(), want, false), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// add_assign_f32: x += y (f32 RNE add; f64 sum of two f32 rounded once is the same, 53 ≥ 2·24+2).

void add_case(size_t n, unsigned cap, uint64_t seed) {
  vector<float> x = drv::test_values(seed, n, 3.0f), y = drv::test_values(seed + 1, n, 3.0f);
  // +0 + −0, −0 + −0, cancellation (+0), overflow to inf, inf + finite.
  const float sx[] = {0.0f, -0.0f, 1.5f, 3e38f, -3e38f, INFINITY, -2.0f};
  const float sy[] = {-0.0f, -0.0f, -1.5f, 3e38f, -3e38f, 1.0f, 1e-3f};
  for (size_t k = 0; k < 7 && k < n; k++) x[k] = sx[k], y[k] = sy[k];
  vector<float> want(n);
  for (size_t i = 0; i < n; i++) want[i] = (float)((double)x[i] + (double)y[i]);
  Buf<float> gx(x), gy(y);
  const dim3 g = grid(n, cap);
  emu::launch("add_assign_f32", g, kThreads, 0, [&] { add_assign_f32(gx, gy, (int64_t)n); });
  drv::row(drv::fmt("add_assign_f32 n=%zu grid %u (mismatches)", n, g.x),
           (double)mismatches(gx.get(), want, false), 0);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: out = g·σ(g)·u; backward dgate = dh·u·σ·(1 + g(1 − σ)), dup = dh·g·σ (f64).

void swiglu_case(size_t n, unsigned cap, uint64_t seed) {
  vector<float> gate = drv::test_values(seed, n, 8.0f);
  // src/check/ops.rs SWIGLU_EXTREMES: saturated sigmoid, exp(−g) overflow (σ = 0, finite).
  const float ext[] = {-100.0f, -88.5f, -30.0f, -10.0f, 0.0f, 10.0f, 30.0f, 100.0f};
  if (n > 8) std::copy(ext, ext + 8, gate.begin());
  const vector<float> up = drv::test_values(seed + 1, n, 2.0f), dh = drv::test_values(seed + 2, n, 1.0f);
  vector<double> want(n), want_dg(n), want_du(n);
  for (size_t i = 0; i < n; i++) {
    const double g = gate[i], s = 1.0 / (1.0 + std::exp(-g));
    want[i] = g * s * up[i];
    want_dg[i] = dh[i] * up[i] * s * (1.0 + g * (1.0 - s));
    want_du[i] = dh[i] * g * s;
  }
  Buf<float> gg(gate), gu(up), gd(dh), out(n, kMarker), dg(n, kMarker), du(n, kMarker);
  const dim3 g = grid(n, cap);
  emu::launch("swiglu_f32", g, kThreads, 0, [&] { swiglu_f32(out, gg, gu, (int64_t)n); });
  emu::launch("swiglu_backward_f32", g, kThreads, 0,
              [&] { swiglu_backward_f32(dg, du, gd, gg, gu, (int64_t)n); });
  drv::row(drv::fmt("swiglu_f32 n=%zu grid %u", n, g.x), drv::max_rel_err(out.get(), want),
           kF32Reorder);
  drv::row(drv::fmt("swiglu_backward_f32 dgate, dup n=%zu grid %u", n, g.x),
           std::max(drv::max_rel_err(dg.get(), want_dg), drv::max_rel_err(du.get(), want_du)),
           kF32Reorder);
}

// n = 0 where the launcher still launches (add_assign, to_half, swiglu: grid(0) is one block):
// nothing may be written.
void zero_length_case() {
  Buf<float> a(4, kMarker), b(4, 1.0f), c(4, 1.0f);
  Buf<__nv_bfloat16> h(4, {kMarker16});
  emu::launch("add_assign_f32", grid(0), kThreads, 0, [&] { add_assign_f32(a, b, 0); });
  emu::launch("swiglu_f32", grid(0), kThreads, 0, [&] { swiglu_f32(a, b, c, 0); });
  emu::launch("f32_to_bf16", grid(0), kThreads, 0, [&] { f32_to_bf16(h, b, 0); });
  size_t touched = 0;
  for (float v : a.get()) touched += bits(v) != bits(kMarker);
  for (uint16_t v : u16(h.get())) touched += v != kMarker16;
  drv::row("add_assign, swiglu, f32_to_bf16 at n=0 (values written)", (double)touched, 0);
}

// ---------------------------------------------------------------------------------------------
// Embedding gathers: out[r, j] = table[ids[r], j]; ids[0] = vocab − 1, ids[1] = 0.

vector<uint32_t> embedding_ids(int rows, int vocab, uint64_t seed) {
  vector<uint32_t> ids(rows);
  for (int r = 0; r < rows; r++)
    ids[r] = r == 0 ? vocab - 1 : r == 1 ? 0 : (uint32_t)(drv::splitmix64(seed ^ r) % vocab);
  return ids;
}

void embedding_case(int rows, int dim, int vocab, unsigned cap, uint64_t seed) {
  const size_t n = (size_t)rows * dim;
  const vector<uint32_t> ids = embedding_ids(rows, vocab, seed);
  vector<float> table = drv::test_values(seed + 1, (size_t)vocab * dim, 1.0f);
  table[(size_t)(vocab - 1) * dim] = -0.0f;  // a sign that a gather must keep
  vector<float> want(n);
  for (int r = 0; r < rows; r++)
    for (int j = 0; j < dim; j++) want[(size_t)r * dim + j] = table[(size_t)ids[r] * dim + j];
  Buf<float> gt(table), out(n, kMarker);
  Buf<uint32_t> gi(ids);
  const dim3 g = grid(n, cap);
  emu::launch("embedding_f32", g, kThreads, 0,
              [&] { embedding_f32(out, gt, gi, dim, rows); });
  drv::row(drv::fmt("embedding_f32 rows=%d dim=%d vocab=%d grid %u (mismatches)", rows, dim,
                    vocab, g.x),
           (double)mismatches(out.get(), want, false), 0);
}

// 16-bit tables: bf16 (the shift, every bit kept) and IEEE half (NaN as NaN). `all`: a
// [64, 1024] table holding every 16-bit pattern, gathered in full (ids a permutation).
void embedding_half_case(int rows, int dim, int vocab, unsigned cap, uint64_t seed, bool all) {
  const size_t n = (size_t)rows * dim;
  vector<uint32_t> ids = embedding_ids(rows, vocab, seed);
  if (all)
    for (int r = 0; r < rows; r++) ids[r] = (uint32_t)((r * 37 + vocab - 1) % vocab);
  vector<uint16_t> table((size_t)vocab * dim);
  for (size_t i = 0; i < table.size(); i++)
    table[i] = all ? (uint16_t)i : (uint16_t)(drv::splitmix64(seed ^ i) >> 48);
  for (int f16 = 0; f16 < 2; f16++) {
    vector<float> want(n);
    for (int r = 0; r < rows; r++)
      for (int j = 0; j < dim; j++) {
        const uint16_t b = table[(size_t)ids[r] * dim + j];
        want[(size_t)r * dim + j] = f16 ? ref_f16(b) : bf16_value(b);
      }
    Buf<uint16_t> gt(table);
    Buf<uint32_t> gi(ids);
    Buf<float> out(n, kMarker);
    const dim3 g = grid(n, cap);
    emu::launch("embedding_half", g, kThreads, 0,
                [&] { embedding_half(out, gt, gi, dim, rows, f16); });
    drv::row(drv::fmt("embedding_half %s rows=%d dim=%d vocab=%d grid %u (mismatches)",
                      f16 ? "f16" : "bf16", rows, dim, vocab, g.x),
             (double)mismatches(out.get(), want, f16 != 0), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// RoPE in place on [rows, heads, d]: θ = f32(p · inv_freq[i]); pair (i, i + d/2) rotated by
// θ (sign +1) or −θ (sign −1, the transpose), f64 reference from the same f32 θ.

vector<float> inv_freq(int d, double theta) {  // config.rs rope_inv_freq, no scaling
  vector<float> f(d / 2);
  for (int i = 0; i < d / 2; i++) f[i] = (float)(1.0 / std::pow(theta, 2.0 * i / d));
  return f;
}

void rope_case(int rows, int heads, int d, double theta, unsigned cap, uint64_t seed) {
  const int half = d / 2;
  const size_t n = (size_t)rows * heads * d;
  vector<uint32_t> pos(rows);
  const uint32_t fixed[] = {4095, 0, 1, 131071, 4094, 17};
  for (int r = 0; r < rows; r++)
    pos[r] = r < 6 ? fixed[r] : (uint32_t)(drv::splitmix64(seed ^ r) % 8192);
  const vector<float> x = drv::test_values(seed + 1, n, 2.0f), f = inv_freq(d, theta);
  Buf<uint32_t> gp(pos);
  Buf<float> gf(f);
  for (float sign : {1.0f, -1.0f}) {
    vector<double> want(n);
    for (int r = 0; r < rows; r++)
      for (int h = 0; h < heads; h++)
        for (int i = 0; i < half; i++) {
          const double t = (double)((float)pos[r] * f[i]);
          const double c = std::cos(t), s = sign * std::sin(t);
          const size_t o = ((size_t)r * heads + h) * d;
          const double a = x[o + i], b = x[o + i + half];
          want[o + i] = a * c - b * s;
          want[o + i + half] = b * c + a * s;
        }
    Buf<float> gx(x);
    const dim3 g = grid((size_t)rows * heads * half, cap);
    emu::launch("rope_f32", g, kThreads, 0, [&] { rope_f32(gx, gp, gf, heads, d, sign, rows); });
    drv::row(drv::fmt("rope_f32 sign %+.0f [%d, %d, %d] theta %.0f grid %u", sign, rows, heads, d,
                      theta, g.x),
             drv::max_rel_err(gx.get(), want), kF32Reorder);
  }
}

// ---------------------------------------------------------------------------------------------
// cross_entropy_f32: losses[r] = logsumexp(z[r]) − z[r, t], exactly 0 where t = −100; one block
// of 256 per row (ops.rs cross_entropy).

void cross_entropy_case(int rows, int vocab, uint64_t seed) {
  vector<int32_t> t(rows);
  for (int r = 0; r < rows; r++)  // src/check/ops.rs xent_targets
    t[r] = r == 0 ? vocab - 1
           : r == 1 ? 0
           : r % 5 == 3 ? -100
                        : (int32_t)(drv::splitmix64(seed ^ (uint64_t)r) % (uint64_t)vocab);
  vector<float> z = drv::test_values(seed + 1, (size_t)rows * vocab, 8.0f);
  if (vocab > 4)
    for (int j = 0; j < 4; j++) z[j] = -INFINITY;  // row 0: masked logits
  if (rows > 2) z[(size_t)2 * vocab + t[2]] += 30.0f;  // row 2: confident
  vector<double> want(rows, 0.0);
  for (int r = 0; r < rows; r++) {
    if (t[r] < 0) continue;
    const float* row = &z[(size_t)r * vocab];
    double m = -INFINITY, s = 0;
    for (int j = 0; j < vocab; j++) m = std::max(m, (double)row[j]);
    for (int j = 0; j < vocab; j++) s += std::exp(row[j] - m);
    want[r] = m + std::log(s) - row[t[r]];
  }
  Buf<float> gz(z), losses(rows, kMarker);
  Buf<int32_t> gt(t);
  emu::launch("cross_entropy_f32", dim3(rows), 256, 0,
              [&] { cross_entropy_f32(losses, gz, gt, vocab); });
  const vector<float> got = losses.get();
  bool ignored_nonzero = false;
  for (int r = 0; r < rows; r++) ignored_nonzero |= t[r] < 0 && bits(got[r]) != 0;
  drv::row(drv::fmt("cross_entropy_f32 loss [%d, %d] (-100 rows exactly 0)", rows, vocab),
           ignored_nonzero ? INFINITY : drv::max_rel_err(got, want), kF32Reorder);
}

// ---------------------------------------------------------------------------------------------
// Dropout mask: src/backend/cpu/dropout.rs ported (the f32 decision u < p, u = (z >> 40)·2⁻²⁴,
// kept value 1 / (1 − p) in f32) against the kernel with the launcher's (threshold, scale)
// (cuda/dropout.rs mask_params: ceil(p·2²⁴) in f64).

float spec_keep(uint64_t seed, uint64_t e, float p) {
  const uint64_t z = drv::splitmix64(seed ^ (e * 0x9E3779B97F4A7C15ull));
  const float u = (float)(z >> 40) * (1.0f / (float)(1ull << 24));
  return u < p ? 0.0f : 1.0f / (1.0f - p);
}

void dropout_case(float p, uint64_t seed, uint64_t offset, size_t len, unsigned cap) {
  vector<float> want(len);
  for (size_t i = 0; i < len; i++) want[i] = spec_keep(seed, offset + i, p);
  const uint32_t threshold = (uint32_t)std::ceil((double)p * (double)(1ull << 24));
  const float scale = 1.0f / (1.0f - p);
  Buf<float> keep(len, kMarker);
  const dim3 g = grid(len, cap);
  emu::launch("dropout_mask_f32", g, kThreads, 0, [&] {
    dropout_mask_f32(keep, (int64_t)len, seed, offset, threshold, scale);
  });
  size_t dropped = 0;
  for (float w : want) dropped += w == 0.0f;
  drv::row(drv::fmt("dropout_mask_f32 p=%.8g seed %.4llx.. offset %llu n=%zu grid %u (%zu dropped)", p,
                    (unsigned long long)(seed >> 48), (unsigned long long)offset, len, g.x, dropped),
           (double)mismatches(keep.get(), want, false), 0);
}

// ---------------------------------------------------------------------------------------------
// LoRA mask steps: out = bf16(f32(x · keep)), dx = fma(keep, ga, dx).

void lora_case(size_t n, unsigned cap, uint64_t seed) {
  vector<float> x = conversion_inputs(n, seed, false);  // no subnormals: .ftz
  vector<float> keep(n), ga = drv::test_values(seed + 2, n, 1.0f), dx = drv::test_values(seed + 3, n, 1.0f);
  for (size_t i = 0; i < n; i++) keep[i] = spec_keep(seed, i, 0.1f);
  // Products that are ties or round to inf only after the f32 rounding, and a non-mask keep.
  const float sx[] = {1.0f + 1.0f / 256.0f, 3e38f, 1.0f + 1.0f / 128.0f, -0.0f};
  const float sk[] = {1.0f, 1.5f, 1.0f + 1.0f / 256.0f, 1.0f / 0.9f};
  for (size_t k = 0; k < 4 && k < n; k++) x[k] = sx[k], keep[k] = sk[k];
  vector<uint16_t> want(n);
  vector<float> want_dx(n);
  for (size_t i = 0; i < n; i++) {
    want[i] = ref_bf16((float)((double)x[i] * (double)keep[i]));  // the product is exact in f64
    want_dx[i] = std::fma(keep[i], ga[i], dx[i]);
  }
  Buf<float> gx(x), gk(keep), gg(ga), gd(dx);
  Buf<__nv_bfloat16> out(n, {kMarker16});
  const dim3 g = grid(n, cap);
  emu::launch("lora_keep_bf16", g, kThreads, 0, [&] { lora_keep_bf16(out, gx, gk, (int64_t)n); });
  emu::launch("lora_dx_keep_f32", g, kThreads, 0,
              [&] { lora_dx_keep_f32(gd, gk, gg, (int64_t)n); });
  drv::row(drv::fmt("lora_keep_bf16 n=%zu grid %u (mismatches; NaN as NaN)", n, g.x),
           (double)mismatches(u16(out.get()), want, true), 0);
  drv::row(drv::fmt("lora_dx_keep_f32 n=%zu grid %u (mismatches)", n, g.x),
           (double)mismatches(gd.get(), want_dx, false), 0);
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  // Conversions: a partial block, a length not a multiple of 256, a grid-stride one.
  conversion_case(2100, kMaxBlocks, 10);
  conversion_case(20011, kMaxBlocks, 20);
  conversion_case(20011, kStride, 30);
  conversion_sweep_case(262144);
  widen_all_case();
  add_case(1, kMaxBlocks, 40);
  add_case(10007, kMaxBlocks, 50);
  add_case(5000, kStride, 60);
  swiglu_case(1, kMaxBlocks, 70);
  swiglu_case(17 * 48, kMaxBlocks, 80);
  swiglu_case(30011, kStride, 90);
  zero_length_case();
  // Embeddings: one row of one value, odd dims, a 4096-wide row, a grid-stride gather, every
  // 16-bit pattern.
  embedding_case(1, 1, 1, kMaxBlocks, 100);
  embedding_case(17, 33, 50, kMaxBlocks, 110);
  embedding_case(3, 4096, 64, kMaxBlocks, 120);
  embedding_case(9, 1000, 40, kStride, 130);
  embedding_half_case(1, 7, 5, kMaxBlocks, 140, false);
  embedding_half_case(13, 100, 31, kStride, 150, false);
  embedding_half_case(64, 1024, 64, kMaxBlocks, 160, true);
  // RoPE: d = 2, odd head counts, positions 0 to 131071, Llama 3's θ, a grid-stride case.
  rope_case(1, 1, 2, 10000.0, kMaxBlocks, 170);
  rope_case(6, 3, 64, 10000.0, kMaxBlocks, 180);
  rope_case(5, 5, 128, 500000.0, kMaxBlocks, 190);
  rope_case(9, 7, 128, 10000.0, kStride, 200);
  rope_case(16, 32, 128, 500000.0, kMaxBlocks, 205);  // a Llama 3 8B query block
  // Cross-entropy: vocab 1 (loss exactly 0), under a block, odd, Llama 2's 32000, Llama 3's
  // 128256.
  cross_entropy_case(1, 1, 210);
  cross_entropy_case(4, 100, 220);
  cross_entropy_case(7, 1001, 230);
  cross_entropy_case(9, 32000, 240);
  cross_entropy_case(3, 128256, 250);
  // Dropout: src/check/ops.rs's cases, p at the edges (0, the smallest subnormal, 2⁻²⁴, the
  // largest f32 below 1), seeds 0 and u64::MAX, an offset past 2⁴⁰, lengths 257 (a partial
  // second block) to 20011, a grid-stride mask.
  const uint64_t seed = 0x5EED0000D0D00001ull;
  dropout_case(0.1f, seed, 0, 100003, kMaxBlocks);
  dropout_case(0.1f, seed, 12345, 100003, kMaxBlocks);
  dropout_case(0.5f, seed, 0, 20011, kStride);
  // Seed 0 at offset 0: element 0 hashes to z = 0 (k = 0), dropped for every p > 0, kept at p = 0.
  dropout_case(0.0f, seed, 7, 1001, kMaxBlocks);
  dropout_case(0.0f, 0, 0, 1001, kMaxBlocks);
  dropout_case(1e-45f, 0, 0, 1001, kMaxBlocks);
  dropout_case(1.0f / 16777216.0f, 0, 0, 257, kMaxBlocks);
  dropout_case(0.7f, ~0ull, 1ull << 40, 3001, kMaxBlocks);
  dropout_case(0.99999994f, 42, 99, 3001, kMaxBlocks);
  // LoRA mask steps.
  lora_case(1, kMaxBlocks, 300);
  lora_case(4099, kMaxBlocks, 310);
  lora_case(4099, kStride, 320);
  return drv::finish("elementwise", t0);
}
