// Runs kernels/decode_attention.cu (kv_write_bf16, the flash-decoding split kernels and the
// combine) and kernels/attention.cu (attention_bf16kv, the general path) under the host emulator
// against an f64 reference on the same bf16-rounded K/V, with the launch configuration and split
// plan of src/backend/cuda/decode_attention.rs and the bounds of src/check/decode_attention.rs
// (attention max rel err ≤ 1e-4; the cache write bit for bit). The cache is 3 positions longer
// than the keys in use and its tail holds NaN: a kernel reading past pos0 + T fails the row.
// Every decode case (T = 1) runs again with its position read from a device word, as a
// replayed CUDA-graph step launches it (src/backend/cuda/step.rs): host pos0 / split arguments
// garbage, the grid sized for a 4096-position cache (max_splits), partials NaN-filled; it must
// give the host-planned launch's bits. The cache write likewise, one row at the word's position.
#include "attention.cu"
#include "decode_attention.cu"

#include "driver.h"

using drv::Buf;
using std::vector;

namespace {

struct Case {
  int B, T, pos0, H, KV, D;
};

// src/backend/cpu/decode_attention.rs split_plan (TILE 64, TARGET_CTAS 264).
void split_plan(int n_keys, int ctas, int* split_len, int* n_splits) {
  const int tiles = std::max(1, (n_keys + 63) / 64);
  const int want = std::clamp((264 + ctas - 1) / ctas, 1, tiles);
  *split_len = (tiles + want - 1) / want * 64;
  *n_splits = std::max(1, (n_keys + *split_len - 1) / *split_len);
}

// src/backend/cpu/decode_attention.rs max_splits.
int max_splits(int cap, int ctas) {
  return std::clamp((264 + ctas - 1) / ctas, 1, std::max(1, (cap + 63) / 64));
}

// kv_write_bf16 at a device position: row `p` of a [P, row] cache from the word, host off
// garbage; that row's bits, every other value untouched.
void kv_write_at_device_pos(uint64_t seed) {
  const int P = 9, row = 96, p = 6;
  const vector<float> src = drv::test_values(seed, row, 3);
  Buf<float> gs(src);
  Buf<uint16_t> cache((size_t)P * row, 0xdead);
  Buf<uint32_t> word(vector<uint32_t>{(uint32_t)p});
  emu::launch("kv_write_bf16", dim3(1), 256, 0, [&] {
    kv_write_bf16(cache, gs, /*off=*/-777, row, word, row);
  });
  const vector<uint16_t> got = cache.get();
  size_t bad = 0;
  for (int i = 0; i < P * row; i++) {
    const bool in_row = i / row == p;
    bad += got[i] != (in_row ? emu::bf16_bits(src[i % row]) : (uint16_t)0xdead);
  }
  drv::row("kv_write_bf16 at a device position (mismatching values)", (double)bad, 0.0);
}

// The split kernel and the combine with the position read from a device word (a replayed
// step): the same bits as the host-planned launch `host`.
void device_pos_case(const Case& c, Buf<float>& gq, Buf<uint16_t>& kc, Buf<uint16_t>& vc, int cap, const vector<float>& host,
                     const std::string& name) {
  const int G = c.H / c.KV, tq = 16 / G, q_blocks = (c.T + tq - 1) / tq;
  const int ctas = c.B * c.KV * q_blocks, grid_splits = max_splits(4096, ctas);
  const size_t rows = (size_t)c.B * c.T * c.H, qn = rows * c.D;
  Buf<float> out(qn, NAN), part_o(rows * grid_splits * c.D, NAN), part_ml(rows * grid_splits * 2, NAN);
  Buf<uint32_t> word(vector<uint32_t>{(uint32_t)c.pos0});
  const dim3 grid(grid_splits, c.KV, c.B * q_blocks);
  emu::launch(c.D == 64 ? "decode_attention_split_d64" : "decode_attention_split_d128", grid, 128,
              0, [&] {
                if (c.D == 64)
                  decode_attention_split_d64(out, part_o, part_ml, gq, kc, vc, c.T, -999, cap, c.H,
                                             c.KV, 0, 0, word);
                else
                  decode_attention_split_d128(out, part_o, part_ml, gq, kc, vc, c.T, -999, cap,
                                              c.H, c.KV, 0, 0, word);
              });
  emu::launch("decode_attention_combine", dim3(rows), c.D, 0, [&] {
    decode_attention_combine(out, part_o, part_ml, (int)rows, grid_splits, c.D, word, c.T, ctas);
  });
  drv::row(drv::fmt("decode_attention device pos, grid of %d splits, vs host (bits differing) ",
                    grid_splits) + name,
           (double)drv::count_diff(out.get(), host), 0.0);
}

void run_case(const Case& c, uint64_t seed) {
  const int cap = c.pos0 + c.T + 3, row = c.KV * c.D, G = c.H / c.KV;
  const size_t qn = (size_t)c.B * c.T * c.H * c.D, kvn = (size_t)c.B * cap * row;
  const vector<float> q = drv::test_values(seed, qn, 2);
  vector<float> k = drv::test_values(seed + 1, kvn, 2), v = drv::test_values(seed + 2, kvn, 1);
  for (int b = 0; b < c.B; b++)
    for (size_t i = (size_t)(b * cap + c.pos0 + c.T) * row; i < (size_t)(b + 1) * cap * row; i++)
      k[i] = v[i] = NAN;
  // The cache write, then its bits against the emulator's RNE conversion.
  Buf<float> gk(k), gv(v);
  Buf<uint16_t> kc(kvn, 0xdead), vc(kvn, 0xdead);
  const unsigned wblocks = (unsigned)std::min<size_t>((kvn + 255) / 256, 65535 * 16);
  emu::launch("kv_write_bf16", dim3(wblocks), 256, 0, [&] { kv_write_bf16(kc, gk, 0, (int64_t)kvn, nullptr, 0); });
  emu::launch("kv_write_bf16", dim3(wblocks), 256, 0, [&] { kv_write_bf16(vc, gv, 0, (int64_t)kvn, nullptr, 0); });
  const vector<uint16_t> kb = kc.get(), vb = vc.get();
  size_t bad = 0;
  for (size_t i = 0; i < kvn; i++) bad += (kb[i] != emu::bf16_bits(k[i])) + (vb[i] != emu::bf16_bits(v[i]));
  drv::row(drv::fmt("kv_write_bf16 [%zu] (mismatching values)", kvn), (double)bad, 0.0);

  // f64 reference on the rounded cache.
  vector<double> want(qn);
  const double scale = 1.0 / std::sqrt((double)c.D);
  for (int b = 0; b < c.B; b++)
    for (int t = 0; t < c.T; t++)
      for (int h = 0; h < c.H; h++) {
        const size_t qi = ((size_t)b * c.T + t) * c.H + h;
        const int g = h / G, n = c.pos0 + t + 1;
        vector<double> s(n);
        double m = -INFINITY;
        for (int j = 0; j < n; j++) {
          const size_t kr = ((size_t)b * cap + j) * row + (size_t)g * c.D;
          double acc = 0;
          for (int e = 0; e < c.D; e++) acc += (double)q[qi * c.D + e] * emu::bf16_float(kb[kr + e]);
          s[j] = acc * scale;
          m = std::max(m, s[j]);
        }
        double l = 0;
        for (double& x : s) l += (x = std::exp(x - m));
        for (int e = 0; e < c.D; e++) {
          double o = 0;
          for (int j = 0; j < n; j++)
            o += s[j] * emu::bf16_float(vb[((size_t)b * cap + j) * row + (size_t)g * c.D + e]);
          want[qi * c.D + e] = o / l;
        }
      }

  Buf<float> gq(q), out(qn, NAN);
  const std::string name =
      drv::fmt("B=%d T=%d pos0=%d H=%d/KV=%d D=%d", c.B, c.T, c.pos0, c.H, c.KV, c.D);
  if (c.D != 64 && c.D != 128) {
    const int warps = c.B * c.T * c.H;
    emu::launch("attention_bf16kv", dim3((warps + 3) / 4), 128, 0, [&] {
      attention_bf16kv(out, gq, kc, vc, c.B, c.T, c.pos0, cap, c.H, c.KV, c.D, nullptr);
    });
    const vector<float> host = out.get();
    drv::row("attention_bf16kv " + name, drv::max_rel_err(host, want), 1e-4);
    if (c.T == 1) {
      Buf<uint32_t> word(vector<uint32_t>{(uint32_t)c.pos0});
      Buf<float> out2(qn, NAN);
      emu::launch("attention_bf16kv", dim3((warps + 3) / 4), 128, 0, [&] {
        attention_bf16kv(out2, gq, kc, vc, c.B, c.T, -999, cap, c.H, c.KV, c.D, word);
      });
      drv::row("attention_bf16kv device pos vs host (bits differing) " + name,
               (double)drv::count_diff(out2.get(), host), 0.0);
    }
    return;
  }
  const int tq = 16 / G, q_blocks = (c.T + tq - 1) / tq;
  int split_len, n_splits;
  split_plan(c.pos0 + c.T, c.B * c.KV * q_blocks, &split_len, &n_splits);
  const size_t rows = (size_t)c.B * c.T * c.H;
  Buf<float> part_o(rows * n_splits * c.D, NAN), part_ml(rows * n_splits * 2, NAN);
  const dim3 grid(n_splits, c.KV, c.B * q_blocks);
  if (c.D == 64)
    emu::launch("decode_attention_split_d64", grid, 128, 0, [&] {
      decode_attention_split_d64(out, part_o, part_ml, gq, kc, vc, c.T, c.pos0, cap, c.H, c.KV,
                                 split_len, n_splits, nullptr);
    });
  else
    emu::launch("decode_attention_split_d128", grid, 128, 0, [&] {
      decode_attention_split_d128(out, part_o, part_ml, gq, kc, vc, c.T, c.pos0, cap, c.H, c.KV,
                                  split_len, n_splits, nullptr);
    });
  if (n_splits > 1)
    emu::launch("decode_attention_combine", dim3(rows), c.D, 0, [&] {
      decode_attention_combine(out, part_o, part_ml, (int)rows, n_splits, c.D, nullptr, 0, 0);
    });
  const vector<float> host = out.get();
  drv::row(drv::fmt("decode_attention %d split(s) of %d ", n_splits, split_len) + name,
           drv::max_rel_err(host, want), 1e-4);
  if (c.T == 1) device_pos_case(c, gq, kc, vc, cap, host, name);
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  // Decode at cache lengths 1, 7, 300, 2049 (one key; under a tile; a partial tile; 33 splits,
  // the last of one key), GQA ratios 1, 3, 4, 8, a batch of 2; causal chunks (T = 5 after 295
  // keys); a 40-token prefill with G = 3 (blocks of 5 positions) and a 200-token one with G = 4
  // (4 splits: the first query blocks see no key of the later splits); 7 KV heads at 2401 keys
  // (264 / 7 not whole: the device plan must round as the host's, 38 splits of one tile); the
  // general kernel at D = 16.
  const Case cases[] = {
      {1, 1, 0, 4, 1, 64},    {1, 1, 6, 9, 3, 64},    {1, 1, 299, 4, 4, 128},
      {1, 1, 2048, 8, 1, 128}, {1, 1, 2048, 3, 3, 64}, {2, 1, 299, 16, 2, 128},
      {1, 5, 295, 4, 1, 64},  {1, 5, 295, 8, 2, 128}, {1, 40, 0, 9, 3, 64},
      {1, 200, 0, 4, 1, 64},  {1, 1, 2400, 7, 7, 64},
      {1, 1, 299, 4, 2, 16},  {1, 7, 33, 6, 3, 16},
  };
  uint64_t seed = 2000;
  for (const Case& c : cases) run_case(c, seed += 10);
  kv_write_at_device_pos(seed + 1);
  return drv::finish("decode_attention", t0);
}
