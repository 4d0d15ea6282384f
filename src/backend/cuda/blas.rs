//! Row-major GEMMs through cuBLAS, for every product whose operands are plain device matrices
//! (dense weights, the LoRA rank-r products, the dequantize + cuBLAS baselines).
//!
//! `C[m, n] = alpha · op(A) · op(B) + beta · C`, all row-major: `A` is stored `[m, k]`, or
//! `[k, m]` when `ta` (then `op(A) = Aᵀ`); `B` is stored `[k, n]`, or `[n, k]` when `tb`.
//! cuBLAS is column-major, where a row-major `[r, c]` matrix reads as its transpose, so the call
//! computes `Cᵀ = op(B)ᵀ · op(A)ᵀ`: B is cuBLAS' first operand (`N` with `ld = n`, or `T` with
//! `ld = k` when `tb`), A the second (`N` with `ld = k`, or `T` with `ld = m` when `ta`), `ldc = n`.
//! [`gemm_f32`] runs sgemm (f32 in, f32 out); [`gemm_half`] runs `cublasGemmEx` on bf16 (or f16)
//! operands with f32 output and f32 accumulation (tensor cores).

use crate::error::{Error, Result};
use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

/// Shape and operand layout of one row-major product (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowMajor {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// `A` is stored `[k, m]` and used transposed.
    pub ta: bool,
    /// `B` is stored `[n, k]` and used transposed.
    pub tb: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl RowMajor {
    /// `C[m, n] = A[m, k] · B[n, k]ᵀ` (a projection `x · Wᵀ`).
    pub fn xwt(m: usize, k: usize, n: usize) -> Self {
        RowMajor {
            m,
            n,
            k,
            ta: false,
            tb: true,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `C[m, n] = A[m, k] · B[k, n]` (e.g. `dx = dy · W`).
    pub fn xw(m: usize, k: usize, n: usize) -> Self {
        RowMajor {
            tb: false,
            ..Self::xwt(m, k, n)
        }
    }

    /// `C[m, n] = A[k, m]ᵀ · B[k, n]` (e.g. a weight gradient `dyᵀ · x`).
    pub fn xtw(m: usize, k: usize, n: usize) -> Self {
        RowMajor {
            ta: true,
            tb: false,
            ..Self::xwt(m, k, n)
        }
    }

    /// The same product scaled by `alpha` and added to `beta · C`.
    pub fn scaled(self, alpha: f32, beta: f32) -> Self {
        RowMajor {
            alpha,
            beta,
            ..self
        }
    }

    fn check(&self, c: usize, a: usize, b: usize, what: &str) -> Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        if c < m * n || a < m * k || b < k * n {
            return Err(Error::Backend(format!(
                "{what}: buffers hold C {c}, A {a}, B {b} values; [{m}, {k}] · [{k}, {n}] needs {}, {}, {}",
                m * n,
                m * k,
                k * n
            )));
        }
        if [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
            return Err(Error::Backend(format!("{what}: dimension over i32")));
        }
        Ok(())
    }

    /// cuBLAS arguments: (transa, transb, m', n', k, lda, ldb, ldc) with B first.
    fn col_major(&self) -> (Op, Op, i32, i32, i32, i32, i32, i32) {
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let (m, n, k) = (self.m as i32, self.n as i32, self.k as i32);
        let ldb = if self.tb { k } else { n };
        let lda = if self.ta { m } else { k };
        (op(self.tb), op(self.ta), n, m, k, ldb, lda, n)
    }
}

/// `C = alpha · op(A) · op(B) + beta · C` in f32 (cuBLAS sgemm).
pub fn gemm_f32(
    blas: &CudaBlas,
    c: &mut CudaSlice<f32>,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    p: RowMajor,
) -> Result<()> {
    p.check(c.len(), a.len(), b.len(), "cuBLAS sgemm")?;
    if p.m == 0 || p.n == 0 {
        return Ok(());
    }
    let (transa, transb, m, n, k, lda, ldb, ldc) = p.col_major();
    let cfg = GemmConfig {
        transa,
        transb,
        m,
        n,
        k,
        alpha: p.alpha,
        lda,
        ldb,
        beta: p.beta,
        ldc,
    };
    // SAFETY: `check` verified every buffer against the shape and leading dimensions.
    unsafe { blas.gemm(cfg, b, a, c) }.map_err(|e| Error::Backend(format!("cuBLAS sgemm: {e}")))
}

/// `C = alpha · op(A) · op(B) + beta · C` with 16-bit `A`, `B` (bf16 bits, or f16 when `f16`),
/// f32 `C` and f32 accumulation (`cublasGemmEx`, tensor cores).
pub fn gemm_half(
    blas: &CudaBlas,
    stream: &CudaStream,
    c: &mut CudaSlice<f32>,
    a: &CudaSlice<u16>,
    b: &CudaSlice<u16>,
    p: RowMajor,
    f16: bool,
) -> Result<()> {
    p.check(c.len(), a.len(), b.len(), "cuBLAS 16-bit gemm")?;
    if p.m == 0 || p.n == 0 {
        return Ok(());
    }
    let (transa, transb, m, n, k, lda, ldb, ldc) = p.col_major();
    use blas_sys::cudaDataType_t as Ty;
    let half = if f16 { Ty::CUDA_R_16F } else { Ty::CUDA_R_16BF };
    let (bp, _rb) = b.device_ptr(stream);
    let (ap, _ra) = a.device_ptr(stream);
    let (cp, _rc) = c.device_ptr_mut(stream);
    // SAFETY: the pointers come from live allocations holding the sizes `check` verified; the
    // handle is bound to `stream` and the guards keep the buffers ordered until the call returns.
    unsafe {
        blas_result::gemm_ex(
            *blas.handle(),
            transa,
            transb,
            m,
            n,
            k,
            (&p.alpha) as *const f32 as *const _,
            bp as *const _,
            half,
            lda,
            ap as *const _,
            half,
            ldb,
            (&p.beta) as *const f32 as *const _,
            cp as *mut _,
            Ty::CUDA_R_32F,
            ldc,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Backend(format!("cuBLAS 16-bit gemm: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The column-major mapping, checked on the host: the cuBLAS call it describes, evaluated
    /// naively, equals the row-major product for every transpose combination.
    #[test]
    fn column_major_arguments_compute_the_row_major_product() {
        let (m, n, k) = (3usize, 4usize, 5usize);
        let val = |i: usize| (i as f32 * 0.37).sin();
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let p = RowMajor {
                m,
                n,
                k,
                ta,
                tb,
                alpha: 1.0,
                beta: 0.0,
            };
            let a: Vec<f32> = (0..m * k).map(val).collect();
            let b: Vec<f32> = (0..k * n).map(|i| val(i + 100)).collect();
            // Row-major reference.
            let a_at = |i: usize, p_: usize| if ta { a[p_ * m + i] } else { a[i * k + p_] };
            let b_at = |p_: usize, j: usize| if tb { b[j * k + p_] } else { b[p_ * n + j] };
            // Column-major evaluation of the cuBLAS call: C'(i', j') = Σ op1(i', p) op2(p, j').
            let (t1, t2, m1, n1, k1, ld1, ld2, ldc) = p.col_major();
            assert_eq!((m1, n1, k1, ldc), (n as i32, m as i32, k as i32, n as i32));
            let cm = |buf: &[f32], ld: i32, r: usize, c: usize| buf[c * ld as usize + r];
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|q| a_at(i, q) * b_at(q, j)).sum();
                    // C' is n×m col-major: element (j, i) is C[i][j] at i*ldc + j.
                    let got: f32 = (0..k)
                        .map(|q| {
                            let o1 = if t1 == Op::CUBLAS_OP_T {
                                cm(&b, ld1, q, j)
                            } else {
                                cm(&b, ld1, j, q)
                            };
                            let o2 = if t2 == Op::CUBLAS_OP_T {
                                cm(&a, ld2, i, q)
                            } else {
                                cm(&a, ld2, q, i)
                            };
                            o1 * o2
                        })
                        .sum();
                    assert!((got - want).abs() < 1e-5, "ta {ta} tb {tb} ({i},{j})");
                }
            }
        }
    }
}
