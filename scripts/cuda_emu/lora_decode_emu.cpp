// Runs kernels/nf4.cu's decode GEMVs under the host emulator: nf4_gemv_f32_k32 (whose loop
// nf4_gemv_k32_acc the LoRA kernels share) and LoRA at decode, lora_xa_{f32,bf16} then
// nf4_gemv_lora_{f32,bf16}_k32:
//   y[i, o] = (accumulate ? y[i, o] : 0) + Σ_j x[i, j] · w[o, j] + s · Σ_c xa[i, c] · B[o, c],
//   xa[i, c] = Σ_j x[i, j] · A[c, j]
// against f64 sums of the same f32 operands (decoded NF4 values as nf4_ref.h computes them; for
// the bf16 kernels, A and B rounded to bf16 first, as the launcher's copies are), bound 1e-4
// relative to the result's scale as src/check/lora_decode.rs. The bf16 kernels' distance from
// the unrounded f32 adapter is a row too, bound 1e-2 (the rounding's effect, measured ≈ 1e-3:
// see src/check/lora_decode.rs). Launch configurations as src/backend/cuda/nf4.rs and
// src/backend/cuda/lora_decode.rs.
#include "nf4.cu"

#include "nf4_ref.h"

using drv::Buf;
using std::vector;

namespace {

struct Case {
  int m, n, k, rank;
  bool dq;
};

// bf16 bits of v (round to nearest even) and their value.
vector<uint16_t> to_bf16(const vector<float>& v) {
  vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); i++) out[i] = emu::bf16_bits(v[i]);
  return out;
}
vector<float> widen(const vector<uint16_t>& v) {
  vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); i++) out[i] = emu::bf16_float(v[i]);
  return out;
}

// s · (x·Aᵀ)·Bᵀ in f64, [M, N].
vector<double> lora_ref(const vector<float>& x, const vector<float>& a, const vector<float>& b,
                        int M, int N, int K, int R, float s) {
  vector<double> out((size_t)M * N, 0.0), xa((size_t)std::max(R, 1));
  for (int i = 0; i < M; i++) {
    for (int r = 0; r < R; r++) {
      double v = 0;
      for (int j = 0; j < K; j++) v += (double)x[(size_t)i * K + j] * a[(size_t)r * K + j];
      xa[r] = v;
    }
    for (int o = 0; o < N; o++) {
      double l = 0;
      for (int r = 0; r < R; r++) l += xa[r] * b[(size_t)o * R + r];
      out[(size_t)i * N + o] = s * l;
    }
  }
  return out;
}

void run_case(const Case& c, uint64_t seed) {
  const int M = c.m, N = c.n, K = c.k, R = c.rank;
  const drv::Nf4Weight t = drv::make_nf4(seed, N, K, 64, c.dq, 256);
  const vector<float> x = drv::test_values(seed + 10, (size_t)M * K, 1.0f);
  const vector<float> a = drv::test_values(seed + 11, (size_t)std::max(R, 1) * K, 0.05f);
  const vector<float> b = drv::test_values(seed + 12, (size_t)N * std::max(R, 1), 0.5f);
  const vector<float> y0 = drv::test_values(seed + 13, (size_t)M * N, 1.0f);
  const vector<uint16_t> a16 = to_bf16(a), b16 = to_bf16(b);
  const float s = 2.0f;
  vector<double> base((size_t)M * N);
  for (int i = 0; i < M; i++)
    for (int o = 0; o < N; o++) {
      double v = 0;
      for (int j = 0; j < K; j++) v += (double)x[(size_t)i * K + j] * t.w[(size_t)o * K + j];
      base[(size_t)i * N + o] = v;
    }
  const vector<double> lora = lora_ref(x, a, b, M, N, K, R, s);
  const vector<double> lora16 = lora_ref(x, widen(a16), widen(b16), M, N, K, R, s);
  drv::Nf4Device w(t);
  Buf<float> gx(x), ga(a), gb(b);
  Buf<uint16_t> ga16(a16), gb16(b16);
  const dim3 grid((N + 15) / 16);
  for (int acc = 0; acc < 2; acc++) {
    vector<double> want((size_t)M * N), want16((size_t)M * N);
    for (size_t e = 0; e < want.size(); e++) want[e] = (acc ? y0[e] : 0.0) + base[e];
    {
      Buf<float> y(y0);
      emu::launch("nf4_gemv_f32_k32", grid, 128, 0, [&] {
        nf4_gemv_f32_k32(y, gx, w.packed, c.dq, w.absmax, w.q, w.nested_absmax, w.nested_code,
                         t.offset, t.nested_blocksize, t.blocksize_log2, M, N, K, acc);
      });
      drv::row(drv::fmt("nf4_gemv_f32_k32 [%d,%d]x[%d,%d] dq %d acc %d", M, K, N, K, c.dq, acc),
               drv::max_rel_err(y.get(), want), 1e-5);
    }
    if (R == 0) continue;
    for (size_t e = 0; e < want.size(); e++) {
      want16[e] = want[e] + lora16[e];
      want[e] += lora[e];
    }
    {
      Buf<float> y(y0), gxa((size_t)M * R, NAN);
      emu::launch("lora_xa_f32", dim3(R), 256, 0, [&] { lora_xa_f32(gxa, gx, ga, M, R, K); });
      emu::launch("nf4_gemv_lora_f32_k32", grid, 128, 0, [&] {
        nf4_gemv_lora_f32_k32(y, gx, w.packed, c.dq, w.absmax, w.q, w.nested_absmax,
                              w.nested_code, t.offset, t.nested_blocksize, t.blocksize_log2, M, N,
                              K, acc, gxa, gb, s, R);
      });
      drv::row(drv::fmt("nf4_gemv_lora_f32_k32 [%d,%d]x[%d,%d] r %d dq %d acc %d", M, K, N, K, R,
                        c.dq, acc),
               drv::max_rel_err(y.get(), want), 1e-4);
    }
    Buf<float> y(y0), gxa((size_t)M * R, NAN);
    emu::launch("lora_xa_bf16", dim3(R), 256, 0, [&] { lora_xa_bf16(gxa, gx, ga16, M, R, K); });
    emu::launch("nf4_gemv_lora_bf16_k32", grid, 128, 0, [&] {
      nf4_gemv_lora_bf16_k32(y, gx, w.packed, c.dq, w.absmax, w.q, w.nested_absmax,
                             w.nested_code, t.offset, t.nested_blocksize, t.blocksize_log2, M, N,
                             K, acc, gxa, gb16, s, R);
    });
    const vector<float> got = y.get();
    const std::string what =
        drv::fmt("nf4_gemv_lora_bf16_k32 [%d,%d]x[%d,%d] r %d dq %d acc %d", M, K, N, K, R, c.dq, acc);
    drv::row(what, drv::max_rel_err(got, want16), 1e-4);
    drv::row(what + " vs f32 A,B", drv::max_rel_err(got, want), 1e-2);
  }
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  // (m, n, k, rank, double quant): ranks 1, 8, 33 (lanes with one and two ranks), 64; m 1, 2,
  // 3, 8; output rows that are not a multiple of the 16 a CTA takes nor of a warp's 4.
  const Case cases[] = {
      {1, 64, 256, 64, true}, {2, 37, 128, 33, false}, {3, 100, 96, 8, true},
      {8, 20, 64, 1, true},   {1, 50, 512, 16, false},
  };
  uint64_t seed = 4000;
  for (const Case& c : cases) run_case(c, seed += 100);
  return drv::finish("lora_decode", t0);
}
