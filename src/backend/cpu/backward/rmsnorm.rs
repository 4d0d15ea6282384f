//! RMSNorm backward with a frozen weight (QLoRA never trains norms): only `dx` is computed.
//!
//! Forward, per row of `dim` values: `r = sqrt(mean_j x_j² + eps)`, `y_j = w_j · x_j / r`.
//!
//! Derivation: `∂r/∂x_k = x_k / (dim · r)`, so
//! ```text
//! ∂y_j/∂x_k = w_j δ_jk / r − w_j x_j x_k / (dim · r³)
//! dx_k = Σ_j dy_j ∂y_j/∂x_k = w_k dy_k / r − x_k · (Σ_j w_j dy_j x_j) / (dim · r³)
//! ```
//! Shapes: `dx`, `dy`, `x` `[rows, dim]`, `weight` `[dim]`. `dx` is **written** (not accumulated):
//! the caller adds it to the residual-stream gradient itself. `r` is recomputed from `x` with the
//! mean of squares accumulated in `T`, as the forward does (f32 in production).

use super::Float;
use rayon::prelude::*;

pub fn rmsnorm_backward<T: Float>(
    dx: &mut [T],
    dy: &[T],
    x: &[T],
    weight: &[T],
    rows: usize,
    dim: usize,
    eps: T,
) {
    let n = rows * dim;
    assert!(
        dx.len() >= n && dy.len() >= n && x.len() >= n && weight.len() >= dim,
        "rmsnorm_backward: buffers too small for [{rows}, {dim}]"
    );
    if n == 0 {
        return;
    }
    let w = &weight[..dim];
    let dimf = T::from_f64(dim as f64);
    dx[..n]
        .par_chunks_mut(dim)
        .zip(dy[..n].par_chunks(dim).zip(x[..n].par_chunks(dim)))
        .for_each(|(dx, (dy, x))| {
            let ms = x.iter().map(|&v| v * v).sum::<T>() / dimf;
            let inv = T::ONE / (ms + eps).sqrt(); // 1/r
            let dot = w
                .iter()
                .zip(dy)
                .zip(x)
                .map(|((&w, &g), &v)| w * g * v)
                .sum::<T>();
            let c = dot * inv * inv * inv / dimf; // (Σ w dy x) / (dim r³)
            for (((dx, &w), &g), &v) in dx.iter_mut().zip(w).zip(dy).zip(x) {
                *dx = w * g * inv - v * c;
            }
        });
}
