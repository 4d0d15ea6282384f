// Runs kernels/adamw8.cu (`--optim paged_adamw_8bit`) under the emulator against the committed
// oracle tests/fixtures/optim8/adam8.safetensors: five steps of a decaying learning rate on
// tensors of 4096 (whole blocks), 5000 (a partial last block), 4097 (a last block of one value)
// and 1000 values (f32 moments: bnb's 32-bit rule), compared BIT FOR BIT after every step with
// the fixture's line-by-line numpy port of bitsandbytes' CUDA kernel (`port.{step}.{tensor}.*`,
// scripts/fixtures_adam8.py) — the same oracle tests/optim8.rs holds the Rust spec to. Then a
// non-finite norm (NaN in clip[0]) must leave every byte unchanged, and a clip coefficient must
// act as g' = g·coef (checked against the kernel itself run on pre-scaled gradients).
// Layout and scalars as the launcher builds them (src/backend/cuda/adamw8.rs, src/train/optim8.rs
// `Consts8`, `Scalars8`).
#include "adamw8.cu"

#include "driver.h"
#include "safetensors.h"

namespace {
using drv::Buf;
using drv::Fixture;
using std::string;
using std::vector;

// scripts/fixtures_adam8.py's HYPER and LRS.
constexpr double kBeta1 = 0.9, kBeta2 = 0.999, kEps = 1e-8, kWd = 0.01;
constexpr double kLrs[] = {1e-3, 9e-4, 8e-4, 7e-4, 6e-4};
constexpr int kSteps = 5;

// Device-side state of one tensor: codes (8-bit) or f32 moments, absmax per 256-value block.
struct Tensor {
  size_t n;
  bool q8;
  std::unique_ptr<Buf<float>> p, g, m32, v32, am1, am2;
  std::unique_ptr<Buf<uint8_t>> mc, vc;
};

// One launch of adamw8_update_f32 over all tensors at learning rate lr, step k (1-based), with
// clip = {norm, coef} as kernels/adamw.cu's adamw_norm_f32 leaves it.
void step(vector<Tensor>& ts, const Buf<float>& maps, double lr, uint64_t k, float norm,
          float coef) {
  vector<AdamTensor> tab;
  vector<Adam8Absmax> amx;
  vector<float2> scal;
  int64_t chunks = 0;
  for (auto& t : ts) {
    void* m = t.q8 ? (void*)t.mc->p : (void*)t.m32->p;
    void* v = t.q8 ? (void*)t.vc->p : (void*)t.v32->p;
    tab.push_back({t.p->p, t.g->p, m, v, (int64_t)t.n, chunks});
    amx.push_back({t.q8 ? t.am1->p : nullptr, t.q8 ? t.am2->p : nullptr});
    chunks += ((int64_t)t.n + ADAMW8_CHUNK - 1) / ADAMW8_CHUNK;
    // Scalars8::new: c₁, c₂ in f64 from the f32 betas, rounded once; then f32 products.
    const double kk = (double)k;
    const float c1 = (float)(1.0 - std::pow((double)(float)kBeta1, kk));
    const float c2 = (float)std::sqrt(1.0 - std::pow((double)(float)kBeta2, kk));
    const float lrf = (float)lr;
    scal.push_back({(-lrf * c2) / c1, c2 * (float)kEps});
  }
  Buf<AdamTensor> dtab(tab);
  Buf<Adam8Absmax> damx(amx);
  Buf<float2> dscal(scal);
  Buf<float> clip(vector<float>{norm, coef});
  // Consts8::new.
  const float b1 = (float)kBeta1, b2 = (float)kBeta2, lrf = (float)lr, wd = (float)kWd;
  const float w1 = 1.0f - b1, w2 = 1.0f - b2, decay = 1.0f - lrf * wd;
  const int T = (int)ts.size();
  const float* mp = maps.p;
  emu::launch("adamw8_update_f32", dim3((unsigned)chunks), ADAMW8_THREADS, 0, [&] {
    adamw8_update_f32(dtab, damx, dscal, T, clip, mp, b1, w1, b2, w2, decay, wd > 0.0f);
  });
}

// Number of values (bytes for codes, bit patterns for floats) that differ.
template <class T>
size_t differ(const vector<T>& a, const vector<T>& b) {
  if (a.size() != b.size()) return std::max(a.size(), b.size());
  size_t d = 0;
  for (size_t i = 0; i < a.size(); i++) d += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return d;
}

vector<Tensor> fresh(const Fixture& fx, size_t count) {
  vector<Tensor> ts;
  for (size_t t = 0; t < count; t++) {
    Tensor x;
    const auto p0 = fx.get<float>(drv::fmt("p0.%zu", t));
    x.n = p0.size();
    x.q8 = x.n >= 4096;  // optim8::MIN_8BIT_SIZE
    x.p.reset(new Buf<float>(p0));
    x.g.reset(new Buf<float>(x.n));
    if (x.q8) {
      const size_t blocks = (x.n + 255) / 256;
      x.mc.reset(new Buf<uint8_t>(x.n, 0));  // bnb's init_state: zero codes, zero absmax
      x.vc.reset(new Buf<uint8_t>(x.n, 0));
      x.am1.reset(new Buf<float>(blocks, 0.f));
      x.am2.reset(new Buf<float>(blocks, 0.f));
    } else {
      x.m32.reset(new Buf<float>(x.n, 0.f));
      x.v32.reset(new Buf<float>(x.n, 0.f));
    }
    ts.push_back(std::move(x));
  }
  return ts;
}

void set_grads(const Fixture& fx, vector<Tensor>& ts, int s, float scale) {
  for (size_t t = 0; t < ts.size(); t++) {
    auto g = fx.get<float>(drv::fmt("grad.%d.%zu", s, t));
    for (float& x : g) x *= scale;
    std::memcpy(ts[t].g->p, g.data(), g.size() * sizeof(float));
  }
}

// Every state value of every tensor, as raw bytes (for the "nothing changed" check).
vector<uint8_t> snapshot(const vector<Tensor>& ts) {
  vector<uint8_t> s;
  auto put = [&](const void* p, size_t bytes) {
    s.insert(s.end(), (const uint8_t*)p, (const uint8_t*)p + bytes);
  };
  for (const auto& t : ts) {
    put(t.p->p, t.n * 4);
    if (t.q8) {
      put(t.mc->p, t.n);
      put(t.vc->p, t.n);
      put(t.am1->p, t.am1->n * 4);
      put(t.am2->p, t.am2->n * 4);
    } else {
      put(t.m32->p, t.n * 4);
      put(t.v32->p, t.n * 4);
    }
  }
  return s;
}

// Five steps against the port, bit for bit.
void port_case(const Fixture& fx, const Buf<float>& maps) {
  auto ts = fresh(fx, 4);
  for (int s = 0; s < kSteps; s++) {
    set_grads(fx, ts, s, 1.0f);
    step(ts, maps, kLrs[s], (uint64_t)s + 1, 1.0f, 1.0f);
    for (size_t t = 0; t < ts.size(); t++) {
      const auto& x = ts[t];
      const string k = drv::fmt("port.%d.%zu.", s, t);
      size_t d = differ(x.p->get(), fx.get<float>(k + "p"));
      if (x.q8) {
        d += differ(x.mc->get(), fx.get<uint8_t>(k + "m_codes"));
        d += differ(x.vc->get(), fx.get<uint8_t>(k + "v_codes"));
        d += differ(x.am1->get(), fx.get<float>(k + "m_absmax"));
        d += differ(x.am2->get(), fx.get<float>(k + "v_absmax"));
      } else {
        d += differ(x.m32->get(), fx.get<float>(k + "m"));
        d += differ(x.v32->get(), fx.get<float>(k + "v"));
      }
      drv::row(drv::fmt("adamw8 step %d tensor %zu (n %zu, %s): values unlike the port", s + 1, t,
                        x.n, x.q8 ? "8-bit" : "f32"),
               (double)d, 0.0);
    }
  }
}

// A non-finite norm: the kernel returns before touching anything.
void nan_norm_case(const Fixture& fx, const Buf<float>& maps) {
  auto ts = fresh(fx, 4);
  set_grads(fx, ts, 0, 1.0f);
  step(ts, maps, kLrs[0], 1, 1.0f, 1.0f);
  const auto before = snapshot(ts);
  set_grads(fx, ts, 1, 1.0f);
  step(ts, maps, kLrs[1], 2, NAN, 1.0f);
  drv::row("adamw8 NaN norm: state bytes changed", (double)differ(snapshot(ts), before), 0.0);
}

// Clipping: coef = 0.25 on the fixture's gradients equals coef = 1 on gradients pre-scaled by
// 0.25 (a power of two: the scaling is exact), bit for bit, over two steps.
void clip_case(const Fixture& fx, const Buf<float>& maps) {
  auto a = fresh(fx, 4), b = fresh(fx, 4);
  for (int s = 0; s < 2; s++) {
    set_grads(fx, a, s, 1.0f);
    step(a, maps, kLrs[s], (uint64_t)s + 1, 4.0f, 0.25f);
    set_grads(fx, b, s, 0.25f);
    step(b, maps, kLrs[s], (uint64_t)s + 1, 1.0f, 1.0f);
  }
  drv::row("adamw8 clip coef 0.25 vs pre-scaled gradients: state bytes differing",
           (double)differ(snapshot(a), snapshot(b)), 0.0);
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  string here = __FILE__;
  here = here.substr(0, here.find_last_of('/'));
  const Fixture fx(here + "/../../tests/fixtures/optim8/adam8.safetensors");
  vector<float> maps = fx.get<float>("map.signed");
  const auto u = fx.get<float>("map.unsigned");
  maps.insert(maps.end(), u.begin(), u.end());
  const Buf<float> dmaps(maps);
  port_case(fx, dmaps);
  nan_norm_case(fx, dmaps);
  clip_case(fx, dmaps);
  return drv::finish("adamw8", t0);
}
