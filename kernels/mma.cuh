// Tensor-core building blocks shared by the bf16 GEMM-shaped kernels (nf4_gemm.cu,
// nf4_gemm_dx.cu, flash_attention.cu): bf16 packing, the mma.sync m16n8k16 product and the
// ldmatrix fragment loads. Semantics as the PTX ISA defines them (sm_80+):
//
// mma.m16n8k16.row.col bf16 → f32 (lane l, g = l / 4, t = l % 4; each 32-bit register holds two
// bf16, the lower k index in the low half):
//   A (16×16, row-major)  a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   B (16×8, k × n)       b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C (16×8, f32)         c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
// ldmatrix.m8n8.x4.b16: lane l gives the address of row l % 8 of matrix l / 8 (16 bytes each);
//   register i of lane l receives elements [l / 4][2(l % 4), 2(l % 4) + 1] of matrix i, or with
//   .trans elements [2(l % 4)][l / 4] (low) and [2(l % 4) + 1][l / 4] (high).
//
// scripts/cuda_emu/ replaces this one file with host C++ of the same semantics to run the real
// kernels on the CPU, so every inline-PTX tensor-core instruction the kernels use lives here.
#pragma once
#include <cuda_bf16.h>
#include <cstdint>

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
  return *reinterpret_cast<uint32_t*>(&v);
}

// c += A·B for one 16×8×16 tile (fragments as in the header).
__device__ __forceinline__ void mma_bf16_16x8x16(float* c, const uint32_t* a, uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 bf16 matrices from shared memory; `p` is this lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const __nv_bfloat16* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// As ldmatrix_x4, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const __nv_bfloat16* p) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
