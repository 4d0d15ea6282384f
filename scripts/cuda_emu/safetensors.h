// A minimal reader of the committed safetensors fixtures (8-byte little-endian header length, a
// JSON header of "name":{"dtype":..,"shape":[..],"data_offsets":[a,b]}, then the raw
// little-endian data) for the drivers that compare kernels with Python oracles' outputs.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

namespace drv {

struct Fixture {
  std::vector<char> data;
  std::map<std::string, std::pair<size_t, size_t>> at;  // name → [begin, end) bytes into data
  std::map<std::string, std::string> dtypes;             // name → "F32", "U8", ...
  explicit Fixture(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
      std::fprintf(stderr, "cuda_emu: cannot read %s\n", path.c_str());
      std::exit(2);
    }
    uint64_t n = 0;
    f.read((char*)&n, 8);
    std::string h(n, '\0');
    f.read(h.data(), (std::streamsize)n);
    data.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    for (size_t i = h.find('"'); i != std::string::npos; i = h.find('"', i)) {
      const size_t e = h.find('"', i + 1);
      const std::string key = h.substr(i + 1, e - i - 1);
      const size_t brace = h.find_first_not_of(" :", e + 1);
      if (brace == std::string::npos || h[brace] != '{') {
        i = e + 1;
        continue;
      }
      const size_t close = h.find('}', brace);
      const size_t off = h.find("\"data_offsets\"", brace);
      if (off != std::string::npos && off < close) {
        const size_t lb = h.find('[', off);
        size_t a = 0, b = 0;
        std::sscanf(h.c_str() + lb, "[%zu,%zu]", &a, &b);
        at[key] = {a, b};
        const size_t dt = h.find("\"dtype\"", brace);
        if (dt != std::string::npos && dt < close) {
          const size_t q0 = h.find('"', h.find(':', dt)) + 1;
          dtypes[key] = h.substr(q0, h.find('"', q0) - q0);
        }
      }
      i = close + 1;
    }
  }
  bool has(const std::string& name) const { return at.count(name) != 0; }
  std::string dtype(const std::string& name) const {
    auto it = dtypes.find(name);
    return it == dtypes.end() ? "" : it->second;
  }
  template <class T>
  std::vector<T> get(const std::string& name) const {
    auto it = at.find(name);
    if (it == at.end()) {
      std::fprintf(stderr, "cuda_emu: the fixture has no tensor %s\n", name.c_str());
      std::exit(2);
    }
    const auto [a, b] = it->second;
    std::vector<T> v((b - a) / sizeof(T));
    std::memcpy(v.data(), data.data() + a, b - a);
    return v;
  }
};

}  // namespace drv
