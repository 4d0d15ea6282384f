//! Inverted-dropout mask from a counter-based hash (the spec `kernels/dropout.cu` must match).
//!
//! For element `i` of a mask with seed `s` (a mask written from `offset` holds elements
//! `offset..offset + len`, so any chunk of a mask equals the same slice of the whole):
//! ```text
//! z = splitmix64(s ⊕ (i · 0x9E3779B97F4A7C15))      (64-bit finalizer of SplitMix64)
//! u = (z >> 40) / 2²⁴                               (24 uniform bits → [0, 1), exact in f32)
//! keep[i] = 0 if u < p else 1 / (1 − p)
//! ```
//! A pure function of `(s, i)`: the forward, a recomputing backward, a resumed run and every
//! backend regenerate the same mask without storing it. `1 / (1 − p)` is computed in f32, as
//! PyTorch's `F.dropout` scales kept elements.

use rayon::prelude::*;

/// SplitMix64's output function (Steele, Lea, Flood 2014).
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform value in `[0, 1)` that decides element `i` of mask `seed`.
#[inline]
pub fn dropout_uniform(seed: u64, i: u64) -> f32 {
    let z = splitmix64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// The value kept elements get: `1 / (1 − p)` in f32, as PyTorch's inverted dropout scales.
/// The CUDA launcher (`cuda/dropout.rs`) takes it from here.
#[inline]
pub fn dropout_scale(p: f32) -> f32 {
    1.0 / (1.0 - p)
}

/// Fills `keep` with elements `offset..offset + keep.len()` of the mask for drop probability
/// `p` (`0 ≤ p < 1`).
pub fn dropout_mask(keep: &mut [f32], p: f32, seed: u64, offset: u64) {
    let scale = dropout_scale(p);
    keep.par_iter_mut().enumerate().for_each(|(i, k)| {
        *k = if dropout_uniform(seed, offset + i as u64) < p {
            0.0
        } else {
            scale
        };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_has_the_asked_rate_and_scale() {
        let mut keep = vec![0.0f32; 100_000];
        dropout_mask(&mut keep, 0.1, 42, 0);
        let dropped = keep.iter().filter(|&&k| k == 0.0).count() as f64 / keep.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "drop rate {dropped}");
        assert!(keep.iter().all(|&k| k == 0.0 || k == 1.0 / 0.9));
        let mut again = vec![0.0f32; 100_000];
        dropout_mask(&mut again, 0.1, 42, 0);
        assert_eq!(keep, again);
        let mut tail = vec![0.0f32; 1000];
        dropout_mask(&mut tail, 0.1, 42, 99_000);
        assert_eq!(tail, keep[99_000..]);
        dropout_mask(&mut again, 0.1, 43, 0);
        assert_ne!(keep, again);
    }
}
