// Runs kernels/flash_attention.cu (forward and backward, tensor-core and f32 paths) over packed
// (variable-length) batches under the host emulator against an f64 reference of the math in the
// kernel's header, with the bounds of src/check/attention.rs. Launch configurations and tile
// tables as src/backend/cuda/flash_attention.rs.
// Usage: flash_attention_emu [H KV D len...]   (no arguments: the fixed case list)
#include "flash_attention.cu"

#include "driver.h"

using drv::Buf;
using std::vector;

namespace {

struct Case {
  vector<int> lens;
  int H, KV, D;
};

struct Ref {
  vector<double> out, lse, dq, dk, dv;
};

// f64 reference: [out, lse, dq, dk, dv] from the f32 inputs (c = 1/√D, causal within each
// sequence, GQA).
Ref reference(const Case& s, const vector<int>& cu, const vector<float>& q, const vector<float>& k,
              const vector<float>& v, const vector<float>& dout) {
  const int H = s.H, KV = s.KV, D = s.D, rows = cu.back();
  Ref r;
  r.out.assign(q.size(), 0);
  r.lse.assign((size_t)rows * H, 0);
  r.dq.assign(q.size(), 0);
  r.dk.assign(k.size(), 0);
  r.dv.assign(k.size(), 0);
  const double c = 1.0 / std::sqrt((double)D);
  for (size_t b = 0; b + 1 < cu.size(); b++) {
    const int row0 = cu[b], T = cu[b + 1] - row0;
    vector<double> sc(T), dp(T), p(T);
    for (int t = 0; t < T; t++)
      for (int h = 0; h < H; h++) {
        const int g = h / (H / KV);
        const size_t qi = (((size_t)row0 + t) * H + h) * D;
        auto kv = [&](int j) { return (((size_t)row0 + j) * KV + g) * D; };
        double m = -INFINITY;
        for (int j = 0; j <= t; j++) {
          double a = 0;
          for (int e = 0; e < D; e++) a += (double)q[qi + e] * k[kv(j) + e];
          sc[j] = a * c;
          m = std::max(m, sc[j]);
        }
        double l = 0;
        for (int j = 0; j <= t; j++) l += std::exp(sc[j] - m);
        r.lse[qi / D] = m + std::log(l);
        double delta = 0;
        for (int j = 0; j <= t; j++) {
          p[j] = std::exp(sc[j] - m) / l;
          double a = 0;
          for (int e = 0; e < D; e++) {
            r.out[qi + e] += p[j] * v[kv(j) + e];
            a += (double)dout[qi + e] * v[kv(j) + e];
          }
          dp[j] = a;
          delta += p[j] * a;
        }
        for (int j = 0; j <= t; j++) {
          const double ds = p[j] * (dp[j] - delta);
          for (int e = 0; e < D; e++) {
            r.dq[qi + e] += c * ds * k[kv(j) + e];
            r.dk[kv(j) + e] += c * ds * q[qi + e];
            r.dv[kv(j) + e] += p[j] * dout[qi + e];
          }
        }
      }
  }
  return r;
}

// src/backend/cuda/flash_attention.rs bwd_smem_bytes.
size_t bwd_smem_bytes(int d) {
  const size_t bq = d == 64 ? 64 : 32;
  return (2 * 64 + 2 * bq) * (d + 8) * 2 + bq * (64 + 8) * 2 + 2 * bq * 4;
}

// src/backend/cuda/flash_attention.rs seq_tables: (forward, backward) (sequence, tile) pairs,
// longest work first (the order matters only for speed; the emulator runs blocks in a random
// order anyway).
std::pair<vector<int>, vector<int>> tables(const vector<int>& lens) {
  vector<std::pair<int, int>> t;
  for (int s = 0; s < (int)lens.size(); s++)
    for (int i = 0; i * 64 < lens[s]; i++) t.push_back({s, i});
  vector<int> fwd, bwd;
  std::stable_sort(t.begin(), t.end(), [](auto a, auto b) { return a.second > b.second; });
  for (auto [s, i] : t) fwd.insert(fwd.end(), {s, i});
  std::stable_sort(t.begin(), t.end(), [&](auto a, auto b) {
    return lens[a.first] - 64 * a.second > lens[b.first] - 64 * b.second;
  });
  for (auto [s, i] : t) bwd.insert(bwd.end(), {s, i});
  return {fwd, bwd};
}

void run_case(const Case& s, uint64_t seed) {
  const int H = s.H, KV = s.KV, D = s.D, nseq = (int)s.lens.size();
  vector<int> cu{0};
  for (int l : s.lens) cu.push_back(cu.back() + l);
  const int rows = cu.back();
  const size_t qn = (size_t)rows * H * D, kvn = (size_t)rows * KV * D, rh = (size_t)rows * H;
  const bool tc = D == 64 || D == 128;
  // As src/check/attention.rs: q, k in ±2, v, dout in ±1.
  const vector<float> q = drv::test_values(seed, qn, 2), k = drv::test_values(seed + 1, kvn, 2),
                      v = drv::test_values(seed + 2, kvn, 1),
                      dout = drv::test_values(seed + 3, qn, 1);
  const Ref r = reference(s, cu, q, k, v, dout);
  // One CTA per (tile, head) (forward) or (tile, kv head) (backward), entry-major.
  auto [fwd_t, bwd_t] = tables(s.lens);
  const unsigned ntiles = fwd_t.size() / 2;
  Buf<int> gcu(cu), gft(fwd_t), gbt(bwd_t);
  Buf<float> gq(q), gk(k), gv(v), gdo(dout);
  // Outputs start as NaN: anything left unwritten fails.
  Buf<float> out(qn, NAN), lse(rh, NAN);
  if (tc) {
    const dim3 grid(ntiles * H);
    if (D == 64)
      emu::launch("flash_attention_fwd_bf16_d64", grid, 128, 0, [&] {
        flash_attention_fwd_bf16_d64(out, lse, gq, gk, gv, gcu, gft, H, KV);
      });
    else
      emu::launch("flash_attention_fwd_bf16_d128", grid, 128, 0, [&] {
        flash_attention_fwd_bf16_d128(out, lse, gq, gk, gv, gcu, gft, H, KV);
      });
  } else {
    emu::launch("flash_attention_fwd_f32", dim3((rh + 3) / 4), 128, 0, [&] {
      flash_attention_fwd_f32(out, lse, gq, gk, gv, gcu, nseq, H, KV, D);
    });
  }
  // The backward gets the reference out and lse (as the check does), so it is measured alone.
  vector<float> ro(qn), rl(rh);
  for (size_t i = 0; i < qn; i++) ro[i] = (float)r.out[i];
  for (size_t i = 0; i < rh; i++) rl[i] = (float)r.lse[i];
  Buf<float> gro(ro), grl(rl), delta(rh, NAN), dq(qn, NAN), dk(kvn, NAN), dv(kvn, NAN);
  emu::launch("flash_attention_delta_f32", dim3((rh + 7) / 8), 256, 0, [&] {
    flash_attention_delta_f32(delta, dq, gdo, gro, (int64_t)rh, D);
  });
  if (tc) {
    const dim3 grid(ntiles * KV);
    if (D == 64)
      emu::launch("flash_attention_bwd_bf16_d64", grid, 128, bwd_smem_bytes(D), [&] {
        flash_attention_bwd_bf16_d64(dq, dk, dv, gdo, gq, gk, gv, grl, delta, gcu, gbt, H, KV);
      });
    else
      emu::launch("flash_attention_bwd_bf16_d128", grid, 128, bwd_smem_bytes(D), [&] {
        flash_attention_bwd_bf16_d128(dq, dk, dv, gdo, gq, gk, gv, grl, delta, gcu, gbt, H, KV);
      });
  } else {
    emu::launch("flash_attention_bwd_dq_f32", dim3((rh + 3) / 4), 128, 0, [&] {
      flash_attention_bwd_dq_f32(dq, gdo, gq, gk, gv, grl, delta, gcu, nseq, H, KV, D);
    });
    const size_t kv_rows = (size_t)rows * KV;
    emu::launch("flash_attention_bwd_dkdv_f32", dim3((kv_rows + 3) / 4), 128, 0, [&] {
      flash_attention_bwd_dkdv_f32(dk, dv, gdo, gq, gk, gv, grl, delta, gcu, nseq, H, KV, D);
    });
  }

  // Rows and bounds of src/check/attention.rs.
  std::string lens;
  for (int l : s.lens) lens += (lens.empty() ? "" : ", ") + std::to_string(l);
  lens = nseq == 1 ? "T=" + lens : "lens=[" + lens + "]";
  const std::string n =
      drv::fmt("flash attn %s %s H=%d/KV=%d D=%d", tc ? "bf16 tc" : "f32", lens.c_str(), H, KV, D);
  const double out_b = tc ? 2e-2 : 1e-4, lse_b = tc ? 2e-2 : 1e-4, zero_b = tc ? 1e-2 : 1e-6;
  drv::row(n + " out (max rel)", drv::max_rel_err(out.get(), r.out), out_b);
  drv::row(n + " lse (max abs)", drv::max_abs_err(lse.get(), r.lse), lse_b);
  const char* names[3] = {"dq", "dk", "dv"};
  const Buf<float>* got[3] = {&dq, &dk, &dv};
  const vector<double>* want[3] = {&r.dq, &r.dk, &r.dv};
  double worst_cos = 0;
  for (int i = 0; i < 3; i++) {
    const vector<float> g = got[i]->get();
    const vector<double>& w = *want[i];
    bool zero = true;
    for (double x : w) zero = zero && std::fabs(x) < 1e-12;  // T = 1: dq = dk = 0 exactly
    if (zero) {
      drv::row(n + " " + names[i] + " (max abs, exact 0)", drv::max_abs_err(g, w), zero_b);
    } else if (tc) {
      drv::row(n + " " + names[i] + " (rel l2)", drv::rel_l2(g, w), 2e-2);
      worst_cos = std::max(worst_cos, 1.0 - drv::cosine(g, w));
    } else {
      drv::row(n + " " + names[i] + " (max rel)", drv::max_rel_err(g, w), 1e-4);
    }
  }
  if (tc) drv::row(n + " dq/dk/dv (1 - cos)", worst_cos, 1e-3);
}

}  // namespace

