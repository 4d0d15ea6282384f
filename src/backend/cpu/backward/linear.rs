//! Input gradient of a frozen dense linear layer.
//!
//! Forward `y[m, n] = x[m, k] · Wᵀ` with `W` `[n, k]`, i.e. `y_ij = Σ_p x_ip W_jp`, so
//! `dx_ip = Σ_j dy_ij W_jp`: `dx = dy · W` (`[m, n] · [n, k]`). No weight gradient: base weights
//! are frozen (LoRA adapters get theirs in `lora.rs`). NF4 base weights use
//! [`crate::quant::nf4_matmul`] (which writes `dx`) instead.
//!
//! `accumulate = false` **writes** `dx`, `true` adds to it — a layer input feeding several
//! projections (q, k, v or gate, up) sums their input gradients.

use super::{gemm, Float, Mat};

/// `dx[m, k] (+)= dy[m, n] · W`, `w` row-major `[n, k]`.
pub fn matmul_dx<T: Float>(
    dx: &mut [T],
    dy: &[T],
    w: &[T],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        dx.len() >= m * k && dy.len() >= m * n && w.len() >= n * k,
        "matmul_dx: buffers too small for [{m}, {n}] · [{n}, {k}]"
    );
    gemm(
        &mut dx[..m * k],
        Mat::rm(&dy[..m * n], m, n),
        Mat::rm(&w[..n * k], n, k),
        accumulate,
        T::ONE,
    );
}
