//! Token sampling: the CPU specification of [`crate::backend::Backend::sample`] (the CUDA kernel
//! `kernels/sample.cu` must choose the same token).
//!
//! Input: one row of logits `x[0..V]` (f32), a [`Sampling`] and one uniform `u ∈ [0, 1)` drawn by
//! the host (see [`crate::generate`] for the draw order). Output: a token id `< V`.
//!
//! Canonicalisation: a NaN logit counts as `−∞` (never chosen while a finite logit exists).
//!
//! Greedy (`temperature == 0`): the index of the largest logit, the first one on ties (as
//! `torch.argmax`); `u` is ignored.
//!
//! Sampled (`temperature = T > 0`):
//! 1. `z_i = x_i / T`, one IEEE f32 division (round to nearest even, subnormals kept).
//! 2. Order: `z` descending, then index ascending on ties (`−0` and `+0` are equal). Every later
//!    step works on this order; the set kept is always a prefix of it.
//! 3. Top-k (`0 < k < V`): keep the first `k` of the order; `k = 0` or `k ≥ V` keeps all.
//! 4. Weights `e_i = exp(z_i − m)` with `m = z` of the first token, and `e_i = 1` whenever
//!    `z_i == m` (so several `+∞` share the mass, and a row of `−∞` is uniform).
//!    `p_i = e_i / Σ_kept e`.
//! 5. Top-p (`p < 1`): keep the shortest prefix whose cumulative probability reaches `p`
//!    (`Σ_{j≤n} p_j ≥ p`); `p = 1` keeps all.
//! 6. Draw: the first kept token `i` with `Σ_{j≤i} p_j ≥ u · Σ_kept p_j` (so `u = 0` gives the
//!    first token of the order). If rounding leaves no such token, the last kept token with
//!    `p_i > 0`.
//!
//! The arithmetic here: f32, the probabilities normalised and then summed one after another in
//! the order. The device sums the same weights as 64-bit fixed point (`e·2⁴⁰`) instead, so the
//! two can disagree only where a cumulative sum lies within rounding distance of `p` or of
//! `u · Σ p` (`src/check/sample.rs` measures that band).

use crate::generate::Sampling;

