//! Check of the device sampler (`kernels/sample.cu` through [`Backend::sample`]) against its CPU
//! specification (`backend/cpu/sample.rs`): the same logits row and the same uniform must give
//! the same token.
//!
//! Cases: the Llama-2 and Llama-3 vocabularies with the usual settings, then the edges: exact ties (logits on
//! a 0.5 grid, cut by top-k and by the order; −0 and +0 tied at the top), masked rows (−∞ and NaN), an all-masked row, a
//! peaked row, k = 1, k = V, k > V, p tiny, p = 1, T huge (a flat row), T tiny (a one-hot row, and
//! `1e-38`, where z overflows to +∞ and the maximum ties), V = 1 and V = 7. Uniforms: 0, the
//! largest f32 below 1, then pseudo-random ones.
//!
//! Error measures and bounds:
//! - Greedy: the number of tokens that differ, bound 0 (an integer argmax on both sides).
//! - Sampled: the number of tokens that differ outside the band, bound 0. The order and top-k are
//!   exact on both sides (the same f32 division, integer keys); the top-p cut and the draw compare
//!   cumulative probabilities with `p` and `u`, which the CPU sums in f32 one after another and the
//!   device as exact integers of `⌊__expf(z − m)·2⁴⁰⌋`. With `cum[j]` the exact (f64) cumulative
//!   probability in the order and `err = max_j |cpu_f32_cum[j] − cum[j]|` measured per row (the
//!   CPU's own drift; ~5e-5 on a flat 32,000-token row, ~1e-7 on a peaked one), the band is
//!   `eps = 2·err + 1e-5` (1e-5: `__expf`'s ≤ 2 + 1.2·|x| ulp per weight, ≤ 3e-6 relative for the
//!   weights that carry mass, twice for a ratio, and the 2⁻⁴⁰ truncation of ≤ 2¹⁷ weights). A draw
//!   is in the band when the top-p cut could move (some `cum[j]` within `eps` of `p`, bounding the
//!   kept mass `M` between two positions) and some `cum[j]` lies in `[(u − eps)·M_lo,
//!   (u + eps)·M_hi]`. Each row also says how many draws fell in the band and how many of those
//!   differ: the CPU's f32 sum is the less exact of the two there. The host emulator
//!   (`scripts/cuda_emu/sample_emu.cpp`) compares the kernel with an exact integer reference as
//!   well, with no band.
//! - Guards: a launcher that accepts a bad call (vocab 0, a short buffer, `u = 1`) fails its row.

use super::{rows_or_failure, test_values, CheckRow};
use crate::backend::cpu::dropout::splitmix64;
use crate::backend::cpu::sample::{ordered_candidates, probabilities, sample as spec_sample};
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::Backend;
use crate::error::Result;
use crate::generate::Sampling;

/// How a case's logits are made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Uniform in (−8, 8).
    Normal,
    /// On a 0.5 grid: every value ~300 times in 5,001.
    Ties,
    /// Nine in ten −∞, one in 97 NaN.
    Masked,
    /// Only −∞ and NaN.
    AllMasked,
    /// Normal with token 7 raised by 30.
    Peaked,
    /// −0, +0, then a value below −1, in turn: the maximum is a tie of signed zeros.
    Zeros,
}

fn logits(kind: Kind, v: usize, seed: u64) -> Vec<f32> {
    let mut x = test_values(seed, v, 8.0);
    for (i, xi) in x.iter_mut().enumerate() {
        match kind {
            Kind::Ties => *xi = (*xi * 2.0).round() / 2.0,
            Kind::Masked if i % 97 == 5 => *xi = f32::NAN,
            Kind::Masked if i % 10 != 3 => *xi = f32::NEG_INFINITY,
            Kind::AllMasked => {
                *xi = if i % 3 == 1 {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                }
            }
            _ => {}
        }
    }
    if kind == Kind::Peaked && v > 7 {
        x[7] += 30.0;
    }
    x
}

/// `(name, kind, vocab, temperature, top_k, top_p, draws)`.
type Case = (&'static str, Kind, usize, f32, usize, f32, usize);

const CASES: [Case; 26] = [
    ("greedy", Kind::Normal, 32000, 0.0, 0, 1.0, 2),
    ("greedy ties", Kind::Ties, 5001, 0.0, 0, 1.0, 2),
    ("greedy masked", Kind::Masked, 1000, 0.0, 0, 1.0, 2),
    ("greedy all masked", Kind::AllMasked, 100, 0.0, 0, 1.0, 2),
    ("greedy", Kind::Normal, 1, 0.0, 0, 1.0, 2),
    ("greedy signed zeros", Kind::Zeros, 301, 0.0, 0, 1.0, 2),
    ("sample", Kind::Normal, 32000, 1.0, 0, 1.0, 64),
    ("sample", Kind::Normal, 32000, 0.7, 40, 0.9, 64),
    ("sample top-p", Kind::Normal, 32000, 0.8, 0, 0.95, 64),
    (
        "sample Llama-3 vocabulary",
        Kind::Normal,
        128256,
        0.6,
        50,
        0.9,
        32,
    ),
    ("sample ties", Kind::Ties, 5001, 1.0, 50, 0.8, 64),
    ("sample ties", Kind::Ties, 5001, 1.0, 0, 1.0, 64),
    ("sample masked", Kind::Masked, 3001, 1.0, 0, 0.9, 64),
    ("sample all masked", Kind::AllMasked, 100, 1.0, 0, 1.0, 32),
    ("sample peaked", Kind::Peaked, 4000, 1.0, 0, 1.0, 32),
    ("sample k=1", Kind::Normal, 4000, 1.0, 1, 1.0, 16),
    ("sample k=V", Kind::Normal, 999, 1.0, 999, 1.0, 32),
    ("sample k>V", Kind::Normal, 999, 1.0, 5000, 0.5, 32),
    ("sample p tiny", Kind::Normal, 4000, 1.0, 0, 1e-6, 16),
    ("sample T huge", Kind::Normal, 4000, 1e30, 0, 1.0, 64),
    (
        "sample T huge top-k",
        Kind::Normal,
        4000,
        1e30,
        100,
        0.5,
        64,
    ),
    ("sample T tiny", Kind::Normal, 4000, 1e-3, 0, 1.0, 16),
    (
        "sample T tiny, +inf ties",
        Kind::Normal,
        4000,
        1e-38,
        0,
        1.0,
        32,
    ),
    ("sample signed zeros", Kind::Zeros, 301, 1.0, 50, 1.0, 64),
    ("sample", Kind::Normal, 1, 1.0, 0, 0.5, 8),
    ("sample", Kind::Ties, 7, 2.0, 3, 0.7, 64),
];

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        rows.extend(rows_or_failure(case.0, || {
            case_rows(be, case, 11 + i as u64)
        }));
    }
    rows.extend(rows_or_failure("sample guards", || guard_rows(be)));
    Ok(rows)
}

