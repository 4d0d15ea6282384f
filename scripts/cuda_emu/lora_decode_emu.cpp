// Runs kernels/nf4.cu's decode GEMVs under the host emulator: nf4_gemv_f32_k32 (whose loop
// nf4_gemv_k32_acc the LoRA kernel shares) and LoRA at decode, lora_xa_f32 then
// nf4_gemv_lora_f32_k32:
//   y[i, o] = (accumulate ? y[i, o] : 0) + Σ_j x[i, j] · w[o, j] + s · Σ_c xa[i, c] · B[o, c],
//   xa[i, c] = Σ_j x[i, j] · A[c, j]
// against f64 sums of the same f32 operands (decoded NF4 values as nf4_ref.h computes them),
// bound 1e-4 relative to the result's scale as src/check/lora_decode.rs. Launch configurations
// as src/backend/cuda/nf4.rs and src/backend/cuda/lora_decode.rs.
#include "nf4.cu"

#include "nf4_ref.h"

using drv::Buf;
using std::vector;

namespace {

struct Case {
  int m, n, k, rank;
  bool dq;
};

void run_case(const Case& c, uint64_t seed) {
  const int M = c.m, N = c.n, K = c.k, R = c.rank;
  const drv::Nf4Weight t = drv::make_nf4(seed, N, K, 64, c.dq, 256);
  const vector<float> x = drv::test_values(seed + 10, (size_t)M * K, 1.0f);
  const vector<float> a = drv::test_values(seed + 11, (size_t)std::max(R, 1) * K, 0.05f);
  const vector<float> b = drv::test_values(seed + 12, (size_t)N * std::max(R, 1), 0.5f);
  const vector<float> y0 = drv::test_values(seed + 13, (size_t)M * N, 1.0f);
  const float s = 2.0f;
  vector<double> base((size_t)M * N), lora((size_t)M * N, 0.0), xa((size_t)M * std::max(R, 1));
  for (int i = 0; i < M; i++) {
    for (int r = 0; r < R; r++) {
      double v = 0;
      for (int j = 0; j < K; j++) v += (double)x[(size_t)i * K + j] * a[(size_t)r * K + j];
      xa[(size_t)i * R + r] = v;
    }
    for (int o = 0; o < N; o++) {
      double v = 0, l = 0;
      for (int j = 0; j < K; j++) v += (double)x[(size_t)i * K + j] * t.w[(size_t)o * K + j];
      for (int r = 0; r < R; r++) l += xa[(size_t)i * R + r] * b[(size_t)o * R + r];
      base[(size_t)i * N + o] = v;
      lora[(size_t)i * N + o] = s * l;
    }
  }
  drv::Nf4Device w(t);
  Buf<float> gx(x), ga(a), gb(b);
  const dim3 grid((N + 15) / 16);
  for (int acc = 0; acc < 2; acc++) {
    vector<double> want((size_t)M * N);
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
    for (size_t e = 0; e < want.size(); e++) want[e] += lora[e];
    Buf<float> y(y0), gxa((size_t)M * R, NAN);
    emu::launch("lora_xa_f32", dim3(R), 256, 0, [&] { lora_xa_f32(gxa, gx, ga, M, R, K); });
    emu::launch("nf4_gemv_lora_f32_k32", grid, 128, 0, [&] {
      nf4_gemv_lora_f32_k32(y, gx, w.packed, c.dq, w.absmax, w.q, w.nested_absmax, w.nested_code,
                            t.offset, t.nested_blocksize, t.blocksize_log2, M, N, K, acc, gxa, gb,
                            s, R);
    });
    drv::row(drv::fmt("nf4_gemv_lora_f32_k32 [%d,%d]x[%d,%d] r %d dq %d acc %d", M, K, N, K, R,
                      c.dq, acc),
             drv::max_rel_err(y.get(), want), 1e-4);
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
