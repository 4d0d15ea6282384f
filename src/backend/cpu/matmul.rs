//! Projection GEMM: `out[m, n] = x[m, k] · Wᵀ`, with `W` row-major `[n, k]` (PyTorch's Linear layout).
//!
//! The spec is `out[i, j] = Σ_p x[i, p] · W[j, p]`, accumulated in f32. We hand it to the `gemm`
//! crate (packed, SIMD, rayon-parallel) by describing `Wᵀ` through strides instead of transposing:
//! element `(p, j)` of `Wᵀ` lives at `W[j * k + p]`, so its row stride is 1 and column stride `k`.

/// `out = x · Wᵀ`; `x` is `[m, k]`, `w` is `[n, k]`, `out` is `[m, n]`, all row-major.
pub fn matmul_wt(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    assert!(
        out.len() >= m * n && x.len() >= m * k && w.len() >= n * k,
        "matmul_wt: buffers too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    // SAFETY: the asserts above guarantee every index the strides describe lies inside its slice:
    // dst (i, j) -> i*n + j < m*n; lhs (i, p) -> i*k + p < m*k; rhs (p, j) -> j*k + p < n*k.
    // `out` is exclusively borrowed, so it cannot alias `x` or `w`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,          // dst column stride
            n as isize, // dst row stride
            false,      // do not read dst: out = x · Wᵀ
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize, // rhs column stride: next output feature is the next row of W
            1,          // rhs row stride: next input feature is contiguous
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_on_odd_shapes() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (1, 64, 130), (40, 3, 2)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2)
                .collect();
            let mut out = vec![f32::NAN; m * n];
            matmul_wt(&mut out, &x, &w, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let r: f32 = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
                    assert!(
                        (out[i * n + j] - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "({m},{k},{n}) [{i},{j}]"
                    );
                }
            }
        }
    }
}
