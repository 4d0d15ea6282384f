// Runs kernels/nf4_gemm_dx.cu (both tile kernels) under the host emulator:
//   dx[m, k] = (accumulate ? dx[m, k] : 0) + Σ_n bf16(dy[m, n]) · bf16(w[n, k])
// against an f64 sum of the same bf16 operands, with the measure and bound of
// src/check/nf4_dx.rs: max |got − want| / (Σ_n |bf16(dy)·bf16(w)| + |dx₀| (accumulating) + 1e-6)
// ≤ 2e-5. Launch configurations as src/backend/cuda/nf4_gemm_dx.rs.
#include "nf4_gemm_dx.cu"

#include "nf4_ref.h"

using drv::Buf;
using std::vector;

namespace {

struct Case {
  int m, n, k, blocksize;
  bool dq, acc;
  int nested_blocksize;
};

void run_case(const Case& c, uint64_t seed) {
  const int M = c.m, N = c.n, K = c.k;
  const drv::Nf4Weight t = drv::make_nf4(seed, N, K, c.blocksize, c.dq, c.nested_blocksize);
  const vector<float> dy = drv::test_values(seed + 10, (size_t)M * N, 1.5f);
  const vector<float> dx0 = drv::test_values(seed + 11, (size_t)M * K, 1.0f);
  vector<double> want((size_t)M * K), mag((size_t)M * K);
  for (int m = 0; m < M; m++)
    for (int k = 0; k < K; k++) {
      double s = 0, a = 0;
      for (int n = 0; n < N; n++) {
        const double p = (double)drv::bf16_round(dy[(size_t)m * N + n]) *
                         (double)drv::bf16_round(t.w[(size_t)n * K + k]);
        s += p;
        a += std::fabs(p);
      }
      const size_t i = (size_t)m * K + k;
      want[i] = (c.acc ? dx0[i] : 0.0) + s;
      mag[i] = a + (c.acc ? std::fabs(dx0[i]) : 0.0) + 1e-6;
    }
  drv::Nf4Device w(t);
  Buf<float> gdy(dy);
  for (int big = 0; big < 2; big++) {
    const int bm = big ? 128 : 64, bn = bm, threads = big ? 256 : 128;
    Buf<float> dx(dx0);
    const dim3 grid((K + bn - 1) / bn, (M + bm - 1) / bm);
    const char* name = big ? "nf4_gemm_dx_bf16_128x128" : "nf4_gemm_dx_bf16_64x64";
    emu::launch(name, grid, threads, 0, [&] {
      auto f = big ? nf4_gemm_dx_bf16_128x128 : nf4_gemm_dx_bf16_64x64;
      f(dx, gdy, w.packed, c.dq, w.absmax, w.q, w.nested_absmax, w.nested_code, t.offset,
        t.nested_blocksize, t.blocksize_log2, M, N, K, c.acc);
    });
    const vector<float> got = dx.get();
    double err = drv::all_finite(got) ? 0 : INFINITY;
    for (size_t i = 0; i < got.size() && std::isfinite(err); i++)
      err = std::max(err, std::fabs(got[i] - want[i]) / mag[i]);
    drv::row(drv::fmt("%s [%d,%d]·[%d,%d] bs %d dq %d%s acc %d", name, M, N, N, K, c.blocksize,
                      c.dq, c.dq ? drv::fmt("/%d", t.nested_blocksize).c_str() : "", c.acc),
             err, 2e-5);
  }
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  // (m, n, k, blocksize, double quant, accumulate, nested blocksize): m of one row, under one
  // 64-row tile, and past one (70) or two (130) tiles of either size; the reduction n 200 (6¼
  // steps of 32, dy as float4) or 333 (odd: dy element by element); k 64, 96 (blocks of 64 cross
  // W's rows; partial 64- and 128-wide tiles) and 1056 (16½ tiles of 64, 8¼ of 128); nested
  // blocks of 256 (bitsandbytes) or 16 (many nested blocks in a small weight).
  const Case cases[] = {
      {1, 200, 64, 64, true, false, 256},    {5, 333, 96, 128, false, true, 256},
      {17, 200, 1056, 64, false, false, 256}, {70, 333, 64, 128, true, true, 256},
      {70, 200, 96, 64, true, false, 16},     {130, 333, 1056, 64, true, true, 16},
  };
  uint64_t seed = 2000;
  for (const Case& c : cases) run_case(c, seed += 100);
  return drv::finish("nf4_gemm_dx", t0);
}
