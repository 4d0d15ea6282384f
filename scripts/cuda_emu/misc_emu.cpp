// Runs kernels/cross_entropy.cu, kernels/rmsnorm.cu (forward and backward) and kernels/adamw.cu
// under the host emulator against f64 references of the math in their headers (AdamW: the host
// optimizer's f32 operations, bit for bit), with the measures and bounds of src/check/ops.rs and
// src/check/adamw.rs. Launch configurations as the launchers in src/backend/cuda/.
#include "adamw.cu"
#include "cross_entropy.cu"
#include "rmsnorm.cu"

#include "driver.h"

using drv::Buf;
using std::vector;

namespace {

// src/check/ops.rs F32_REORDER: f32 sums in another order plus fast math.
constexpr double kF32Reorder = 1e-5;
constexpr float kMarker = 7.25f;  // what an output holds before the kernel writes it

// ---------------------------------------------------------------------------------------------
// Fused cross-entropy: losses[r] = logsumexp(z) − z[t], z ← scale·(softmax(z) − onehot(t));
// ignored rows (t = −100) all zeros.

void cross_entropy_case(int rows, int vocab, uint64_t seed) {
  vector<int32_t> targets(rows);
  for (int r = 0; r < rows; r++)
    targets[r] = r == 0 ? vocab - 1
                 : r == 1 ? 0
                 : r % 5 == 3 ? -100
                 : (int32_t)(drv::splitmix64(seed ^ (uint64_t)r) % (uint64_t)vocab);
  vector<float> logits = drv::test_values(seed + 1, (size_t)rows * vocab, 8.0f);
  // As the check: row 0 starts with a masked float4 (−inf), row 2 is confident.
  for (int j = 0; j < 4 && j < vocab; j++) logits[j] = -INFINITY;
  if (rows > 2) logits[(size_t)2 * vocab + targets[2]] += 30.0f;
  int valid = 0;
  for (int32_t t : targets) valid += t >= 0;
  const float scale = valid ? 1.0f / (float)valid : 0.0f;
  vector<double> want_z(logits.size()), want_loss(rows);
  for (int r = 0; r < rows; r++) {
    const float* z = &logits[(size_t)r * vocab];
    double* g = &want_z[(size_t)r * vocab];
    if (targets[r] < 0) {
      for (int j = 0; j < vocab; j++) g[j] = 0;
      want_loss[r] = 0;
      continue;
    }
    double m = -INFINITY, s = 0;
    for (int j = 0; j < vocab; j++) m = std::max(m, (double)z[j]);
    for (int j = 0; j < vocab; j++) s += std::exp(z[j] - m);
    const double lse = m + std::log(s);
    want_loss[r] = lse - z[targets[r]];
    for (int j = 0; j < vocab; j++) g[j] = scale * (std::exp(z[j] - lse) - (j == targets[r]));
  }
  Buf<float> z(logits), losses(rows, kMarker);
  Buf<int32_t> tg(targets);
  emu::launch("cross_entropy_fused_f32", dim3(rows), CE_THREADS, 0,
              [&] { cross_entropy_fused_f32(z, losses, tg, vocab, scale); });
  const vector<float> got = z.get(), got_loss = losses.get();
  bool ignored_nonzero = false;
  for (int r = 0; r < rows; r++)
    if (targets[r] < 0) {
      ignored_nonzero |= emu::f32_bits(got_loss[r]) != 0;
      for (int j = 0; j < vocab; j++) ignored_nonzero |= emu::f32_bits(got[(size_t)r * vocab + j]) != 0;
    }
  drv::row(drv::fmt("cross_entropy_fused_f32 loss [%d, %d]", rows, vocab),
           drv::max_rel_err(got_loss, want_loss), kF32Reorder);
  drv::row(drv::fmt("cross_entropy_fused_f32 dlogits [%d, %d] (-100 rows exactly 0)", rows, vocab),
           ignored_nonzero ? INFINITY : drv::max_rel_err(got, want_z), kF32Reorder);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: out = x / rms · w, rms = √(mean x² + eps); backward
// dx = w·dy / rms − x · (Σ w·dy·x) / (dim · rms³).

void rmsnorm_case(int rows, int dim, uint64_t seed) {
  const float eps = 1e-5f;
  const size_t n = (size_t)rows * dim;
  const vector<float> x = drv::test_values(seed, n, 2.0f), dy = drv::test_values(seed + 1, n, 1.0f);
  vector<float> w = drv::test_values(seed + 2, dim, 0.5f);
  for (float& v : w) v += 1.0f;
  vector<double> want_y(n), want_dx(n);
  for (int r = 0; r < rows; r++) {
    const size_t o = (size_t)r * dim;
    double ss = 0, dot = 0;
    for (int j = 0; j < dim; j++) {
      ss += (double)x[o + j] * x[o + j];
      dot += (double)w[j] * dy[o + j] * x[o + j];
    }
    const double rms = std::sqrt(ss / dim + eps);
    for (int j = 0; j < dim; j++) {
      want_y[o + j] = x[o + j] / rms * w[j];
      want_dx[o + j] = w[j] * dy[o + j] / rms - x[o + j] * dot / (dim * rms * rms * rms);
    }
  }
  Buf<float> gx(x), gdy(dy), gw(w), y(n, kMarker), dx(n, kMarker);
  emu::launch("rmsnorm_f32", dim3(rows), 256, 0, [&] { rmsnorm_f32(y, gx, gw, dim, eps); });
  emu::launch("rmsnorm_backward_f32", dim3(rows), RMS_BWD_THREADS, 0,
              [&] { rmsnorm_backward_f32(dx, gdy, gx, gw, dim, eps); });
  drv::row(drv::fmt("rmsnorm_f32 out [%d, %d]", rows, dim), drv::max_rel_err(y.get(), want_y),
           kF32Reorder);
  drv::row(drv::fmt("rmsnorm_backward_f32 dx [%d, %d]", rows, dim),
           drv::max_rel_err(dx.get(), want_dx), kF32Reorder);
}

// ---------------------------------------------------------------------------------------------
// AdamW over several tensors with global-norm clipping, against the host optimizer
// (src/train/optim.rs: grad_norm, clip_grad_norm, AdamW::update) replayed here in f32/f64.

struct Hyper {
  double lr, beta1, beta2, eps, wd;
};

// The host's norm: per tensor √Σ(f64)g² rounded to f32, then √Σ(f64)N_t² rounded to f32.
float host_norm(const vector<vector<float>>& g) {
  double tot = 0;
  for (const auto& t : g) {
    double s = 0;
    for (float x : t) s += (double)x * x;
    const double n = (double)(float)std::sqrt(s);
    tot += n * n;
  }
  return (float)std::sqrt(tot);
}

// One host step on every tensor (p, m, v updated; steps incremented); returns the norm.
float host_step(const Hyper& h, double lr, float max_norm, vector<vector<float>>& p,
                vector<vector<float>> g, vector<vector<float>>& m, vector<vector<float>>& v,
                vector<uint64_t>& steps) {
  const float total = host_norm(g);
  if (max_norm > 0) {
    const float coef = max_norm / (total + 1e-6f);
    if (coef < 1.0f || std::isnan(coef))
      for (auto& t : g)
        for (float& x : t) x *= coef;
  }
  if (!std::isfinite(total)) return total;  // the device skips the update (and the steps)
  for (size_t t = 0; t < p.size(); t++) {
    const uint64_t k = ++steps[t];
    const float decay = (float)(1.0 - lr * h.wd), w1 = (float)(1.0 - h.beta1);
    const float beta2 = (float)h.beta2, w2 = (float)(1.0 - h.beta2), eps = (float)h.eps;
    const double bc1 = 1.0 - std::pow(h.beta1, (double)k), bc2 = 1.0 - std::pow(h.beta2, (double)k);
    const float bc2_sqrt = (float)std::pow(bc2, 0.5), neg_step = (float)(-(lr / bc1));
    for (size_t i = 0; i < p[t].size(); i++) {
      if (h.wd != 0.0) p[t][i] *= decay;
      const float gi = g[t][i], d = gi - m[t][i];
      m[t][i] = std::fabs(w1) < 0.5f ? std::fma(w1, d, m[t][i]) : std::fma(w1 - 1.0f, d, gi);
      v[t][i] = v[t][i] * beta2 + w2 * gi * gi;
      const float denom = std::sqrt(v[t][i]) / bc2_sqrt + eps;
      p[t][i] += neg_step * m[t][i] / denom;
    }
  }
  return total;
}

// Largest per-tensor max_rel_err of a quantity (f32 vs f32 values).
double worst_rel(const vector<vector<float>>& got, const vector<vector<float>>& want) {
  double e = 0;
  for (size_t t = 0; t < got.size(); t++) {
    vector<double> w(want[t].begin(), want[t].end());
    e = std::max(e, drv::max_rel_err(got[t], w));
  }
  return e;
}
// max_rel_err of the concatenation (one scale over all tensors).
double concat_rel(const vector<vector<float>>& got, const vector<vector<float>>& want) {
  vector<float> g;
  vector<double> w;
  for (size_t t = 0; t < got.size(); t++) {
    g.insert(g.end(), got[t].begin(), got[t].end());
    w.insert(w.end(), want[t].begin(), want[t].end());
  }
  return drv::max_rel_err(g, w);
}

// Three steps (lr decaying, new gradients each step) on tensors of 1, 7 (gradients of 1e-20:
// subnormal v), 4096 and 5000 (3 chunks, the last partial) values, device against host.
// `resumed`: states with m, v and per-tensor step counts of a resumed run; `max_norm` > 0
// clips; `nan_step` puts a NaN gradient into that step (nothing may change).
void adamw_case(const char* name, const Hyper& h, float max_norm, bool resumed, int nan_step,
                uint64_t seed) {
  const vector<size_t> sizes = {1, 7, 4096, 5000};
  const size_t T = sizes.size();
  vector<vector<float>> p(T), m(T), v(T);
  vector<uint64_t> steps(T, 0);
  const uint64_t resumed_steps[] = {3, 0, 10, 1000};
  for (size_t t = 0; t < T; t++) {
    p[t] = drv::test_values(seed + t, sizes[t], 1.0f);
    m[t].assign(sizes[t], 0.f);
    v[t].assign(sizes[t], 0.f);
    if (resumed) {
      m[t] = drv::test_values(seed + 10 + t, sizes[t], 1e-3f);
      v[t] = drv::test_values(seed + 20 + t, sizes[t], 1e-6f);
      for (float& x : v[t]) x = std::fabs(x);
      steps[t] = resumed_steps[t];
    }
  }
  // Device buffers: p and g per tensor, m and v per tensor, the table and the scalars.
  vector<std::unique_ptr<Buf<float>>> dp, dg, dm, dv;
  size_t chunks = 0;
  vector<AdamTensor> tab(T);
  for (size_t t = 0; t < T; t++) {
    dp.emplace_back(new Buf<float>(p[t]));
    dg.emplace_back(new Buf<float>(sizes[t]));
    dm.emplace_back(new Buf<float>(m[t]));
    dv.emplace_back(new Buf<float>(v[t]));
    tab[t] = {dp[t]->p, dg[t]->p, dm[t]->p, dv[t]->p, (int64_t)sizes[t], (int64_t)chunks};
    chunks += (sizes[t] + ADAMW_CHUNK - 1) / ADAMW_CHUNK;
  }
  Buf<AdamTensor> dtab(tab);
  Buf<double> sumsq(T);
  Buf<float> out(2);
  vector<uint64_t> dev_steps = steps;
  double norm_err = 0, pmv_err = 0;
  size_t changed = 0;
  for (int s = 0; s < 3; s++) {
    const double lr = 2e-4 * (1.0 - 0.25 * s);
    vector<vector<float>> g(T);
    for (size_t t = 0; t < T; t++) {
      g[t] = drv::test_values(seed + 100 * (s + 1) + t, sizes[t], t == 1 ? 1e-20f : 0.5f);
      if (s == nan_step && t == 2) g[t][17] = NAN;
      std::memcpy(dg[t]->p, g[t].data(), sizes[t] * sizeof(float));
    }
    // Device: the launcher's three launches (src/backend/cuda/adamw.rs).
    vector<float2> scal(T);
    for (size_t t = 0; t < T; t++) {
      const double k = (double)(dev_steps[t] + 1);
      const double bc1 = 1.0 - std::pow(h.beta1, k), bc2 = 1.0 - std::pow(h.beta2, k);
      scal[t] = {(float)(-(lr / bc1)), (float)std::pow(bc2, 0.5)};
    }
    Buf<float2> dscal(scal);
    for (size_t t = 0; t < T; t++) sumsq.p[t] = 0.0;
    const float w1 = (float)(1.0 - h.beta1);
    emu::launch("adamw_sumsq_f32", dim3(chunks), ADAMW_THREADS, 0,
                [&] { adamw_sumsq_f32(dtab, (int)T, sumsq); });
    emu::launch("adamw_norm_f32", dim3(1), ADAMW_THREADS, 0,
                [&] { adamw_norm_f32(sumsq, (int)T, max_norm > 0, max_norm, out); });
    emu::launch("adamw_update_f32", dim3(chunks), ADAMW_THREADS, 0, [&] {
      adamw_update_f32(dtab, dscal, (int)T, out, (float)(1.0 - lr * h.wd), h.wd != 0.0,
                       std::fabs(w1) < 0.5f, w1, w1 - 1.0f, (float)h.beta2,
                       (float)(1.0 - h.beta2), (float)h.eps);
    });
    const bool finite = std::isfinite(out.p[0]);
    if (finite)
      for (auto& k : dev_steps) k++;
    // Host.
    const vector<vector<float>> p0 = p, m0 = m, v0 = v;
    const float want_norm = host_step(h, lr, max_norm, p, g, m, v, steps);
    vector<vector<float>> gp(T), gm(T), gv(T);
    for (size_t t = 0; t < T; t++) gp[t] = dp[t]->get(), gm[t] = dm[t]->get(), gv[t] = dv[t]->get();
    if (s == nan_step) {
      // The norm must be NaN and nothing may change, bit for bit.
      if (!std::isnan(out.p[0])) changed++;
      for (size_t t = 0; t < T; t++)
        for (size_t i = 0; i < sizes[t]; i++)
          changed += (emu::f32_bits(gp[t][i]) != emu::f32_bits(p0[t][i])) +
                     (emu::f32_bits(gm[t][i]) != emu::f32_bits(m0[t][i])) +
                     (emu::f32_bits(gv[t][i]) != emu::f32_bits(v0[t][i]));
      continue;
    }
    norm_err = std::max(norm_err, std::fabs((double)out.p[0] - want_norm) / want_norm);
    const double e = max_norm > 0 ? std::max({concat_rel(gp, p), concat_rel(gm, m), concat_rel(gv, v)})
                                  : std::max({worst_rel(gp, p), worst_rel(gm, m), worst_rel(gv, v)});
    pmv_err = std::max(pmv_err, e);
  }
  // Bounds of src/check/adamw.rs: the norm within 2 f32 ulps (f64 sums in another order); p, m,
  // v bit-identical without clipping, within 2e-6 with it (the coefficient may differ by an ulp).
  drv::row(drv::fmt("adamw %s norm (rel)", name), norm_err, 2.4e-7);
  drv::row(drv::fmt("adamw %s p, m, v (max rel)", name), pmv_err, max_norm > 0 ? 2e-6 : 0.0);
  if (nan_step >= 0) drv::row(drv::fmt("adamw %s NaN gradient: values changed", name), (double)changed, 0.0);
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  // src/check/ops.rs's shapes (fewer rows where the check has 300): the float4 path (V % 4 == 0)
  // and the element path, a masked float4, ignored rows, a confident row.
  const int xent[][2] = {{1, 384}, {17, 32000}, {40, 384}, {7, 1001}, {3, 49152}};
  uint64_t seed = 400;
  for (const auto& s : xent) cross_entropy_case(s[0], s[1], seed += 10);
  // The float4 path (dim % 4 == 0) and the scalar one.
  const int rms[][2] = {{1, 48}, {17, 4097}, {40, 48}, {30, 4096}, {3, 8192}, {2, 8193}};
  seed = 100;
  for (const auto& s : rms) rmsnorm_case(s[0], s[1], seed += 10);
  // Both lerp formulas (β1 = 0.9: w1 < 0.5; β1 = 0.3: w1 ≥ 0.5), weight decay on and off, fresh
  // and resumed states, clipping off and on, a NaN gradient.
  adamw_case("fresh, wd, no clip", {2e-4, 0.9, 0.999, 1e-8, 0.01}, 0.f, false, -1, 700);
  adamw_case("resumed, no wd, no clip, beta1 0.3", {2e-4, 0.3, 0.99, 1e-8, 0.0}, 0.f, true, -1, 710);
  adamw_case("resumed, wd, clip 1.0", {2e-4, 0.9, 0.999, 1e-8, 0.01}, 1.0f, true, -1, 720);
  adamw_case("fresh, clip 1.0, NaN at step 2", {2e-4, 0.9, 0.999, 1e-8, 0.01}, 1.0f, false, 1, 730);
  return drv::finish("misc", t0);
}
