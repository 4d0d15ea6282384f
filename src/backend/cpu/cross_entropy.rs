//! Token cross-entropy: `loss[r] = logsumexp(logits[r, :]) − logits[r, target[r]]`.
//!
//! `logits` is `[rows, vocab]`; a target of `-100` (PyTorch's `ignore_index`) gives loss 0.
//! The max is subtracted before exponentiating; the sum of exponentials is accumulated in f64
//! so the spec is accurate even for 128k-entry vocabularies.

use rayon::prelude::*;

pub fn cross_entropy(losses: &mut [f32], logits: &[f32], targets: &[i32], vocab: usize) {
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .for_each(|((loss, row), &t)| {
            if t < 0 {
                *loss = 0.0;
                return;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            *loss = (max as f64 + sum.ln() - row[t as usize] as f64) as f32;
        });
}

#[cfg(test)]
mod tests {
    #[test]
    fn uniform_logits_give_ln_vocab() {
        let mut l = [0.0f32; 2];
        super::cross_entropy(&mut l, &[0.5; 8], &[3, -100], 4);
        assert!((l[0] - 4f32.ln()).abs() < 1e-6);
        assert_eq!(l[1], 0.0);
    }
}
