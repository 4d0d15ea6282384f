//! CPU specification of `kernels/nf4_gemm_dx.cu` (the backward product `dx = dy · W` of an NF4
//! projection on tensor cores). PLACEHOLDER: to be written.
