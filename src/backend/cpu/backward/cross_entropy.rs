//! Cross-entropy backward, and a fused loss + gradient that overwrites the logits (llm.c's fused
//! classifier: the `[rows, vocab]` logits buffer is reused for its gradient).
//!
//! Forward per row: `loss_r = logsumexp(z_r) − z_r[t_r]`; the training loss is
//! `L = scale · Σ_r loss_r` over rows whose target is not `-100`.
//!
//! Derivation: `∂ logsumexp(z)/∂z_j = softmax(z)_j`, `∂ z[t]/∂z_j = δ_jt`, so
//! ```text
//! dz_r = scale · (softmax(z_r) − onehot(t_r))      for t_r ≠ −100
//! dz_r = 0                                         for t_r = −100
//! ```
//! `scale = 1 / (number of non-ignored targets)` makes `L` the mean, as transformers'
//! `CrossEntropyLoss(reduction="mean")` computes it ([`mean_scale`]). With gradient
//! accumulation, pass `1 / (non-ignored targets over all micro-batches of the step)` so the
//! accumulated gradient is the gradient of the mean over the whole step. The label shift of a
//! causal LM (row `t` predicts token `t + 1`) is the caller's job.
//!
//! Shapes: `logits`, `dlogits` `[rows, vocab]`, `targets` `[rows]` (`rows = targets.len()`).
//! Gradients are **written**. As in the forward the max is subtracted before exponentiating and
//! the sum of exponentials is accumulated in f64.

use super::Float;
use rayon::prelude::*;

/// `1 / #(targets ≠ −100)`, or 0 when every target is ignored (the loss is then 0, not NaN).
pub fn mean_scale<T: Float>(targets: &[i32]) -> T {
    let n = targets.iter().filter(|&&t| t >= 0).count();
    if n == 0 {
        T::ZERO
    } else {
        T::ONE / T::from_f64(n as f64)
    }
}

/// Turns `row` (logits) into `scale · (softmax − onehot(t))` in place; returns the row's
/// unscaled loss `logsumexp − row[t]`.
fn softmax_grad_row<T: Float>(row: &mut [T], t: i32, scale: T) -> T {
    if t < 0 {
        row.fill(T::ZERO);
        return T::ZERO;
    }
    let t = t as usize;
    assert!(
        t < row.len(),
        "cross_entropy: target {t} outside vocab {}",
        row.len()
    );
    let zt = row[t];
    let max = row.iter().copied().fold(T::NEG_INFINITY, T::max);
    let mut sum = 0.0f64;
    for z in row.iter_mut() {
        *z = (*z - max).exp();
        sum += z.to_f64();
    }
    let f = T::from_f64(scale.to_f64() / sum);
    for z in row.iter_mut() {
        *z *= f;
    }
    row[t] -= scale;
    T::from_f64(max.to_f64() + sum.ln() - zt.to_f64())
}

/// `dlogits[r] = scale · (softmax(logits[r]) − onehot(targets[r]))`; zero rows for `-100`.
pub fn cross_entropy_backward<T: Float>(
    dlogits: &mut [T],
    logits: &[T],
    targets: &[i32],
    vocab: usize,
    scale: T,
) {
    let n = targets.len() * vocab;
    assert!(
        dlogits.len() >= n && logits.len() >= n,
        "cross_entropy_backward: buffers too small"
    );
    if n == 0 {
        return;
    }
    dlogits[..n].copy_from_slice(&logits[..n]);
    dlogits[..n]
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .for_each(|(row, &t)| {
            softmax_grad_row(row, t, scale);
        });
}

/// Fused forward + backward: writes the per-row losses (unscaled, 0 for ignored rows: the
/// quantity the forward `cross_entropy` writes, up to rounding) and overwrites `logits` with
/// `dlogits` as [`cross_entropy_backward`] defines it.
pub fn cross_entropy_fused<T: Float>(
    logits: &mut [T],
    losses: &mut [T],
    targets: &[i32],
    vocab: usize,
    scale: T,
) {
    let rows = targets.len();
    assert!(
        logits.len() >= rows * vocab && losses.len() >= rows,
        "cross_entropy_fused: buffers too small"
    );
    if rows == 0 || vocab == 0 {
        losses[..rows].fill(T::ZERO);
        return;
    }
    logits[..rows * vocab]
        .par_chunks_mut(vocab)
        .zip(losses[..rows].par_iter_mut())
        .zip(targets.par_iter())
        .for_each(|((row, loss), &t)| *loss = softmax_grad_row(row, t, scale));
}