/// `NaN → −∞`; every other value unchanged.
pub fn canonical(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x
    }
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`); NaN counts as `−∞`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        let v = canonical(v);
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// The candidates `(index, z)` of steps 1–3, in the order of step 2.
pub fn ordered_candidates(logits: &[f32], temperature: f32, top_k: usize) -> Vec<(u32, f32)> {
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i as u32, canonical(v) / temperature))
        .collect();
    // No NaN is left (x / T with T > 0 finite), so partial_cmp is total here.
    cand.sort_unstable_by(|a, b| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    });
    if top_k > 0 {
        cand.truncate(top_k);
    }
    cand
}

/// Normalised probabilities of step 4 over `cand` (in its order).
pub fn probabilities(cand: &[(u32, f32)]) -> Vec<f32> {
    let max = cand[0].1;
    let mut probs: Vec<f32> = cand
        .iter()
        .map(|&(_, v)| if v == max { 1.0 } else { (v - max).exp() })
        .collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    probs
}

/// How many tokens top-p keeps of `probs` (step 5).
pub fn top_p_keep(probs: &[f32], top_p: f32) -> usize {
    if top_p >= 1.0 {
        return probs.len();
    }
    let mut acc = 0.0;
    probs
        .iter()
        .position(|&p| {
            acc += p;
            acc >= top_p
        })
        .map_or(probs.len(), |i| i + 1)
}

/// The token of `logits` (`[vocab]`) under `s` for the uniform `u ∈ [0, 1)` (steps 1–6). An
/// empty row gives 0.
pub fn sample(logits: &[f32], s: &Sampling, u: f32) -> u32 {
    if s.temperature == 0.0 || logits.is_empty() {
        return argmax(logits);
    }
    let cand = ordered_candidates(logits, s.temperature, s.top_k);
    let mut probs = probabilities(&cand);
    probs.truncate(top_p_keep(&probs, s.top_p));
    let total: f32 = probs.iter().sum();
    let mut r = u * total;
    for (i, &p) in probs.iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return cand[i].0;
        }
    }
    let last = probs.iter().rposition(|&p| p > 0.0).unwrap_or(0);
    cand[last].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(temperature: f32, top_k: usize, top_p: f32) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 0,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        assert_eq!(argmax(&[-1.0, f32::INFINITY, f32::INFINITY]), 1);
        assert_eq!(sample(&[0.0, 3.0, 1.0, 3.0], &s(0.0, 0, 1.0), 0.99), 1);
    }

    #[test]
    fn ties_order_by_index() {
        // Four equal logits: u splits [0, 1) into quarters, lowest index first.
        let x = [2.0f32; 4];
        let t = s(1.0, 0, 1.0);
        assert_eq!(sample(&x, &t, 0.0), 0);
        assert_eq!(sample(&x, &t, 0.24), 0);
        assert_eq!(sample(&x, &t, 0.26), 1);
        assert_eq!(sample(&x, &t, 0.74), 2);
        assert_eq!(sample(&x, &t, 0.76), 3);
        // Top-k cuts a tie by index: k = 2 keeps 0 and 1.
        let t = s(1.0, 2, 1.0);
        assert!((0..100).all(|i| sample(&x, &t, i as f32 / 100.0) < 2));
        // −0 and +0 are one value: the order is by index.
        assert_eq!(
            ordered_candidates(&[0.0, -0.0, 0.0], 1.0, 0),
            vec![(0, 0.0), (1, -0.0), (2, 0.0)]
        );
    }

    #[test]
    fn top_k_edges() {
        let x = [1.0f32, 5.0, 3.0, 4.0];
        // k = 1 is greedy whatever u.
        for u in [0.0, 0.5, 0.999_999_9] {
            assert_eq!(sample(&x, &s(1.0, 1, 1.0), u), 1);
        }
        // k ≥ V keeps everything: the same token as k = 0 for every u.
        for i in 0..50 {
            let u = i as f32 / 50.0;
            assert_eq!(
                sample(&x, &s(0.7, 4, 1.0), u),
                sample(&x, &s(0.7, 0, 1.0), u)
            );
            assert_eq!(
                sample(&x, &s(0.7, 1000, 1.0), u),
                sample(&x, &s(0.7, 0, 1.0), u)
            );
        }
    }

    #[test]
    fn top_p_edges() {
        let x = [0.0f32, 5.0, 1.0];
        // Tiny p keeps the best token only.
        assert!((0..20).all(|i| sample(&x, &s(1.0, 0, 1e-6), i as f32 / 20.0) == 1));
        // p = 1 keeps everything: u near 1 reaches the least likely token (index 0).
        assert_eq!(sample(&x, &s(1.0, 0, 1.0), 0.999_999_9), 0);
        // p between: p_1 ≈ 0.976, so p = 0.98 keeps tokens 1 and 2, never 0.
        let t = s(1.0, 0, 0.98);
        assert!((0..100).all(|i| sample(&x, &t, i as f32 / 100.0) != 0));
        assert_eq!(
            top_p_keep(&probabilities(&ordered_candidates(&x, 1.0, 0)), 0.98),
            2
        );
    }

    #[test]
    fn infinities_and_temperatures() {
        // NaN and −∞ are never drawn while a finite logit exists.
        let x = [f32::NAN, f32::NEG_INFINITY, 0.0, 1.0];
        assert!((0..100).all(|i| sample(&x, &s(1.0, 0, 1.0), i as f32 / 100.0) >= 2));
        // Several +∞ share the mass; finite logits get none.
        let x = [3.0f32, f32::INFINITY, 1.0, f32::INFINITY];
        assert_eq!(sample(&x, &s(1.0, 0, 1.0), 0.2), 1);
        assert_eq!(sample(&x, &s(1.0, 0, 1.0), 0.7), 3);
        // A row of −∞ is uniform.
        let x = [f32::NEG_INFINITY; 4];
        assert_eq!(sample(&x, &s(1.0, 0, 1.0), 0.6), 2);
        // A tiny temperature leaves the maximum alone with all the mass: greedy in effect.
        let x = [1.0f32, 2.0, 1.5];
        assert!((0..20).all(|i| sample(&x, &s(1e-38, 0, 1.0), i as f32 / 20.0) == 1));
        // A huge temperature flattens the row: the draw is (nearly) uniform.
        let x = [1.0f32, 2.0, 1.5, -4.0];
        assert_eq!(sample(&x, &s(1e30, 0, 1.0), 0.1), 1);
        assert_eq!(sample(&x, &s(1e30, 0, 1.0), 0.9), 3);
    }
}
