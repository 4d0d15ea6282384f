// Runs the decode-path kernels no other driver runs under the host emulator, with the launch
// configurations of their launchers:
// - kernels/dense_half.cu gemv_bf16w_f32 / gemv_f16w_f32 (src/backend/cuda/dense_half.rs
//   DeviceHalf::gemv: grid ceil(n / 16), 128 threads; m 1 ..= HALF_GEMV_MAX_M = 8, k % 8 == 0):
//   y[i, o] = Σ_j x[i, j] · f32(w[o, j]) against an f64 sum of the same operands (the weights
//   widened by the compiler's _Float16, resp. a 16-bit shift), bound 1e-5 relative to
//   max |want| as tests/cuda_ops.rs half_weights_are_lossless_and_match_the_cpu (f32 sums of
//   ≤ 1032 terms in another order: a few 1e-7; see src/check/ops.rs F32_REORDER). Two f16 cases
//   take values whose every partial sum is exact in f32 (|w| in [2¹⁴, 65504], all multiples of
//   16, with integer x; f16 subnormals with integer x), so any order gives the same bits: bound 0.
// - dense_half.cu f32_to_f16 (src/backend/cuda/ops.rs to_half: ops::grid(n), 256 threads) against
//   a port of half::f16::from_f32 (the CPU spec's conversion), bit for bit (a NaN as any NaN),
//   on every f16 value, the midpoints between neighbours (ties) and their f32 neighbours, the
//   subnormal range, overflow and specials. The port itself is checked against hand-derived
//   values and against g++'s _Float16 conversion (libgcc's soft-float, a third implementation).
// - kernels/nf4.cu nf4_dequant_f32 / nf4_dequant_bf16 (src/backend/cuda/nf4.rs dequantize and
//   nf4_gemm.rs dequantize_bf16: ops::grid(ceil(n / 8))) against src/quant/nf4.rs
//   dequantize_nf4 (nf4_ref.h's decoded values: NF4[c] · scale, the double-quant scale as
//   Absmax::decode forms it) bit for bit, and its bf16 rounding as half::bf16::from_f32 (ported
//   here, not the emulator's cvt); single and double quantization, blocksizes 32 .. 4096, element
//   counts below 8 and not a multiple of 8 (odd). One launch per kernel on a 1-block grid runs
//   the grid-stride loops more than once.
// - nf4.cu nf4_gemv_f32, the generic GEMV that DeviceNf4::gemv picks when k % 32 != 0 (grid
//   ceil(n / 8), 256 threads): y[i, o] = (accumulate ? y[i, o] : 0) + Σ_j x[i, j] · w[o, j]
//   against an f64 sum of the same f32 operands, bound 1e-5 relative to max |want| as
//   tests/cuda_ops.rs nf4_gemv_matches_the_cpu_kernel.
// Outputs start as NaN (f32, bf16) so an element the kernel does not write fails; f32_to_f16 runs
// twice, over outputs filled with 0x0000 and with 0xffff.
#include "dense_half.cu"
#include "nf4.cu"

#include <bit>

#include "nf4_ref.h"

using drv::Buf;
using std::vector;