/// Uniforms of a case: 0, the largest f32 below 1, then splitmix64's top 24 bits.
fn uniforms(seed: u64, n: usize) -> Vec<f32> {
    let mut us = vec![0.0, 1.0 - f32::EPSILON / 2.0];
    for d in 2..n as u64 {
        us.push(
            (splitmix64(seed.wrapping_mul(31).wrapping_add(d)) >> 40) as f32 / (1u32 << 24) as f32,
        );
    }
    us.truncate(n);
    us
}

fn case_rows(be: &CudaBackend, case: &Case, seed: u64) -> Result<Vec<CheckRow>> {
    let &(name, kind, v, temperature, top_k, top_p, draws) = case;
    let s = Sampling {
        temperature,
        top_k,
        top_p,
        seed: 0,
    };
    let x = logits(kind, v, seed);
    let dx = be.upload(&x)?;
    let band = (temperature > 0.0).then(|| Band::of(&x, &s));
    let (mut outside, mut inside, mut in_band) = (0usize, 0usize, 0usize);
    let us = uniforms(seed, draws);
    for &u in &us {
        let got = be.sample(&dx, v, &s, u)?;
        let want = spec_sample(&x, &s, u);
        let near = band.as_ref().is_some_and(|b| b.contains(&s, u));
        in_band += near as usize;
        if got != want {
            if near {
                inside += 1;
            } else {
                outside += 1;
            }
        }
    }
    let what = format!("{name} V={v} T={temperature} k={top_k} p={top_p}");
    let label = match &band {
        None => format!("{what}: {} draws, tokens differing", us.len()),
        Some(b) => format!(
            "{what}: {} draws, {in_band} in band ({:.1e}), {inside} differ there; differing outside",
            us.len(),
            b.eps
        ),
    };
    Ok(vec![CheckRow::new(label, outside as f64, 0.0)])
}

/// Where f32 rounding may move a decision (see the module doc).
struct Band {
    eps: f64,
    /// Exact cumulative probability over the top-k candidates, in the order.
    cum: Vec<f64>,
}

impl Band {
    fn of(x: &[f32], s: &Sampling) -> Band {
        let cand = ordered_candidates(x, s.temperature, s.top_k);
        let probs = probabilities(&cand);
        let m = cand[0].1;
        let e: Vec<f64> = cand
            .iter()
            .map(|&(_, z)| {
                if z == m {
                    1.0
                } else {
                    (z as f64 - m as f64).exp()
                }
            })
            .collect();
        let total: f64 = e.iter().sum();
        let (mut acc64, mut acc32, mut err) = (0f64, 0f32, 0f64);
        let mut cum = Vec::with_capacity(e.len());
        for (ei, &p) in e.iter().zip(&probs) {
            acc64 += ei / total;
            acc32 += p;
            cum.push(acc64);
            err = err.max((acc32 as f64 - acc64).abs());
        }
        Band {
            eps: 2.0 * err + 1e-5,
            cum,
        }
    }

    /// Whether the spec's choice for `u` lies within the band.
    fn contains(&self, s: &Sampling, u: f32) -> bool {
        let (n, eps, p, u) = (self.cum.len(), self.eps, s.top_p as f64, u as f64);
        let (mut lo, mut hi) = (n - 1, n - 1);
        if s.top_p < 1.0 {
            lo = self.cum.iter().position(|&c| c >= p - eps).unwrap_or(n - 1);
            hi = lo
                + self.cum[lo..]
                    .iter()
                    .position(|&c| c >= p + eps)
                    .unwrap_or(n - 1 - lo);
        }
        let (t_lo, t_hi) = ((u - eps) * self.cum[lo], (u + eps) * self.cum[hi]);
        self.cum[..=hi].iter().any(|&c| c >= t_lo && c <= t_hi)
    }
}

/// The launcher refuses what the kernel cannot take.
fn guard_rows(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let x = be.upload(&[1.0f32, 2.0, 3.0])?;
    let s = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    let refused = [
        be.sample(&x, 0, &s, 0.5).is_err(),
        be.sample(&x, 4, &s, 0.5).is_err(),
        be.sample(&x, 3, &s, 1.0).is_err(),
        be.sample(&x, 3, &Sampling { top_p: 0.0, ..s }, 0.5)
            .is_err(),
    ];
    let accepted = refused.iter().filter(|&&r| !r).count();
    Ok(vec![CheckRow::new(
        "sample guards (vocab 0, short buffer, u = 1, p = 0): accepted",
        accepted as f64,
        0.0,
    )])
}
