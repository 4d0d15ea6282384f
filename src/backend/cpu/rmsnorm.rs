//! RMSNorm (Llama): `out[r, :] = x[r, :] / sqrt(mean_j x[r, j]² + eps) * weight`.
//!
//! Shapes: `x`, `out` `[rows, dim]`, `weight` `[dim]`. The mean of squares is accumulated in f32,
//! as transformers does (it upcasts to f32, normalises, then multiplies by the weight).

use rayon::prelude::*;

pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], dim: usize, eps: f32) {
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for ((o, &v), &w) in o.iter_mut().zip(xr).zip(weight) {
                *o = w * (v * inv);
            }
        });
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_rms_rows() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let mut out = [0.0f32; 4];
        super::rmsnorm(&mut out, &x, &[1.0, 2.0], 2, 1e-6);
        let r = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] - 8.0 / r).abs() < 1e-6);
        assert_eq!(&out[2..], &[0.0, 0.0]);
    }
}
