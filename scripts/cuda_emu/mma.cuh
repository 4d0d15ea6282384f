// Host emulation of kernels/mma.cuh (the one file of inline-PTX tensor-core instructions), with
// the same functions and signatures; run.sh copies it over the real one in the build folder, so
// the kernels' `#include "mma.cuh"` finds this file. Semantics as we read the PTX ISA (sm_80+):
//
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32  d = A·B + c, one warp, lane l, g = l / 4,
// t = l % 4; a register holds two bf16, the lower column (A) or row (B) index in its low half:
//   A (16×16, row-major)  a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
//                         a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16×8, k × n)       b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C, D (16×8, f32)      c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// Rounding: the ISA leaves the accumulation order and precision to the implementation. Here
// each d = c + Σ_k A·B is formed in f64 (the bf16 products are exact, the 17-term sum exact up
// to 2^-53 relative) and rounded once toward zero to f32, a model of Ampere's truncating
// accumulation; real hardware may differ in the last bit(s) of each 16-term block.
//
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 {r0..r3}, [addr]: lanes 8i .. 8i+7 give the
// addresses of rows 0..7 of matrix i (16 bytes each, 16-byte aligned, in shared memory).
//   without .trans: r_i of lane l = M_i[l / 4][2(l % 4)] (low half), M_i[l / 4][2(l % 4) + 1]
//   with .trans:    r_i of lane l = M_i[2(l % 4)][l / 4] (low half), M_i[2(l % 4) + 1][l / 4]
// where M_i[r][c] is element c of the row whose address lane 8i + r gave.
#pragma once
#include <cstdint>

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  return (uint32_t)emu::bf16_bits(lo) | ((uint32_t)emu::bf16_bits(hi) << 16);
}

namespace emu {
struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};
struct Frag4 {
  uint32_t r[4];
};
inline float half_of(uint32_t reg, int hi) { return bf16_float((uint16_t)(hi ? reg >> 16 : reg)); }
// f64 → f32 rounding toward zero.
inline float round_to_zero(double d) {
  float f = (float)d;  // nearest
  if (std::fabs((double)f) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  return f;
}
}  // namespace emu

// c += A·B for one 16×8×16 tile (fragments as in the header).
__device__ __forceinline__ void mma_bf16_16x8x16(float* c, const uint32_t* a, uint32_t b0,
                                                 uint32_t b1) {
  emu::MmaIn in;
  for (int i = 0; i < 4; i++) in.a[i] = a[i], in.c[i] = c[i];
  in.b[0] = b0;
  in.b[1] = b1;
  const emu::Frag4 d = emu::collective<emu::Frag4>(
      emu::OP_MMA, 0xffffffffu, in, [](const emu::MmaIn* ins, emu::Frag4* outs) {
        // Unpack the whole tiles from the 32 lanes' fragments.
        float A[16][16], B[16][8];
        for (int l = 0; l < 32; l++) {
          const int g = l / 4, t = l % 4;
          for (int h = 0; h < 2; h++) {
            A[g][2 * t + h] = emu::half_of(ins[l].a[0], h);
            A[g + 8][2 * t + h] = emu::half_of(ins[l].a[1], h);
            A[g][2 * t + 8 + h] = emu::half_of(ins[l].a[2], h);
            A[g + 8][2 * t + 8 + h] = emu::half_of(ins[l].a[3], h);
            B[2 * t + h][g] = emu::half_of(ins[l].b[0], h);
            B[2 * t + 8 + h][g] = emu::half_of(ins[l].b[1], h);
          }
        }
        for (int l = 0; l < 32; l++) {
          const int g = l / 4, t = l % 4;
          for (int e = 0; e < 4; e++) {
            const int i = g + 8 * (e >> 1), j = 2 * t + (e & 1);
            double s = ins[l].c[e];
            for (int k = 0; k < 16; k++) s += (double)A[i][k] * (double)B[k][j];
            float r = emu::round_to_zero(s);
            std::memcpy(&outs[l].r[e], &r, 4);
          }
        }
      });
  for (int e = 0; e < 4; e++) std::memcpy(&c[e], &d.r[e], 4);
}

namespace emu {
template <bool TRANS>
inline void ldmatrix(uint32_t* r, const __nv_bfloat16* p) {
  if (!in_shared(p, 16)) fail("ldmatrix row address %p is not in shared memory", (const void*)p);
  if ((uintptr_t)p % 16 != 0) fail("ldmatrix row address %p is not 16-byte aligned", (const void*)p);
  const Frag4 f = collective<Frag4>(
      TRANS ? OP_LDMATRIX_T : OP_LDMATRIX, 0xffffffffu, p,
      [](const __nv_bfloat16* const* rows, Frag4* outs) {
        for (int l = 0; l < 32; l++)
          for (int i = 0; i < 4; i++) {
            uint16_t lo, hi;
            if (TRANS) {
              lo = rows[8 * i + 2 * (l % 4)][l / 4].bits;
              hi = rows[8 * i + 2 * (l % 4) + 1][l / 4].bits;
            } else {
              lo = rows[8 * i + l / 4][2 * (l % 4)].bits;
              hi = rows[8 * i + l / 4][2 * (l % 4) + 1].bits;
            }
            outs[l].r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
          }
      });
  for (int i = 0; i < 4; i++) r[i] = f.r[i];
}
}  // namespace emu

// Four 8×8 bf16 matrices from shared memory; `p` is this lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const __nv_bfloat16* p) {
  emu::ldmatrix<false>(r, p);
}

// As ldmatrix_x4, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const __nv_bfloat16* p) {
  emu::ldmatrix<true>(r, p);
}
