// Runs kernels/nf4_gemm.cu (both tile kernels) under the host emulator:
//   y[m, n] = (accumulate ? y[m, n] : 0) + Σ_k bf16(x[m, k]) · bf16(w[n, k])
// against an f64 sum of the same bf16 operands, with the measure and bound of
// tests/cuda_ops.rs (gemm_err): max |got − want| / (Σ_k |bf16(x)·bf16(w)| + 1e-6) ≤ 2e-5.
// Launch configurations as src/backend/cuda/nf4_gemm.rs (both tile kernels on every shape).
#include "nf4_gemm.cu"

#include "nf4_ref.h"

using drv::Buf;
using std::vector;

namespace {

struct Case {
  int m, n, k, blocksize;
  bool dq;
  int nested_blocksize;
};

void run_case(const Case& c, uint64_t seed) {
  const int M = c.m, N = c.n, K = c.k;
  const drv::Nf4Weight t = drv::make_nf4(seed, N, K, c.blocksize, c.dq, c.nested_blocksize);
  const vector<float> x = drv::test_values(seed + 10, (size_t)M * K, 1.5f);
  vector<double> dot((size_t)M * N), mag((size_t)M * N);
  for (int m = 0; m < M; m++)
    for (int n = 0; n < N; n++) {
      double s = 0, a = 0;
      for (int k = 0; k < K; k++) {
        const double p = (double)drv::bf16_round(x[(size_t)m * K + k]) *
                         (double)drv::bf16_round(t.w[(size_t)n * K + k]);
        s += p;
        a += std::fabs(p);
      }
      dot[(size_t)m * N + n] = s;
      mag[(size_t)m * N + n] = a + 1e-6;
    }
  drv::Nf4Device w(t);
  Buf<float> gx(x);
  for (int acc = 0; acc < 2; acc++) {
    const vector<float> y0 = drv::test_values(seed + 20 + acc, (size_t)M * N, 1.0f);
    for (int big = 0; big < 2; big++) {
      const int bm = big ? 128 : 32, bn = big ? 128 : 64, threads = big ? 256 : 128;
      Buf<float> y(y0);
      const dim3 grid((N + bn - 1) / bn, (M + bm - 1) / bm);
      const char* name = big ? "nf4_gemm_bf16_128x128" : "nf4_gemm_bf16_32x64";
      emu::launch(name, grid, threads, 0, [&] {
        auto f = big ? nf4_gemm_bf16_128x128 : nf4_gemm_bf16_32x64;
        f(y, gx, w.packed, c.dq, w.absmax, w.q, w.nested_absmax, w.nested_code, t.offset,
          t.nested_blocksize, t.blocksize_log2, M, N, K, acc);
      });
      const vector<float> got = y.get();
      double err = drv::all_finite(got) ? 0 : INFINITY;
      for (size_t i = 0; i < got.size() && std::isfinite(err); i++)
        err = std::max(err, std::fabs(got[i] - ((acc ? y0[i] : 0.0) + dot[i])) / mag[i]);
      drv::row(drv::fmt("%s [%d,%d]x[%d,%d] bs %d dq %d%s acc %d", name, M, K, N, K,
                        c.blocksize, c.dq,
                        c.dq ? drv::fmt("/%d", t.nested_blocksize).c_str() : "", acc),
               err, 2e-5);
    }
  }
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  // (m, n, k, blocksize, double quant, nested blocksize), from tests/cuda_ops.rs GEMM_CASES:
  // partial tiles in every dimension (m 9 .. 130 against 32- and 128-row tiles, n against 64-
  // and 128-wide ones), k a multiple of 16 but not of the 32-wide step (48, 208), quantization
  // blocks crossing W's rows.
  const Case cases[] = {
      {9, 33, 64, 64, true, 256},   {17, 75, 48, 64, false, 256}, {33, 130, 208, 64, true, 16},
      {64, 64, 128, 128, true, 256}, {65, 129, 96, 64, true, 256}, {130, 200, 256, 64, false, 256},
  };
  uint64_t seed = 3000;
  for (const Case& c : cases) run_case(c, seed += 100);
  return drv::finish("nf4_gemm", t0);
}
