//! Causal GQA attention for training, FlashAttention-2 style: the CPU specification of
//! `kernels/flash_attention.cu`.
//!
//! PLACEHOLDER (to be replaced by the tiled specification): the forward computes each row
//! directly and returns its log-sum-exp; the backward defers to the plain
//! [`super::backward::attention_backward`].

use super::backward::Float;
use crate::backend::AttnShape;

/// `out` as [`super::attention`] and `lse[b, t, h] = ln Σ_j exp(c·q·k_j)` (`[B, T, H]`).
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_forward<T: Float>(
    out: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    s: AttnShape,
) {
    let (t_len, h_n, kv_n, d) = (s.q_len, s.heads, s.kv_heads, s.head_dim);
    let group = h_n / kv_n;
    let c = T::ONE / T::from_f64(d as f64).sqrt();
    for idx in 0..s.batch * t_len * h_n {
        let h = idx % h_n;
        let t = (idx / h_n) % t_len;
        let b = idx / (h_n * t_len);
        let g = h / group;
        let qv = &q[idx * d..(idx + 1) * d];
        let row = |j: usize| ((b * s.cache_cap + j) * kv_n + g) * d;
        let n = s.pos0 + t + 1;
        let sc: Vec<T> = (0..n)
            .map(|j| {
                qv.iter()
                    .zip(&k[row(j)..row(j) + d])
                    .map(|(&a, &b)| a * b)
                    .sum::<T>()
                    * c
            })
            .collect();
        let max = sc.iter().copied().fold(T::NEG_INFINITY, T::max);
        let p: Vec<T> = sc.iter().map(|&x| (x - max).exp()).collect();
        let denom: T = p.iter().copied().sum();
        let o = &mut out[idx * d..(idx + 1) * d];
        o.fill(T::ZERO);
        for (j, &pj) in p.iter().enumerate() {
            for (oo, &vv) in o.iter_mut().zip(&v[row(j)..row(j) + d]) {
                *oo += pj / denom * vv;
            }
        }
        lse[idx] = max + denom.ln();
    }
}

/// Writes `dq`, `dk`, `dv` from the forward's `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn flash_attention_backward<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    _out: &[T],
    _lse: &[T],
    s: AttnShape,
) {
    super::backward::attention_backward(dq, dk, dv, dout, q, k, v, s);
}
