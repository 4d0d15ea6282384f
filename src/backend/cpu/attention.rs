//! Causal grouped-query attention over a key/value cache.
//!
//! Shapes (see [`AttnShape`]): `q`, `out` `[B, T, H, D]`; `k`, `v` caches `[B, S, KV, D]` with
//! valid entries at positions `0..pos0 + T`. For batch `b`, query `t` (absolute position
//! `p = pos0 + t`) and head `h`, reading kv head `g = h / (H / KV)`:
//! ```text
//! s_j   = (q[b,t,h,:] · k[b,j,g,:]) / sqrt(D)      for j = 0..=p   (causal mask: j > p excluded)
//! a_j   = exp(s_j − max s) / Σ exp(s − max s)
//! out[b,t,h,:] = Σ_j a_j · v[b,j,g,:]
//! ```
//! Scores and the softmax are f32, as transformers' eager attention computes them. The same
//! function serves prefill (`pos0 = 0`, `T` = prompt length) and cached decoding (`T = 1`).

use crate::backend::AttnShape;
use rayon::prelude::*;

pub fn attention(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], s: AttnShape) {
    let (t_len, h_n, kv_n, d) = (s.q_len, s.heads, s.kv_heads, s.head_dim);
    let group = h_n / kv_n;
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(d).enumerate().for_each(|(idx, o)| {
        // idx enumerates (b, t, h) in row-major order.
        let h = idx % h_n;
        let t = (idx / h_n) % t_len;
        let b = idx / (h_n * t_len);
        let g = h / group;
        let qv = &q[idx * d..(idx + 1) * d];
        let kv_row = |j: usize| ((b * s.cache_cap + j) * kv_n + g) * d;
        let n_keys = s.pos0 + t + 1;
        let mut scores: Vec<f32> = (0..n_keys)
            .map(|j| {
                let kr = &k[kv_row(j)..kv_row(j) + d];
                qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut denom = 0.0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            denom += *sc;
        }
        o.fill(0.0);
        for (j, &a) in scores.iter().enumerate() {
            let w = a / denom;
            for (o, &vv) in o.iter_mut().zip(&v[kv_row(j)..kv_row(j) + d]) {
                *o += w * vv;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One query over one key returns that key's value; two equal keys average their values.
    #[test]
    fn trivial_cases() {
        let s = AttnShape {
            batch: 1,
            q_len: 2,
            pos0: 0,
            cache_cap: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        let q = vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let k = vec![0.0, 0.0, 0.0, 0.0];
        let v = vec![1.0, 2.0, 3.0, 4.0];
        let mut out = vec![0.0; 8];
        attention(&mut out, &q, &k, &v, s);
        assert_eq!(&out[..4], &[1.0, 2.0, 1.0, 2.0]); // t = 0 sees only key 0
        assert_eq!(&out[4..], &[2.0, 3.0, 2.0, 3.0]); // t = 1: equal scores, mean of v0, v1
    }
}
