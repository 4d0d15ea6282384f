//! RoPE backward, in place.
//!
//! The forward rotates each pair `(x_i, x_{i+d/2})` (rotate-half layout) by `θ = p · inv_freq[i]`:
//! `y = R(θ) x` with `R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]`. A rotation is orthogonal, so
//! `dx = R(θ)ᵀ dy = R(−θ) dy`: the forward map with `sin` negated,
//! ```text
//! dx[i]       = dy[i] cosθ + dy[i + d/2] sinθ
//! dx[i + d/2] = dy[i + d/2] cosθ − dy[i] sinθ
//! ```
//! Shapes: `dx` `[rows, heads, head_dim]` with `rows = positions.len()`, `inv_freq` `[head_dim/2]`.
//! `dx` holds `dy` on entry and is overwritten with the input gradient. `θ` is the same `T`
//! product `p · inv_freq[i]` the forward uses (an f32 product in production).

use super::Float;
use rayon::prelude::*;

pub fn rope_backward<T: Float>(
    dx: &mut [T],
    positions: &[u32],
    inv_freq: &[T],
    heads: usize,
    head_dim: usize,
) {
    let half = head_dim / 2;
    let n = positions.len() * heads * head_dim;
    assert!(
        dx.len() >= n && inv_freq.len() >= half,
        "rope_backward: buffers too small"
    );
    if n == 0 {
        return;
    }
    dx[..n]
        .par_chunks_mut(heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(row, &p)| {
            let p = T::from_f64(p as f64);
            for i in 0..half {
                let (sin, cos) = (p * inv_freq[i]).sin_cos();
                for h in row.chunks_mut(head_dim) {
                    let (a, b) = (h[i], h[i + half]);
                    h[i] = a * cos + b * sin;
                    h[i + half] = b * cos - a * sin;
                }
            }
        });
}
