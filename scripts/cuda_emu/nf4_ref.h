// NF4 test weights for the NF4 GEMM drivers: random packed codes and scales in the layout of
// kernels/nf4.cu's header (bitsandbytes: flat index e = n·K + k, byte e / 2, even e in the high
// nibble; block b = e / blocksize), and their decoded values computed as kernels/nf4.cuh's
// block_scale does: s_b = absmax[b], or with double quantization
// s_b = fadd(fmul(nested_code[q_b], nested_absmax[b / nested_blocksize]), offset); w = fmul(NF4[c], s_b)
// (single f32 roundings; the drivers are built with -ffp-contract=off).
#pragma once
#include <cstdint>
#include <vector>

#include "driver.h"

namespace drv {

// kernels/nf4.cuh's table (bitsandbytes' NF4 code), kept separate so a broken table in a kernel
// copy shows.
constexpr float kNf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

inline float bf16_round(float f) { return emu::bf16_float(emu::bf16_bits(f)); }

struct Nf4Weight {
  int rows, cols, blocksize, blocksize_log2, nested_blocksize;
  bool dq;
  float offset;
  std::vector<uint8_t> packed, q;
  std::vector<float> absmax, nested_absmax, nested_code;
  std::vector<float> w;  // decoded f32, [rows, cols]
};

inline Nf4Weight make_nf4(uint64_t seed, int rows, int cols, int blocksize, bool dq,
                          int nested_blocksize) {
  Nf4Weight t{rows, cols, blocksize, 0, dq ? nested_blocksize : 1, dq, 0.f, {}, {}, {}, {}, {}, {}};
  while ((1 << t.blocksize_log2) < blocksize) t.blocksize_log2++;
  const size_t n = (size_t)rows * cols, blocks = (n + blocksize - 1) / blocksize;
  t.packed.resize((n + 1) / 2);
  for (size_t i = 0; i < t.packed.size(); i++) t.packed[i] = (uint8_t)(splitmix64(seed ^ i) >> 24);
  std::vector<float> scale(blocks);
  const std::vector<float> u = test_values(seed + 1, blocks, 1.0f);
  if (!dq) {
    t.absmax.resize(blocks);
    for (size_t b = 0; b < blocks; b++) t.absmax[b] = 0.5f + 0.45f * u[b];  // (0.05, 0.95)
    scale = t.absmax;
    t.q = {0};
    t.nested_absmax = {0.f};
    t.nested_code = {0.f};
  } else {
    // A signed 8-bit map in (−1, 1), per-nested-block maxima and an offset that keeps most
    // scales positive (as bitsandbytes' mean-subtracted absmax).
    t.nested_code = test_values(seed + 2, 256, 1.0f);
    const size_t nb = (blocks + nested_blocksize - 1) / nested_blocksize;
    t.nested_absmax = test_values(seed + 3, nb, 0.1f);
    for (float& v : t.nested_absmax) v += 0.2f;
    t.offset = 0.31f;
    t.q.resize(blocks);
    for (size_t b = 0; b < blocks; b++) t.q[b] = (uint8_t)(splitmix64(seed + 4 + b) >> 32);
    t.absmax = {0.f};
    for (size_t b = 0; b < blocks; b++)
      scale[b] = t.nested_code[t.q[b]] * t.nested_absmax[b / nested_blocksize] + t.offset;
  }
  t.w.resize(n);
  for (size_t e = 0; e < n; e++) {
    const uint8_t byte = t.packed[e >> 1];
    const int c = (e & 1) ? (byte & 0x0f) : (byte >> 4);
    t.w[e] = kNf4[c] * scale[e / blocksize];
  }
  return t;
}

// The kernel arguments of a weight, as src/backend/cuda/nf4.rs uploads them (1-element buffers
// for the pointers the format does not use).
struct Nf4Device {
  Buf<uint8_t> packed, q;
  Buf<float> absmax, nested_absmax, nested_code;
  explicit Nf4Device(const Nf4Weight& t)
      : packed(t.packed), q(t.q), absmax(t.absmax), nested_absmax(t.nested_absmax),
        nested_code(t.nested_code) {}
};

}  // namespace drv
