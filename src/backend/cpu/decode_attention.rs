//! Flash-decoding: causal grouped-query attention with the keys split into ranges that are
//! attended separately and merged afterwards (spec of `kernels/decode_attention.cu`, launcher in
//! `backend/cuda/decode_attention.rs`).
//!
//! Shapes as [`AttnShape`]. The `n_keys = pos0 + T` cache positions are cut into splits of
//! `split_len` keys (the last one shorter); for every query row (b, t, h) and split `s`, over the
//! split's keys `j ≤ p = pos0 + t` (scores `x_j = q·k_j / sqrt(D)`, f32):
//! ```text
//! m_s = max_j x_j,   l_s = Σ_j e^{x_j − m_s},   O_s = Σ_j e^{x_j − m_s} v_j
//! ```
//! (a split with no visible key has `m_s = −inf`, `l_s = 0`, `O_s = 0`), and the combine gives
//! ```text
//! M = max_s m_s,   L = Σ_s l_s e^{m_s − M},   out = Σ_s O_s e^{m_s − M} / L
//! ```
//! which is `softmax(x) · v` for any split length: `Σ_s e^{m_s − M} Σ_j e^{x_j − m_s} = Σ_j
//! e^{x_j − M}`. The device kernel computes each split's partial with an online softmax over
//! tiles of 64 keys; that is the same identity applied once more inside the split.
//!
//! [`split_plan`] is how the launcher picks `split_len`: enough CTAs to fill the GPU, whole tiles.

use crate::backend::AttnShape;
use rayon::prelude::*;

/// Keys per shared-memory tile of the device kernel (`DEC_TK`); splits are whole tiles.
pub const TILE: usize = 64;
/// Query rows (positions × heads of one KV group) one CTA takes (`DEC_MAX_ROWS`).
pub const MAX_ROWS: usize = 16;
/// CTAs the launcher aims for: about two per SM on an H100 (132 SMs), enough on smaller cards.
pub const TARGET_CTAS: usize = 264;

/// `(split_len, n_splits)` for `n_keys` keys when `ctas` CTAs already exist without splitting
/// (batch × KV heads × query blocks): as many splits as bring the grid to [`TARGET_CTAS`], each a
/// whole number of [`TILE`]s, at least one tile long.
pub fn split_plan(n_keys: usize, ctas: usize) -> (usize, usize) {
    let tiles = n_keys.div_ceil(TILE).max(1);
    let want = TARGET_CTAS.div_ceil(ctas.max(1)).clamp(1, tiles);
    let split_len = tiles.div_ceil(want) * TILE;
    (split_len, n_keys.div_ceil(split_len).max(1))
}

/// The most splits [`split_plan`] gives any length up to `cap` keys with `ctas` CTAs: the grid
/// of a launch that plans its split on the device (a replayed decode step) for every position.
pub fn max_splits(cap: usize, ctas: usize) -> usize {
    TARGET_CTAS
        .div_ceil(ctas.max(1))
        .clamp(1, cap.div_ceil(TILE).max(1))
}

/// One split's partial `(m, l, O)` for query `qv` over keys `lo..hi` (visible ones only: `j ≤ p`).
fn partial(
    qv: &[f32],
    key: impl Fn(usize) -> (usize, usize),
    k: &[f32],
    v: &[f32],
    (lo, hi): (usize, usize),
    scale: f32,
) -> (f32, f32, Vec<f32>) {
    let d = qv.len();
    let scores: Vec<f32> = (lo..hi)
        .map(|j| {
            let (a, b) = key(j);
            qv.iter().zip(&k[a..b]).map(|(x, y)| x * y).sum::<f32>() * scale
        })
        .collect();
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut o = vec![0.0f32; d];
    if m == f32::NEG_INFINITY {
        return (m, 0.0, o);
    }
    let mut l = 0.0f32;
    for (j, &x) in (lo..hi).zip(&scores) {
        let e = (x - m).exp();
        l += e;
        let (a, b) = key(j);
        for (o, &vv) in o.iter_mut().zip(&v[a..b]) {
            *o += e * vv;
        }
    }
    (m, l, o)
}

/// Merges split partials `(m_s, l_s, O_s)` into `out` (see the module docs).
pub fn combine(out: &mut [f32], parts: &[(f32, f32, Vec<f32>)]) {
    let mx = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
    let w = |m: f32| {
        if m == f32::NEG_INFINITY {
            0.0
        } else {
            (m - mx).exp()
        }
    };
    let l: f32 = parts.iter().map(|p| p.1 * w(p.0)).sum();
    out.fill(0.0);
    for (m, _, o) in parts {
        let c = w(*m);
        for (x, &y) in out.iter_mut().zip(o) {
            *x += c * y;
        }
    }
    for x in out.iter_mut() {
        *x /= l;
    }
}