int main(int argc, char** argv) {
  const auto t0 = std::chrono::steady_clock::now();
  if (argc >= 5) {
    Case c{{}, atoi(argv[1]), atoi(argv[2]), atoi(argv[3])};
    for (int i = 4; i < argc; i++) c.lens.push_back(atoi(argv[i]));
    run_case(c, 7);
    return drv::finish("flash_attention", t0);
  }
  // (lens, H, KV, D): src/check/attention.rs's tensor-core cases (single sequences of 1, 17,
  // 300, 513: inside, short of and past the 64-row tiles and the 32-query backward tiles of
  // D = 128; GQA ratios 1, 3, 4; two equal sequences; the packed [1, 17, 64, 130] and
  // [300, 5, 213], sequences starting mid-tile, with ratios 1 and 4) plus single sequences of 70
  // and 130 with ratio 2 and a batch holding an empty sequence; the f32 path on the tiny
  // fixtures' head dims at T 1, 17, 70, two sequences of 130 and the packed [1, 17, 64, 130] and
  // [7, 0, 70] (the f32 kernels' warp reductions make long rows slow to emulate, so the check's
  // T = 300 and 513 and [300, 5, 213] are left out).
  const Case cases[] = {
      {{1}, 4, 1, 64},
      {{17, 17}, 6, 2, 128},
      {{70}, 2, 2, 64},
      {{130}, 4, 2, 128},
      {{130}, 3, 1, 64},
      {{300}, 2, 2, 64},
      {{513}, 4, 1, 128},
      {{513}, 3, 1, 64},
      {{1, 17, 64, 130}, 4, 1, 64},
      {{1, 17, 64, 130}, 2, 2, 128},
      {{300, 5, 213}, 4, 4, 64},
      {{300, 5, 213}, 8, 2, 128},
      {{7, 0, 70}, 2, 1, 64},
      {{1}, 4, 1, 24},
      {{17}, 4, 4, 16},
      {{70}, 6, 2, 24},
      {{130, 130}, 4, 1, 16},
      {{1, 17, 64, 130}, 4, 1, 24},
      {{7, 0, 70}, 4, 2, 16},
  };
  uint64_t seed = 1000;
  for (const Case& s : cases) run_case(s, seed += 10);
  return drv::finish("flash_attention", t0);
}
