//! CPU specification of `kernels/nf4_gemm_dx.cu`, the backward product `dx = dy · W` of a frozen
//! NF4 projection on tensor cores (and of its cuBLAS baselines).
//!
//! `dx[m, k] = (accumulate ? dx[m, k] : 0) + Σ_n bf16(dy[m, n]) · bf16(w[n, k])`, where
//! `w = dequantize_nf4(W)` (f32, bit-exact with the CUDA decode) and `bf16(·)` rounds to the
//! nearest even bf16. Shapes: `dy` `[m, n]`, `W` `[n, k]` (NF4, bitsandbytes layout, read as
//! stored: the sum runs over W's rows), `dx` `[m, k]`, all row-major. A product of two bf16 values
//! is exact in f32, so the device result differs from this one only by the order of its f32
//! sums; the spec sums in f64 (the exact value, to within f32 rounding of the result).
//! [`gemm_dx_rounded`] is the same product for any already-rounded weight and rounding of `dy`
//! (the 16-bit dense weights: bf16, or f16 with `dy` rounded to f16).

use super::nf4_gemm::{bf16_round, nf4_bf16_weights};
use crate::quant::Nf4Tensor;

/// `dx[m, k] (+)= Σ_n round(dy[m, n]) · w[n, k]` in f64, rounded once to f32; `w` is `[n, k]`
/// row-major and used as given (its rounding is the caller's).
#[allow(clippy::too_many_arguments)]
pub fn gemm_dx_rounded(
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    round: impl Fn(f32) -> f32,
    accumulate: bool,
) {
    assert!(
        dy.len() >= m * n && dx.len() >= m * k && w.len() >= n * k,
        "gemm_dx_rounded: buffer sizes"
    );
    let mut acc = vec![0f64; k];
    for r in 0..m {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (o, wrow) in w.chunks_exact(k.max(1)).take(n).enumerate() {
            let a = round(dy[r * n + o]) as f64;
            if a == 0.0 {
                continue;
            }
            for (s, &v) in acc.iter_mut().zip(wrow) {
                *s += a * v as f64;
            }
        }
        for (out, s) in dx[r * k..(r + 1) * k].iter_mut().zip(&acc) {
            let prev = if accumulate { *out as f64 } else { 0.0 };
            *out = (prev + s) as f32;
        }
    }
}

/// The product described in the module doc; `w` is 2-D `[n, k]`, `dy` `[m, n]`, `dx` `[m, k]`.
pub fn nf4_gemm_dx_bf16(dx: &mut [f32], dy: &[f32], w: &Nf4Tensor, m: usize, accumulate: bool) {
    assert_eq!(w.shape.len(), 2, "nf4_gemm_dx_bf16: W must be 2-D");
    let (n, k) = (w.shape[0], w.shape[1]);
    gemm_dx_rounded(
        dx,
        dy,
        &nf4_bf16_weights(w),
        m,
        n,
        k,
        bf16_round,
        accumulate,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize_nf4, quantize_nf4};

    fn values(n: usize, seed: usize, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((((i + seed) * 2_654_435_761) % 2003) as f32 / 1001.5 - 1.0) * amp)
            .collect()
    }

    /// The naive definition: dx[r][j] = prev + Σ_o bf16(dy[r][o]) · bf16(w[o][j]), summed in f64
    /// in index order.
    fn naive(dx0: &[f32], dy: &[f32], t: &Nf4Tensor, m: usize, acc: bool) -> Vec<f32> {
        let (n, k) = (t.shape[0], t.shape[1]);
        let w = dequantize_nf4(t);
        let mut out = vec![0f32; m * k];
        for r in 0..m {
            for j in 0..k {
                let mut s = if acc { dx0[r * k + j] as f64 } else { 0.0 };
                for o in 0..n {
                    s += bf16_round(dy[r * n + o]) as f64 * bf16_round(w[o * k + j]) as f64;
                }
                out[r * k + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn matches_the_naive_sum_on_odd_shapes() {
        // Odd m and n, blocks crossing rows (k = 48, 96 with blocksize 64), both scale formats.
        for (m, n, k, bs, dq) in [
            (3, 37, 48, 64, true),
            (5, 19, 96, 64, false),
            (1, 7, 32, 128, true),
            (4, 33, 16, 32, false),
        ] {
            let t = quantize_nf4(&values(n * k, 1, 0.8), &[n, k], bs, dq).unwrap();
            let dy = values(m * n, 7, 1.5);
            let dx0 = values(m * k, 11, 1.0);
            for acc in [false, true] {
                let want = naive(&dx0, &dy, &t, m, acc);
                let mut got = dx0.clone();
                nf4_gemm_dx_bf16(&mut got, &dy, &t, m, acc);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // Both sum exactly representable terms in f64 (the orders differ only in
                    // f64 rounding, far below f32's): equal up to one f32 rounding.
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "[{m},{n}]·[{n},{k}] bs {bs} dq {dq} acc {acc} at {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_is_real() {
        // The spec differs from the f32 product of the unrounded operands.
        let (m, n, k) = (2, 9, 64);
        let t = quantize_nf4(&values(n * k, 3, 0.5), &[n, k], 64, false).unwrap();
        let dy = values(m * n, 5, 1.0);
        let mut dx = vec![0f32; m * k];
        nf4_gemm_dx_bf16(&mut dx, &dy, &t, m, false);
        let w = dequantize_nf4(&t);
        let exact: Vec<f32> = (0..m * k)
            .map(|i| {
                let (r, j) = (i / k, i % k);
                (0..n).map(|o| dy[r * n + o] * w[o * k + j]).sum()
            })
            .collect();
        assert!(exact.iter().zip(&dx).any(|(a, b)| a != b));
    }

    #[test]
    fn dense_rounding_is_the_callers() {
        // gemm_dx_rounded with f16 rounding of dy: a value exact in f16 but not in bf16 survives.
        let v = 1.0 + 1.0 / 1024.0;
        let mut dx = [0f32; 1];
        gemm_dx_rounded(
            &mut dx,
            &[v],
            &[1.0],
            1,
            1,
            1,
            |x| half::f16::from_f32(x).to_f32(),
            false,
        );
        assert_eq!(dx[0], v);
        gemm_dx_rounded(&mut dx, &[v], &[1.0], 1, 1, 1, bf16_round, false);
        assert_eq!(dx[0], 1.0);
    }
}
