// Runs kernels/nf4_quantize.cu under the emulator against bitsandbytes' own output: the 14 cases
// of the committed golden fixture tests/fixtures/nf4/nf4_golden.safetensors (bnb 0.50.2
// `quantize_4bit(quant_type="nf4")` on odd shapes, partial blocks, all-zero blocks, outliers,
// block sizes 32..4096, a bf16 input; scripts/fixtures_nf4.py). Per case, byte for byte: the
// packed codes, and the f32 absmax where bnb stored it unnested (with double quantization the
// launcher nests the kernel's absmax on the host with the spec's code, which tests/nf4.rs
// covers). Then the f16 loader (widened f16 inputs: the f16 kernel must equal the f32 kernel on
// the same values), a one-CTA grid striding over every block (the launcher caps the grid), and
// the first non-finite index reported through `bad`.
#include "nf4_quantize.cu"

#include "driver.h"
#include "safetensors.h"

namespace {
using drv::Buf;
using drv::Fixture;
using std::string;
using std::vector;

struct Out {
  vector<uint8_t> packed;
  vector<float> absmax;
  unsigned long long bad;
};

// One launch as src/backend/cuda/nf4_quantize.rs makes it (256 threads, one warp per block;
// `grid` 0 = ceil(nblocks / 8)).
template <class T>
Out quantize(const char* kernel, const vector<T>& x, int log2, unsigned grid = 0) {
  const int64_t n = (int64_t)x.size(), bs = (int64_t)1 << log2, nblocks = (n + bs - 1) / bs;
  Buf<T> dx(x);
  Buf<uint8_t> packed((size_t)(n + 1) / 2, 0xAB);
  Buf<float> absmax((size_t)nblocks, NAN);
  Buf<unsigned long long> bad(1, ~0ull);
  if (grid == 0) grid = (unsigned)((nblocks + 7) / 8);
  emu::launch(kernel, dim3(grid), NF4Q_THREADS, 0, [&] {
    if constexpr (sizeof(T) == 4) nf4_quantize_f32(packed, absmax, bad, dx, n, log2);
    else if (std::strcmp(kernel, "nf4_quantize_f16") == 0) nf4_quantize_f16(packed, absmax, bad, dx, n, log2);
    else nf4_quantize_bf16(packed, absmax, bad, dx, n, log2);
  });
  return {packed.get(), absmax.get(), bad.p[0]};
}

template <class T>
size_t differ(const vector<T>& a, const vector<T>& b) {
  if (a.size() != b.size()) return std::max(a.size(), b.size());
  size_t d = 0;
  for (size_t i = 0; i < a.size(); i++) d += std::memcmp(&a[i], &b[i], sizeof(T)) != 0;
  return d;
}

// The case's "blocksize" from nf4_golden.json (its object starts at `"index": k,`).
int blocksize_of(const string& json, int k) {
  const size_t at = json.find(drv::fmt("\"index\": %d,", k));
  const size_t b = json.find("\"blocksize\":", at);
  if (at == string::npos || b == string::npos) {
    std::fprintf(stderr, "cuda_emu: nf4_golden.json has no case %d\n", k);
    std::exit(2);
  }
  return std::atoi(json.c_str() + b + 12);
}

int log2_of(int bs) {
  int l = 0;
  while ((1 << l) < bs) l++;
  return l;
}

void golden_case(const Fixture& fx, const string& json, int k) {
  const string c = drv::fmt("case%d.", k);
  const int bs = blocksize_of(json, k), log2 = log2_of(bs);
  const bool bf16 = fx.dtype(c + "input") == "U16";
  const Out o = bf16 ? quantize("nf4_quantize_bf16", fx.get<uint16_t>(c + "input"), log2)
                     : quantize("nf4_quantize_f32", fx.get<float>(c + "input"), log2);
  const size_t n = bf16 ? fx.get<uint16_t>(c + "input").size() : fx.get<float>(c + "input").size();
  drv::row(drv::fmt("nf4_quantize case %d (%zu values, block %d%s): packed bytes unlike bnb", k, n,
                    bs, bf16 ? ", bf16" : ""),
           (double)differ(o.packed, fx.get<uint8_t>(c + "packed")), 0.0);
  if (fx.dtype(c + "absmax") == "F32")
    drv::row(drv::fmt("nf4_quantize case %d: absmax values unlike bnb", k),
             (double)differ(o.absmax, fx.get<float>(c + "absmax")), 0.0);
  drv::row(drv::fmt("nf4_quantize case %d: non-finite index reported", k),
           o.bad == ~0ull ? 0.0 : 1.0, 0.0);
}

// f16 inputs: the f32 values rounded to f16 (and scaled into its range), through the f16 loader
// and, widened, through the f32 one: identical codes and absmax.
void f16_case(const Fixture& fx, int k, int log2) {
  const auto x = fx.get<float>(drv::fmt("case%d.input", k));
  vector<uint16_t> h(x.size());
  vector<float> wide(x.size());
  for (size_t i = 0; i < x.size(); i++) {
    const _Float16 v = (_Float16)(x[i] * 0.01f);  // subnormal f16 values included
    std::memcpy(&h[i], &v, 2);
    wide[i] = (float)v;
  }
  const Out a = quantize("nf4_quantize_f16", h, log2), b = quantize("nf4_quantize_f32", wide, log2);
  drv::row(drv::fmt("nf4_quantize f16 loader, case %d input: bytes unlike the f32 kernel", k),
           (double)(differ(a.packed, b.packed) + differ(a.absmax, b.absmax)), 0.0);
}

// One CTA (8 warps) striding over all blocks equals the full grid.
void grid_case(const Fixture& fx, int k, int log2) {
  const auto x = fx.get<float>(drv::fmt("case%d.input", k));
  const Out a = quantize("nf4_quantize_f32", x, log2, 1), b = quantize("nf4_quantize_f32", x, log2);
  drv::row(drv::fmt("nf4_quantize one-CTA grid, case %d: bytes unlike the full grid", k),
           (double)(differ(a.packed, b.packed) + differ(a.absmax, b.absmax)), 0.0);
}

// NaN at 1000 and +inf at 777 (other blocks), NaN at 2000: bad = 777, whatever block order.
void nonfinite_case(const Fixture& fx, int k, int log2) {
  auto x = fx.get<float>(drv::fmt("case%d.input", k));
  x[1000] = NAN;
  x[777] = INFINITY;
  x[2000] = NAN;
  const Out o = quantize("nf4_quantize_f32", x, log2);
  drv::row("nf4_quantize NaN/inf input: |reported index - 777|",
           o.bad == ~0ull ? INFINITY : std::fabs((double)o.bad - 777.0), 0.0);
}

}  // namespace

int main() {
  const auto t0 = std::chrono::steady_clock::now();
  string here = __FILE__;
  here = here.substr(0, here.find_last_of('/'));
  const Fixture fx(here + "/../../tests/fixtures/nf4/nf4_golden.safetensors");
  std::ifstream jf(here + "/../../tests/fixtures/nf4/nf4_golden.json");
  const string json((std::istreambuf_iterator<char>(jf)), std::istreambuf_iterator<char>());
  for (int k = 0; fx.has(drv::fmt("case%d.input", k)); k++) golden_case(fx, json, k);
  f16_case(fx, 1, 6);   // 7×13: a partial block, an odd count (padding nibble)
  f16_case(fx, 6, 8);   // outliers
  f16_case(fx, 13, 5);  // block 32, 185 values
  grid_case(fx, 3, 6);  // 512 blocks
  nonfinite_case(fx, 3, 6);
  return drv::finish("nf4_quantize", t0);
}
