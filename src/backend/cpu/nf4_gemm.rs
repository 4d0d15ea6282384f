//! CPU specification of `kernels/nf4_gemm.cu`, the fused NF4 tensor-core GEMM.
//!
//! `y[m, n] = (accumulate ? y[m, n] : 0) + Σ_k bf16(x[m, k]) · bf16(w[n, k])`, where
//! `w = dequantize_nf4(W)` (f32, bit-exact with the CUDA decode) and `bf16(·)` rounds to the
//! nearest even bf16. Shapes: `x` `[m, k]`, `W` `[n, k]` (NF4, bitsandbytes layout), `y` `[m, n]`,
//! all row-major. A product of two bf16 values is exact in f32, so the device result differs
//! from this one only by the order of its f32 sums; the spec sums in f64 (the exact value, to
//! within f32 rounding of the result).

use crate::quant::{dequantize_nf4, Nf4Tensor};
use half::bf16;

/// `v` rounded to the nearest bf16 (ties to even), widened back to f32.
pub fn bf16_round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// `bf16(dequantize_nf4(w))`: the weight values the GEMM multiplies, `[n, k]` row-major.
pub fn nf4_bf16_weights(w: &Nf4Tensor) -> Vec<f32> {
    dequantize_nf4(w).into_iter().map(bf16_round).collect()
}

/// The product described in the module doc; `w` is 2-D `[n, k]`.
pub fn nf4_gemm_bf16(y: &mut [f32], x: &[f32], w: &Nf4Tensor, m: usize, accumulate: bool) {
    let (n, k) = (w.shape[0], w.shape[1]);
    assert!(
        x.len() >= m * k && y.len() >= m * n,
        "nf4_gemm_bf16: buffer sizes"
    );
    let wb = nf4_bf16_weights(w);
    for r in 0..m {
        let xr: Vec<f64> = x[r * k..(r + 1) * k]
            .iter()
            .map(|&v| bf16_round(v) as f64)
            .collect();
        for (o, wrow) in wb.chunks_exact(k.max(1)).enumerate().take(n) {
            let dot: f64 = xr.iter().zip(wrow).map(|(a, b)| a * *b as f64).sum();
            let prev = if accumulate { y[r * n + o] as f64 } else { 0.0 };
            y[r * n + o] = (prev + dot) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_nf4;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even (1.0).
        assert_eq!(bf16_round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(bf16_round(1.0 + 3.0 / 256.0), 1.015625);
        assert_eq!(bf16_round(-2.5), -2.5);
    }

    #[test]
    fn matches_a_dense_product_of_rounded_operands() {
        let (m, n, k) = (3, 5, 64);
        let wv: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
            .collect();
        let t = quantize_nf4(&wv, &[n, k], 64, true).unwrap();
        let wb = nf4_bf16_weights(&t);
        let mut y = vec![1.0f32; m * n];
        nf4_gemm_bf16(&mut y, &x, &t, m, true);
        for r in 0..m {
            for o in 0..n {
                let want: f32 = 1.0
                    + (0..k)
                        .map(|j| bf16_round(x[r * k + j]) * wb[o * k + j])
                        .sum::<f32>();
                assert!((y[r * n + o] - want).abs() < 1e-4, "{r},{o}");
            }
        }
        // The bf16 rounding is real: the spec differs from the f32 product.
        let mut exact = vec![0f32; m * n];
        crate::quant::nf4_matmul_wt(&mut exact, &x, &t, m);
        let mut y0 = vec![0f32; m * n];
        nf4_gemm_bf16(&mut y0, &x, &t, m, false);
        assert!(exact.iter().zip(&y0).any(|(a, b)| a != b));
    }
}
