//! Rotary position embedding, transformers' "rotate half" convention, applied in place.
//!
//! `x` is `[rows, heads, d]` with `rows = positions.len()`. For every head and pair `i < d/2`,
//! with `θ = positions[r] · inv_freq[i]` computed as an f32 product (as transformers does):
//! ```text
//! x[i]       ← x[i] cosθ − x[i + d/2] sinθ
//! x[i + d/2] ← x[i + d/2] cosθ + x[i] sinθ
//! ```
//! (transformers: `q·cos + rotate_half(q)·sin` with `rotate_half(q) = [−q₂, q₁]` and
//! `cos = [cos θ, cos θ]` over the two halves). The backward is the same map with `sin` negated.

use rayon::prelude::*;

pub fn rope(x: &mut [f32], positions: &[u32], inv_freq: &[f32], heads: usize, d: usize) {
    let half = d / 2;
    x.par_chunks_mut(heads * d)
        .zip(positions.par_iter())
        .for_each(|(row, &p)| {
            for i in 0..half {
                let theta = p as f32 * inv_freq[i];
                let (sin, cos) = theta.sin_cos();
                for h in row.chunks_mut(d) {
                    let (a, b) = (h[i], h[i + half]);
                    h[i] = a * cos - b * sin;
                    h[i + half] = b * cos + a * sin;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    #[test]
    fn position_zero_is_identity_and_rotation_preserves_norm() {
        let inv = [1.0f32, 0.1];
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        super::rope(&mut x, &[0, 5], &inv, 1, 4);
        assert_eq!(&x[..4], &[1.0, 2.0, 3.0, 4.0]);
        let n0: f32 = [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| v * v).sum();
        let n1: f32 = x[4..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        // pair (x0, x2) rotated by 5 rad
        let (s, c) = 5.0f32.sin_cos();
        assert!((x[4] - (c - 3.0 * s)).abs() < 1e-5);
    }
}
