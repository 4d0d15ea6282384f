// Runs kernels/sample.cu (argmax_f32, sample_f32) under the host emulator against a C++ port of
// the CPU spec (src/backend/cpu/sample.rs), with the cases and the band of src/check/sample.rs:
// greedy must match exactly; a sampled token may differ from the spec only where a cumulative
// probability (exact, f64) lies within the band of p or of u (see band() below).
#include "sample.cu"

#include "driver.h"

using drv::Buf;
using std::vector;

namespace {

struct Samp {
  float t;
  size_t k;
  float p;
};

float canonical(float x) { return std::isnan(x) ? -INFINITY : x; }

// ---- The spec (src/backend/cpu/sample.rs), step by step in f32. ----------------------------

uint32_t spec_argmax(const vector<float>& x) {
  uint32_t best = 0;
  float bv = -INFINITY;
  for (size_t i = 0; i < x.size(); i++)
    if (canonical(x[i]) > bv) best = (uint32_t)i, bv = canonical(x[i]);
  return best;
}

struct Cand {
  uint32_t i;
  float z;
};

vector<Cand> spec_order(const vector<float>& x, float t, size_t k) {
  vector<Cand> c(x.size());
  for (size_t i = 0; i < x.size(); i++) c[i] = {(uint32_t)i, canonical(x[i]) / t};
  std::sort(c.begin(), c.end(), [](const Cand& a, const Cand& b) {
    return a.z > b.z || (a.z == b.z && a.i < b.i);
  });
  if (k > 0 && k < c.size()) c.resize(k);
  return c;
}

vector<float> spec_probs(const vector<Cand>& c) {
  const float m = c[0].z;
  vector<float> p(c.size());
  float total = 0;
  for (size_t i = 0; i < c.size(); i++) {
    p[i] = c[i].z == m ? 1.0f : std::exp(c[i].z - m);
    total += p[i];
  }
  for (float& v : p) v /= total;
  return p;
}

size_t spec_keep(const vector<float>& p, float top_p) {
  if (top_p >= 1.0f) return p.size();
  float acc = 0;
  for (size_t i = 0; i < p.size(); i++) {
    acc += p[i];
    if (acc >= top_p) return i + 1;
  }
  return p.size();
}

uint32_t spec_sample(const vector<float>& x, const Samp& s, float u) {
  if (s.t == 0.0f) return spec_argmax(x);
  const vector<Cand> c = spec_order(x, s.t, s.k);
  vector<float> p = spec_probs(c);
  p.resize(spec_keep(p, s.p));
  float total = 0;
  for (float v : p) total += v;
  float r = u * total;
  for (size_t i = 0; i < p.size(); i++) {
    r -= p[i];
    if (r <= 0.0f) return c[i].i;
  }
  size_t last = 0;
  for (size_t i = 0; i < p.size(); i++)
    if (p[i] > 0.0f) last = i;
  return c[last].i;
}

// ---- The kernel's own arithmetic, exactly: integer weights ⌊e·2⁴⁰⌋ with the emulator's __expf
// (libm expf), exact sums, the ceilings of kernels/sample.cu. The device must equal this for
// every draw: it checks the radix search itself, with no band.
uint32_t int_sample(const vector<float>& x, const Samp& s, float u) {
  if (s.t == 0.0f) return spec_argmax(x);
  const vector<Cand> c = spec_order(x, s.t, s.k);
  const float m = c[0].z;
  vector<unsigned long long> cum(c.size());
  unsigned long long acc = 0;
  for (size_t i = 0; i < c.size(); i++) {
    const bool top = emu::f32_bits(c[i].z) == emu::f32_bits(m) || c[i].z == m;
    acc += top ? (1ull << 40) : (unsigned long long)(std::exp(c[i].z - m) * SAMPLE_ONE);
    cum[i] = acc;
  }
  auto first = [&](unsigned long long target) {
    size_t j = 0;
    while (j + 1 < cum.size() && cum[j] < target) j++;
    return j;
  };
  unsigned long long mass = acc;
  if (s.p < 1.0f) mass = cum[first((unsigned long long)std::ceil((double)s.p * (double)mass))];
  return c[first((unsigned long long)std::ceil((double)u * (double)mass))].i;
}

// ---- The band: where f32 rounding may move a decision. ----------------------------------------
// cum64[j] = exact (f64) cumulative probability through position j of the order. The spec's f32
// cumulative differs from it by at most err = max_j |acc_f32[j] − cum64[j]| (measured per row);
// the device's integer sums of __expf weights by ≤ 4e-6 (a few ulp of __expf per weight, relative,
// plus V·2⁻⁴⁰). A decision is in the band when a cumulative it compares lies within
// 2·err + 1e-5 of its threshold.
struct Band {
  double eps;
  vector<double> cum;  // f64 cumulative probability over the top-k candidates
};

Band band_of(const vector<float>& x, const Samp& s) {
  const vector<Cand> c = spec_order(x, s.t, s.k);
  const vector<float> p = spec_probs(c);
  const double m = c[0].z;
  vector<double> e(c.size());
  double tot = 0;
  for (size_t i = 0; i < c.size(); i++) tot += e[i] = c[i].z == c[0].z ? 1.0 : std::exp(c[i].z - m);
  Band b{0, vector<double>(c.size())};
  double acc64 = 0, err = 0;
  float acc32 = 0;
  for (size_t i = 0; i < c.size(); i++) {
    acc64 += e[i] / tot;
    acc32 += p[i];
    b.cum[i] = acc64;
    err = std::max(err, std::fabs((double)acc32 - acc64));
  }
  b.eps = 2 * err + 1e-5;
  return b;
}

// Whether the spec's choice for u is within the band. The top-p cut (the last kept position) is
// certain to lie between lo = the first j with cum[j] ≥ p − eps and hi = the first with
// cum[j] ≥ p + eps, so the kept mass M between cum[lo] and cum[hi]; the draw takes the first j
// with cum[j] ≥ u·M, and is in the band when some cum[j] (j ≤ hi) lies in
// [(u − eps)·cum[lo], (u + eps)·cum[hi]].
bool in_band(const Band& b, const Samp& s, float u) {
  const size_t n = b.cum.size();
  size_t lo = n - 1, hi = n - 1;
  if (s.p < 1.0f) {
    for (lo = 0; lo + 1 < n && b.cum[lo] < s.p - b.eps;) lo++;
    for (hi = lo; hi + 1 < n && b.cum[hi] < s.p + b.eps;) hi++;
  }
  const double t_lo = (u - b.eps) * b.cum[lo], t_hi = (u + b.eps) * b.cum[hi];
  for (size_t j = 0; j <= hi; j++)
    if (b.cum[j] >= t_lo && b.cum[j] <= t_hi) return true;
  return false;
}

// ---- Cases. -----------------------------------------------------------------------------------

enum Kind { NORMAL, TIES, MASKED, PEAKED, ALL_MASKED, ZEROS };

vector<float> logits(Kind kind, size_t v, uint64_t seed) {
  vector<float> x = drv::test_values(seed, v, 8.0f);
  for (size_t i = 0; i < v; i++) {
    if (kind == TIES) x[i] = std::round(x[i] * 2.0f) / 2.0f;
    if (kind == MASKED) x[i] = i % 97 == 5 ? NAN : (i % 10 != 3 ? -INFINITY : x[i]);
    if (kind == ALL_MASKED) x[i] = i % 3 == 1 ? NAN : -INFINITY;
    if (kind == ZEROS) x[i] = i % 3 == 0 ? -0.0f : (i % 3 == 1 ? 0.0f : x[i] - 9.0f);
  }
  if (kind == PEAKED && v > 7) x[7] += 30.0f;
  return x;
}

int mismatches_total = 0;

void sample_case(const char* name, Kind kind, size_t v, Samp s, int draws, uint64_t seed) {
  const vector<float> x = logits(kind, v, seed);
  Buf<float> dx(x);
  Buf<uint32_t> out(1, 0xffffffffu);
  // Uniforms: 0, the largest f32 below 1, then pseudo-random (splitmix64's top 24 bits).
  vector<float> us = {0.0f, 0.99999994f};
  for (int d = 2; d < draws; d++)
    us.push_back((float)(drv::splitmix64(seed * 31 + d) >> 40) / (float)(1 << 24));
  const Band b = s.t > 0 ? band_of(x, s) : Band{0, {}};
  const size_t k = s.k >= v ? 0 : s.k;
  int outside = 0, inside = 0, band_draws = 0, exact_diff = 0;
  for (float u : us) {
    if (s.t == 0.0f) {
      emu::launch("argmax_f32", dim3(1), SAMPLE_THREADS, 0, [&] { argmax_f32(dx, (int64_t)v, out); });
    } else {
      emu::launch("sample_f32", dim3(1), SAMPLE_THREADS, 0, [&] {
        sample_f32(dx, (int64_t)v, s.t, (int64_t)k, s.p, u, out);
      });
    }
    const uint32_t want = spec_sample(x, s, u), got = out.p[0];
    const bool band = s.t > 0 && in_band(b, s, u);
    exact_diff += got != int_sample(x, s, u);
    band_draws += band;
    if (got != want) (band ? inside : outside)++;
    if (got != want && !band)
      std::printf("  u=%.9g: device %u, spec %u\n", (double)u, got, want);
  }
  mismatches_total += outside;
  const std::string what =
      drv::fmt("%s V=%zu T=%g k=%zu p=%g", name, v, (double)s.t, s.k, (double)s.p);
  drv::row(what + " vs integer reference: tokens differing", exact_diff, 0);
  if (s.t > 0)
    drv::row(drv::fmt("%s vs spec: %d draws, %d in band (%.1e), %d differ there; differing outside",
                      what.c_str(), (int)us.size(), band_draws, b.eps, inside),
             outside, 0);
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  // Greedy: first index on ties, NaN as −∞, an all-masked row (index 0), odd sizes.
  sample_case("greedy", NORMAL, 32000, {0, 0, 1}, 2, 11);
  sample_case("greedy ties", TIES, 5001, {0, 0, 1}, 2, 12);
  sample_case("greedy masked", MASKED, 1000, {0, 0, 1}, 2, 13);
  sample_case("greedy all masked", ALL_MASKED, 100, {0, 0, 1}, 2, 14);
  sample_case("greedy V=1", NORMAL, 1, {0, 0, 1}, 2, 15);
  sample_case("greedy signed zeros", ZEROS, 301, {0, 0, 1}, 2, 16);
  // Sampled: the Llama-2 vocabulary with the usual settings, then the edges.
  sample_case("sample", NORMAL, 32000, {1.0f, 0, 1.0f}, 24, 21);
  sample_case("sample", NORMAL, 32000, {0.7f, 40, 0.9f}, 24, 22);
  sample_case("sample top-p", NORMAL, 32000, {0.8f, 0, 0.95f}, 16, 23);
  sample_case("sample Llama-3 vocabulary", NORMAL, 128256, {0.6f, 50, 0.9f}, 8, 40);
  sample_case("sample ties", TIES, 5001, {1.0f, 50, 0.8f}, 24, 24);
  sample_case("sample ties", TIES, 5001, {1.0f, 0, 1.0f}, 24, 25);
  sample_case("sample masked", MASKED, 3001, {1.0f, 0, 0.9f}, 24, 26);
  sample_case("sample all masked", ALL_MASKED, 100, {1.0f, 0, 1.0f}, 16, 27);
  sample_case("sample peaked", PEAKED, 4000, {1.0f, 0, 1.0f}, 16, 28);
  sample_case("sample k=1", NORMAL, 4000, {1.0f, 1, 1.0f}, 8, 29);
  sample_case("sample k=V", NORMAL, 999, {1.0f, 999, 1.0f}, 16, 30);
  sample_case("sample k>V", NORMAL, 999, {1.0f, 5000, 0.5f}, 16, 31);
  sample_case("sample p tiny", NORMAL, 4000, {1.0f, 0, 1e-6f}, 8, 32);
  sample_case("sample T huge", NORMAL, 4000, {1e30f, 0, 1.0f}, 24, 33);
  sample_case("sample T huge top-k", NORMAL, 4000, {1e30f, 100, 0.5f}, 24, 34);
  sample_case("sample T tiny", NORMAL, 4000, {1e-3f, 0, 1.0f}, 8, 35);
  sample_case("sample T tiny, +inf ties", NORMAL, 4000, {1e-38f, 0, 1.0f}, 16, 36);
  sample_case("sample signed zeros", ZEROS, 301, {1.0f, 50, 1.0f}, 24, 39);
  sample_case("sample V=1", NORMAL, 1, {1.0f, 0, 0.5f}, 4, 37);
  sample_case("sample V=7", TIES, 7, {2.0f, 3, 0.7f}, 24, 38);
  return drv::finish("sample", t0);
}