/// Attention (as [`super::attention`]) computed split by split with splits of `split_len` keys.
pub fn decode_attention(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    split_len: usize,
) {
    let (t_len, h_n, kv_n, d) = (s.q_len, s.heads, s.kv_heads, s.head_dim);
    let group = h_n / kv_n;
    let scale = 1.0 / (d as f32).sqrt();
    let n_keys = s.pos0 + t_len;
    let split_len = split_len.max(1);
    out[..s.batch * t_len * h_n * d]
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(idx, o)| {
            let h = idx % h_n;
            let t = (idx / h_n) % t_len;
            let b = idx / (h_n * t_len);
            let g = h / group;
            let key = |j: usize| {
                let a = ((b * s.cache_cap + j) * kv_n + g) * d;
                (a, a + d)
            };
            let visible = s.pos0 + t + 1;
            let parts: Vec<_> = (0..n_keys)
                .step_by(split_len)
                .map(|lo| {
                    let hi = (lo + split_len).min(n_keys).min(visible).max(lo);
                    partial(&q[idx * d..(idx + 1) * d], key, k, v, (lo, hi), scale)
                })
                .collect();
            combine(o, &parts);
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::attention;

    fn values(seed: u64, n: usize, amp: f32) -> Vec<f32> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    /// Any split length (1 key, a tile, odd lengths, longer than the cache) gives plain attention
    /// within f32 rounding, for decode (T = 1) and causal chunks (T > 1, rows whose keys end
    /// before the last split), with GQA.
    #[test]
    fn splits_match_plain_attention() {
        for &(t, pos0, heads, kv, d) in &[
            (1, 0, 4, 1, 8),
            (1, 6, 3, 3, 16),
            (1, 299, 6, 2, 8),
            (5, 37, 4, 2, 8),
            (17, 0, 2, 1, 4),
        ] {
            let s = AttnShape {
                batch: 2,
                q_len: t,
                pos0,
                cache_cap: pos0 + t + 3,
                heads,
                kv_heads: kv,
                head_dim: d,
            };
            let q = values(1, 2 * t * heads * d, 2.0);
            let k = values(2, 2 * s.cache_cap * kv * d, 2.0);
            let v = values(3, 2 * s.cache_cap * kv * d, 1.0);
            let mut want = vec![0.0; q.len()];
            attention(&mut want, &q, &k, &v, s);
            for split in [1, 3, 7, 64, 1000] {
                let mut got = vec![f32::NAN; q.len()];
                decode_attention(&mut got, &q, &k, &v, s, split);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-5, "{s:?} split {split}: max err {err}");
            }
        }
    }

    /// The grid of a device-planned launch covers every length's plan: no position of the cache
    /// needs more splits than [`max_splits`], and some position needs exactly that many.
    #[test]
    fn max_splits_bounds_every_plan() {
        for cap in [1, 63, 64, 65, 300, 576, 2049, 4096, 8192] {
            for ctas in [1, 3, 8, 32, 40, 132, 264, 1000] {
                let most = (1..=cap).map(|n| split_plan(n, ctas).1).max().unwrap();
                assert_eq!(most, max_splits(cap, ctas), "cap {cap}, {ctas} CTAs");
            }
        }
    }

    /// A split with no visible key contributes nothing (m = −inf, l = 0), even first.
    #[test]
    fn empty_split_is_neutral() {
        let mut out = vec![0.0; 2];
        let parts = vec![
            (f32::NEG_INFINITY, 0.0, vec![0.0, 0.0]),
            (1.0, 2.0, vec![4.0, 6.0]),
        ];
        combine(&mut out, &parts);
        assert_eq!(out, vec![2.0, 3.0]);
    }

    /// The plan covers every key with whole tiles and never makes an empty split.
    #[test]
    fn split_plan_covers_the_keys() {
        for n in [1, 7, 63, 64, 65, 300, 2049, 4096] {
            for ctas in [1, 32, 96, 264, 1000] {
                let (len, splits) = split_plan(n, ctas);
                assert_eq!(len % TILE, 0);
                assert!(len * splits >= n && len * (splits - 1) < n, "{n} {ctas}");
            }
        }
        assert_eq!(split_plan(4096, 32), (512, 8));
        assert_eq!(split_plan(128, 32), (64, 2));
        assert_eq!(split_plan(4096, 1000).1, 1);
    }
}
