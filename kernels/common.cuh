// Shared device helpers for qlora's kernels.
#pragma once
#include <cstdint>

// Grid-stride loop over [0, n).
#define GRID_STRIDE(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (int64_t)(n); i += (int64_t)gridDim.x * blockDim.x)