namespace {

// src/check/ops.rs F32_REORDER; tests/cuda_ops.rs's bound for both GEMVs.
constexpr double kF32Reorder = 1e-5;

// half::f16::from_f32 (half 2.x's f32_to_f16_fallback): round to nearest even by the round bit and
// the sticky bits; NaN keeps its top payload bits and gets the quiet bit.
uint16_t spec_f16(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  const uint32_t sign = x & 0x80000000u, exp = x & 0x7f800000u, man = x & 0x007fffffu;
  if (exp == 0x7f800000u)
    return (uint16_t)((sign >> 16) | 0x7c00u | (man ? 0x0200u : 0u) | (man >> 13));
  const uint32_t half_sign = sign >> 16;
  const int half_exp = (int)(exp >> 23) - 127 + 15;
  if (half_exp >= 0x1f) return (uint16_t)(half_sign | 0x7c00u);
  if (half_exp <= 0) {
    if (14 - half_exp > 24) return (uint16_t)half_sign;
    const uint32_t m = man | 0x00800000u;
    uint32_t half_man = m >> (14 - half_exp);
    const uint32_t round_bit = 1u << (13 - half_exp);
    if ((m & round_bit) != 0 && (m & (3 * round_bit - 1)) != 0) half_man += 1;
    return (uint16_t)(half_sign | half_man);
  }
  const uint32_t half_e = (uint32_t)half_exp << 10, half_man = man >> 13, round_bit = 0x1000u;
  if ((man & round_bit) != 0 && (man & (3 * round_bit - 1)) != 0)
    return (uint16_t)((half_sign | half_e | half_man) + 1);  // a carry may reach inf: correct
  return (uint16_t)(half_sign | half_e | half_man);
}

// half::bf16::from_f32: the same rule on the top 16 bits.
uint16_t spec_bf16(float value) {
  const uint32_t x = std::bit_cast<uint32_t>(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u);
  const uint32_t round_bit = 0x8000u;
  if ((x & round_bit) != 0 && (x & (3 * round_bit - 1)) != 0) return (uint16_t)((x >> 16) + 1);
  return (uint16_t)(x >> 16);
}

bool f16_is_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
float f16_value(uint16_t h) { return (float)std::bit_cast<_Float16>(h); }  // compiler's widening
float bf16_value(uint16_t b) { return std::bit_cast<float>((uint32_t)b << 16); }

// Elements whose f16 bits differ from want (any NaN matching a NaN).
size_t count_f16_diff(const vector<uint16_t>& got, const vector<uint16_t>& want) {
  size_t bad = 0;
  for (size_t i = 0; i < want.size(); i++)
    bad += f16_is_nan(want[i]) ? !f16_is_nan(got[i]) : got[i] != want[i];
  return bad;
}

// src/backend/cuda/ops.rs grid(n): 256-thread blocks, ceil(n / 256) of them, at most 65535·16.
dim3 ops_grid(size_t n) {
  return dim3((unsigned)std::clamp<size_t>((n + 255) / 256, 1, (size_t)65535 * 16));
}

// ---------------------------------------------------------------------------------------------
// f32_to_f16.

void f32_to_f16_cases() {
  // Hand-derived: (input, f16 bits).
  const struct {
    float x;
    uint16_t h;
  } known[] = {
      {0.0f, 0x0000}, {-0.0f, 0x8000}, {1.0f, 0x3c00}, {0.1f, 0x2e66}, {-3.14159265f, 0xc248},
      {65504.0f, 0x7bff},                       // the largest finite f16
      {65519.996f, 0x7bff},                     // just below the tie with 2¹⁶
      {65520.0f, 0x7c00}, {-65520.0f, 0xfc00},  // the tie: to even, which is inf
      {1e10f, 0x7c00}, {INFINITY, 0x7c00}, {-INFINITY, 0xfc00},
      {0x1p-14f, 0x0400},                       // the smallest normal
      {0x1p-24f, 0x0001},                       // the smallest subnormal
      {0x1p-25f, 0x0000}, {-0x1p-25f, 0x8000},  // half of it: a tie, to even (±0)
      {0x1.000002p-25f, 0x0001},                // just above that tie
      {0x3p-25f, 0x0002}, {0x5p-25f, 0x0002},   // 1.5 and 2.5 units: ties to even
      {0x1.ffcp-15f, 0x0400},                   // 1023.5 units: tie, carry into the exponent
      {0x1.ffbffep-15f, 0x03ff},                // just below it
      {1e-30f, 0x0000}, {0x1p-149f, 0x0000},    // far below; an f32 subnormal
      {1.0f + 0x1p-11f, 0x3c00}, {1.0f + 0x3p-11f, 0x3c02},  // normal ties to even
      {2049.0f, 0x6800}, {2051.0f, 0x6802},                  // ties where the ulp is 2
  };
  vector<float> x;
  vector<uint16_t> hand;
  for (const auto& k : known) x.push_back(k.x), hand.push_back(k.h);
  // Every finite f16 magnitude p, the midpoint to p + 1 (a tie) and its two f32 neighbours, with
  // alternating signs; NaNs (quiet, signalling, negative) at the end.
  for (uint32_t p = 0; p < 0x7c00; p++) {
    const float sgn = (p & 1) ? -1.0f : 1.0f;
    const double lo = f16_value((uint16_t)p);
    const double hi = p == 0x7bff ? 65536.0 : f16_value((uint16_t)(p + 1));
    const float mid = (float)((lo + hi) / 2);  // exact: 12 significant bits
    x.push_back(sgn * (float)lo);
    x.push_back(sgn * mid);
    x.push_back(sgn * std::nextafter(mid, 0.0f));
    x.push_back(-sgn * std::nextafter(mid, INFINITY));
  }
  for (uint32_t b : {0x7fc00000u, 0x7f800001u, 0xffc00001u, 0x7fbfffffu, 0x7f802000u})
    x.push_back(std::bit_cast<float>(b));
  const size_t n = x.size();  // not a multiple of the 256-thread block
  vector<uint16_t> want(n), libgcc(n);
  for (size_t i = 0; i < n; i++) {
    want[i] = spec_f16(x[i]);
    libgcc[i] = std::bit_cast<uint16_t>((_Float16)x[i]);
  }
  size_t hand_bad = 0;
  for (size_t i = 0; i < hand.size(); i++) hand_bad += want[i] != hand[i];
  drv::row(drv::fmt("f16 spec port vs %zu hand-derived values (mismatches)", hand.size()),
           (double)hand_bad, 0);
  drv::row(drv::fmt("f16 spec port vs g++ _Float16, n=%zu (mismatches)", n),
           (double)count_f16_diff(libgcc, want), 0);
  Buf<float> gx(x);
  for (uint16_t fill : {(uint16_t)0x0000, (uint16_t)0xffff}) {
    Buf<uint16_t> out(n, fill);
    emu::launch("f32_to_f16", ops_grid(n), 256, 0,
                [&] { f32_to_f16((__half*)out.p, gx, (int64_t)n); });
    drv::row(drv::fmt("f32_to_f16 n=%zu, output filled 0x%04x (mismatches)", n, fill),
             (double)count_f16_diff(out.get(), want), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// nf4_dequant_f32 / nf4_dequant_bf16.

struct DequantCase {
  int rows, cols, blocksize;
  bool dq;
  int nested_blocksize;
};

void dequant_case(const DequantCase& c, uint64_t seed, bool one_block) {
  const drv::Nf4Weight t =
      drv::make_nf4(seed, c.rows, c.cols, c.blocksize, c.dq, c.nested_blocksize);
  const size_t n = (size_t)c.rows * c.cols;
  vector<uint16_t> want16(n);
  for (size_t i = 0; i < n; i++) want16[i] = spec_bf16(t.w[i]);
  drv::Nf4Device w(t);
  const dim3 grid = one_block ? dim3(1) : ops_grid((n + 7) / 8);
  const std::string shape =
      drv::fmt("n=%zu bs %d dq %d%s%s", n, c.blocksize, c.dq,
               c.dq ? drv::fmt("/%d", c.nested_blocksize).c_str() : "",
               one_block ? " (1-block grid)" : "");
  Buf<float> out(n, NAN);
  emu::launch("nf4_dequant_f32", grid, 256, 0, [&] {
    nf4_dequant_f32(out, w.packed, c.dq, w.absmax, w.q, w.nested_absmax, w.nested_code, t.offset,
                    t.nested_blocksize, t.blocksize_log2, (int64_t)n);
  });
  drv::row("nf4_dequant_f32 " + shape + " (mismatches)", (double)drv::count_diff(out.get(), t.w),
           0);
  Buf<uint16_t> out16(n, 0xffff);
  emu::launch("nf4_dequant_bf16", grid, 256, 0, [&] {
    nf4_dequant_bf16((__nv_bfloat16*)out16.p, w.packed, c.dq, w.absmax, w.q, w.nested_absmax,
                     w.nested_code, t.offset, t.nested_blocksize, t.blocksize_log2, (int64_t)n);
  });
  const vector<uint16_t> got16 = out16.get();
  size_t bad = 0;
  for (size_t i = 0; i < n; i++) bad += got16[i] != want16[i];
  drv::row("nf4_dequant_bf16 " + shape + " (mismatches)", (double)bad, 0);
}

// ---------------------------------------------------------------------------------------------
// gemv_bf16w_f32 / gemv_f16w_f32.

enum class Values { Random, NearRange, Subnormal };

struct HalfCase {
  int m, n, k;
  bool f16;
  Values values;
};

void half_gemv_case(const HalfCase& c, uint64_t seed) {
  const int M = c.m, N = c.n, K = c.k;
  const size_t nw = (size_t)N * K;
  vector<uint16_t> w(nw);
  vector<float> x = drv::test_values(seed + 1, (size_t)M * K, 1.0f);
  const vector<float> u = drv::test_values(seed, nw, 1.0f);
  for (size_t e = 0; e < nw; e++) {
    const uint64_t r = drv::splitmix64(seed + 7 + e);
    switch (c.values) {
      case Values::Random:  // as the test: values of amplitude 0.5 that the format holds exactly
        w[e] = c.f16 ? spec_f16(0.5f * u[e]) : spec_bf16(0.5f * u[e]);
        break;
      case Values::NearRange:  // f16 [0x7400, 0x7bff]: ±[2¹⁴, 65504], multiples of 16
        w[e] = (uint16_t)(0x7400u + r % 0x800u) | (uint16_t)((r >> 40 & 1) << 15);
        break;
      case Values::Subnormal:  // f16 0x0000 .. 0x03ff and negatives: m · 2⁻²⁴
        w[e] = (uint16_t)(r % 0x400u) | (uint16_t)((r >> 40 & 1) << 15);
        break;
    }
  }
  const bool exact = c.values != Values::Random;
  if (exact)  // integer x: −2 .. 2 (near range), −3 .. 3 (subnormal)
    for (float& v : x) v = std::round(v * (c.values == Values::NearRange ? 2.49f : 3.49f));
  vector<double> want((size_t)M * N);
  for (int i = 0; i < M; i++)
    for (int o = 0; o < N; o++) {
      double s = 0;
      for (int j = 0; j < K; j++) {
        const uint16_t b = w[(size_t)o * K + j];
        s += (double)x[(size_t)i * K + j] * (c.f16 ? f16_value(b) : bf16_value(b));
      }
      want[(size_t)i * N + o] = s;
    }
  Buf<uint16_t> gw(w);
  Buf<float> gx(x), y((size_t)M * N, NAN);
  const char* name = c.f16 ? "gemv_f16w_f32" : "gemv_bf16w_f32";
  emu::launch(name, dim3((N + 15) / 16), 128, 0, [&] {
    (c.f16 ? gemv_f16w_f32 : gemv_bf16w_f32)(y, gx, gw, M, N, K);
  });
  const char* what = c.values == Values::Random      ? ""
                     : c.values == Values::NearRange ? " |w| 2^14..65504, exact"
                                                     : " subnormal w, exact";
  const std::string label = drv::fmt("%s [%d,%d]x[%d,%d]%s", name, M, K, N, K, what);
  if (exact)
    drv::row(label + " (abs err)", drv::max_abs_err(y.get(), want), 0);
  else
    drv::row(label, drv::max_rel_err(y.get(), want), kF32Reorder);
}

// ---------------------------------------------------------------------------------------------
// nf4_gemv_f32 (k % 32 != 0).

struct Nf4GemvCase {
  int m, n, k, blocksize;
  bool dq;
  int nested_blocksize;
};

void nf4_gemv_case(const Nf4GemvCase& c, uint64_t seed) {
  const int M = c.m, N = c.n, K = c.k;
  // DeviceNf4::gemv takes the k32 kernel when k % 32 == 0 && blocksize >= 32.
  if (K % 32 == 0 && c.blocksize >= 32) std::abort();
  const drv::Nf4Weight t = drv::make_nf4(seed, N, K, c.blocksize, c.dq, c.nested_blocksize);
  const vector<float> x = drv::test_values(seed + 10, (size_t)M * K, 1.0f);
  const vector<float> y0 = drv::test_values(seed + 11, (size_t)M * N, 1.0f);
  drv::Nf4Device w(t);
  Buf<float> gx(x);
  for (int acc = 0; acc < 2; acc++) {
    vector<double> want((size_t)M * N);
    for (int i = 0; i < M; i++)
      for (int o = 0; o < N; o++) {
        double s = acc ? y0[(size_t)i * N + o] : 0.0;
        for (int j = 0; j < K; j++) s += (double)x[(size_t)i * K + j] * t.w[(size_t)o * K + j];
        want[(size_t)i * N + o] = s;
      }
    Buf<float> y((size_t)M * N, NAN);
    if (acc) std::copy(y0.begin(), y0.end(), y.p);
    emu::launch("nf4_gemv_f32", dim3((N + 7) / 8), 256, 0, [&] {
      nf4_gemv_f32(y, gx, w.packed, c.dq, w.absmax, w.q, w.nested_absmax, w.nested_code, t.offset,
                   t.nested_blocksize, t.blocksize_log2, M, N, K, acc);
    });
    drv::row(drv::fmt("nf4_gemv_f32 [%d,%d]x[%d,%d] bs %d dq %d acc %d", M, K, N, K, c.blocksize,
                      c.dq, acc),
             drv::max_rel_err(y.get(), want), kF32Reorder);
  }
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  f32_to_f16_cases();

  // (rows, cols, blocksize, double quant, nested blocksize): n < 8 (only the element-wise tail),
  // n = 8, odd n, n % 8 != 0 with a partial last block, blocksizes 32 .. 4096, nested blocks of
  // 256 (bitsandbytes) and 16.
  const DequantCase dq_cases[] = {
      {1, 7, 64, false, 256},   {1, 8, 32, true, 256},    {3, 333, 64, true, 256},
      {5, 200, 128, false, 256}, {13, 1056, 256, true, 16}, {2, 4099, 4096, true, 256},
      {64, 129, 64, true, 256}, {7, 111, 32, false, 256},
  };
  uint64_t seed = 6000;
  for (const DequantCase& c : dq_cases) dequant_case(c, seed += 100, false);
  dequant_case({9, 1001, 64, true, 256}, seed += 100, true);

  // (m, n, k, f16, values): m 1 ..= 8 for each format; n 1, 3, 16, 17, 37, 130 (not multiples of
  // the 16 rows a CTA takes nor of a warp's 4); k 8 (one lane busy), 136, 264, 520, 1032 (not
  // multiples of the 256 elements a warp step takes).
  const HalfCase half_cases[] = {
      {1, 1, 8, false, Values::Random},      {2, 37, 136, false, Values::Random},
      {3, 16, 264, false, Values::Random},   {4, 130, 1032, false, Values::Random},
      {5, 3, 8, false, Values::Random},      {6, 33, 520, false, Values::Random},
      {7, 17, 256, false, Values::Random},   {8, 64, 136, false, Values::Random},
      {1, 130, 264, true, Values::Random},   {2, 17, 8, true, Values::Random},
      {3, 1, 1032, true, Values::Random},    {4, 37, 136, true, Values::Random},
      {5, 64, 256, true, Values::Random},    {6, 3, 520, true, Values::Random},
      {7, 33, 136, true, Values::Random},    {8, 16, 264, true, Values::Random},
      {3, 37, 264, true, Values::NearRange}, {8, 20, 1032, true, Values::NearRange},
      {1, 19, 136, true, Values::Subnormal}, {8, 5, 520, true, Values::Subnormal},
  };
  for (const HalfCase& c : half_cases) half_gemv_case(c, seed += 100);

  // (m, n, k, blocksize, double quant, nested blocksize): k % 32 != 0 (odd k: rows start
  // mid-byte; k < 32: idle lanes), quantization blocks crossing rows, n not a multiple of the 8
  // rows a CTA takes.
  const Nf4GemvCase gemv_cases[] = {
      {1, 1, 33, 64, true, 256},   {2, 9, 100, 64, false, 256}, {3, 17, 200, 32, true, 16},
      {4, 37, 333, 128, true, 256}, {5, 8, 48, 64, false, 256}, {6, 20, 1000, 256, true, 256},
      {7, 13, 65, 4096, true, 256}, {8, 41, 7, 32, false, 256},
  };
  for (const Nf4GemvCase& c : gemv_cases) nf4_gemv_case(c, seed += 100);
  return drv::finish("dense_nf4", t0);
}
