// Host-side helpers shared by the emulator drivers (scripts/cuda_emu/*_emu.cpp): "device"
// buffers of exact size (so AddressSanitizer sees any access past their end), the checks' test
// values, the error measures of src/check/mod.rs, and the one-line-per-row report.
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace drv {

// A device allocation: 256-byte aligned like cudaMalloc, exactly n elements (ASan's redzone
// starts right after them), filled with `fill`.
template <class T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  explicit Buf(size_t count, T fill = T{}) : n(count) {
    void* q = nullptr;
    if (posix_memalign(&q, 256, count ? count * sizeof(T) : 1)) std::abort();
    p = (T*)q;
    for (size_t i = 0; i < n; i++) p[i] = fill;
  }
  explicit Buf(const std::vector<T>& v) : Buf(v.size()) {
    if (n) std::memcpy(p, v.data(), n * sizeof(T));
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  std::vector<T> get() const { return std::vector<T>(p, p + n); }
  operator T*() { return p; }
};

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
// src/check/mod.rs test_values: uniform in (−amp, amp), element i from splitmix64(seed ^ i·φ).
inline std::vector<float> test_values(uint64_t seed, size_t n, float amp) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; i++) {
    const uint64_t z = splitmix64(seed ^ (i * 0x9E3779B97F4A7C15ull));
    v[i] = ((float)(z >> 40) / (float)(1ull << 24) * 2.0f - 1.0f) * amp;
  }
  return v;
}

inline bool all_finite(const std::vector<float>& got) {
  for (float g : got)
    if (!std::isfinite(g)) return false;
  return true;
}
// Elements whose bits differ (all of them on a length mismatch): "the same bits" checks.
inline size_t count_diff(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return std::max(got.size(), want.size());
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); i++) bad += std::memcmp(&got[i], &want[i], sizeof(float)) != 0;
  return bad;
}
// max |got − want| / max |want| (infinite on a non-finite value).
inline double max_rel_err(const std::vector<float>& got, const std::vector<double>& want) {
  if (got.size() != want.size() || !all_finite(got)) return INFINITY;
  double e = 0, s = 0;
  for (size_t i = 0; i < got.size(); i++) {
    e = std::max(e, std::fabs(got[i] - want[i]));
    s = std::max(s, std::fabs(want[i]));
  }
  return e == 0 ? 0 : (s == 0 ? INFINITY : e / s);
}
inline double max_abs_err(const std::vector<float>& got, const std::vector<double>& want) {
  if (got.size() != want.size() || !all_finite(got)) return INFINITY;
  double e = 0;
  for (size_t i = 0; i < got.size(); i++) e = std::max(e, std::fabs(got[i] - want[i]));
  return e;
}
// ‖got − want‖₂ / ‖want‖₂.
inline double rel_l2(const std::vector<float>& got, const std::vector<double>& want) {
  if (got.size() != want.size() || !all_finite(got)) return INFINITY;
  double dd = 0, ww = 0;
  for (size_t i = 0; i < got.size(); i++) {
    dd += (got[i] - want[i]) * (got[i] - want[i]);
    ww += want[i] * want[i];
  }
  return dd == 0 ? 0 : (ww == 0 ? INFINITY : std::sqrt(dd / ww));
}
inline double cosine(const std::vector<float>& got, const std::vector<double>& want) {
  double gw = 0, gg = 0, ww = 0;
  for (size_t i = 0; i < got.size(); i++) {
    gw += got[i] * want[i];
    gg += (double)got[i] * got[i];
    ww += want[i] * want[i];
  }
  if (gg == 0 && ww == 0) return 1;
  if (gg == 0 || ww == 0) return 0;
  return gw / (std::sqrt(gg) * std::sqrt(ww));
}

inline int failures = 0;
inline int rows = 0;
// One report line: kernel/shape/quantity, error, bound, ok or FAIL.
inline void row(const std::string& what, double err, double bound) {
  const bool ok = err <= bound;  // NaN fails
  rows++;
  if (!ok) failures++;
  std::printf("%-72s %10.3e  bound %7.1e  %s\n", what.c_str(), err, bound, ok ? "ok" : "FAIL");
  std::fflush(stdout);
}
inline int finish(const char* family, std::chrono::steady_clock::time_point t0) {
  const double s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: %d rows, %d failed, %.1f s, %llu fiber switches\n", family, rows, failures, s,
              (unsigned long long)emu::rt.switches);
  return failures ? 1 : 0;
}

inline std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string fmt(const char* f, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

}  // namespace drv
