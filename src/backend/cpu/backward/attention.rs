//! Causal grouped-query attention backward, recomputing the softmax (no saved probabilities).
//!
//! Forward (see `cpu/attention.rs`), for batch `b`, query `t` at absolute position `p = pos0 + t`,
//! head `h` reading kv head `g = h / (H / KV)`, `c = 1/sqrt(D)`:
//! ```text
//! s_j = c · q_t·k_j  (j ≤ p),   P_j = softmax_j(s),   o_t = Σ_j P_j v_j
//! ```
//! Backward, with `dP_j = do_t·v_j` and the softmax Jacobian `∂P_j/∂s_i = P_j(δ_ij − P_i)`:
//! ```text
//! dv_j += P_j · do_t                       (summed over queries t and the heads h of group g)
//! ds_j  = P_j · (dP_j − Δ_t),   Δ_t = Σ_j P_j dP_j  (= do_t·o_t)
//! dq_t  = c · Σ_j ds_j k_j
//! dk_j += c · ds_j · q_t                   (summed like dv)
//! ```
//! Two passes, flash-attention-2 style, both rayon-parallel with no write conflicts:
//! 1. one task per query row `(b, t, h)`: recompute `s`, `P`, `dP`; write `dq` and keep the row
//!    statistics `L = max + ln Σ exp(s − max)` (log-sum-exp) and `Δ` (`2·B·T·H` scalars).
//! 2. one task per key row `(b, j, g)`: loop over the queries `t` with `pos0 + t ≥ j` and the
//!    heads of group `g`, recompute `P_j = exp(s_j − L)` and accumulate `dk_j`, `dv_j`.
//!
//! Shapes: `dq`, `dout`, `q` `[B, T, H, D]`; `dk`, `dv`, `k`, `v` `[B, S, KV, D]` with
//! `S = shape.cache_cap`. Training calls it with `pos0 = 0`, `cache_cap = q_len` (k, v are the
//! layer's own keys and values); a prefix (`pos0 > 0`) is supported too, its keys then receive
//! gradient from the new queries. All of `dq`, `dk`, `dv` are **written**; key rows at
//! positions `≥ pos0 + T` (never attended) get zeros.

use super::Float;
use crate::backend::AttnShape;
use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    s: AttnShape,
) {
    let (b_n, t_len, h_n, kv_n, d) = (s.batch, s.q_len, s.heads, s.kv_heads, s.head_dim);
    assert!(
        kv_n > 0 && h_n % kv_n == 0 && s.pos0 + t_len <= s.cache_cap,
        "attention_backward: inconsistent shape {s:?}"
    );
    let q_n = b_n * t_len * h_n * d;
    let kv_len = b_n * s.cache_cap * kv_n * d;
    assert!(
        dq.len() >= q_n && dout.len() >= q_n && q.len() >= q_n,
        "attention_backward: query buffers too small for {s:?}"
    );
    assert!(
        dk.len() >= kv_len && dv.len() >= kv_len && k.len() >= kv_len && v.len() >= kv_len,
        "attention_backward: key/value buffers too small for {s:?}"
    );
    if q_n == 0 {
        dk[..kv_len].fill(T::ZERO);
        dv[..kv_len].fill(T::ZERO);
        return;
    }
    let group = h_n / kv_n;
    let c = T::ONE / T::from_f64(d as f64).sqrt();
    let dot = |a: &[T], b: &[T]| a.iter().zip(b).map(|(&x, &y)| x * y).sum::<T>();
    let kv_row = |b: usize, j: usize, g: usize| ((b * s.cache_cap + j) * kv_n + g) * d;

    // Pass 1: dq and per-row statistics (L, Δ), one task per query row (b, t, h).
    let mut stats = vec![(T::ZERO, T::ZERO); b_n * t_len * h_n];
    dq[..q_n]
        .par_chunks_mut(d)
        .zip(stats.par_iter_mut())
        .enumerate()
        .for_each(|(idx, (dq, st))| {
            let h = idx % h_n;
            let t = (idx / h_n) % t_len;
            let b = idx / (h_n * t_len);
            let g = h / group;
            let qv = &q[idx * d..(idx + 1) * d];
            let go = &dout[idx * d..(idx + 1) * d];
            let n_keys = s.pos0 + t + 1;
            let mut p: Vec<T> = (0..n_keys)
                .map(|j| dot(qv, &k[kv_row(b, j, g)..kv_row(b, j, g) + d]) * c)
                .collect();
            let max = p.iter().copied().fold(T::NEG_INFINITY, T::max);
            let mut denom = T::ZERO;
            for x in p.iter_mut() {
                *x = (*x - max).exp();
                denom += *x;
            }
            let inv = T::ONE / denom;
            let dp: Vec<T> = (0..n_keys)
                .map(|j| dot(go, &v[kv_row(b, j, g)..kv_row(b, j, g) + d]))
                .collect();
            let mut delta = T::ZERO;
            for (x, &dpj) in p.iter_mut().zip(&dp) {
                *x *= inv;
                delta += *x * dpj;
            }
            dq.fill(T::ZERO);
            for (j, (&pj, &dpj)) in p.iter().zip(&dp).enumerate() {
                let ds = pj * (dpj - delta) * c;
                for (o, &kk) in dq.iter_mut().zip(&k[kv_row(b, j, g)..kv_row(b, j, g) + d]) {
                    *o += ds * kk;
                }
            }
            *st = (max + denom.ln(), delta);
        });

    // Pass 2: dk, dv, one task per key row (b, j, g).
    dk[..kv_len]
        .par_chunks_mut(d)
        .zip(dv[..kv_len].par_chunks_mut(d))
        .enumerate()
        .for_each(|(idx, (dk, dv))| {
            let g = idx % kv_n;
            let j = (idx / kv_n) % s.cache_cap;
            let b = idx / (kv_n * s.cache_cap);
            dk.fill(T::ZERO);
            dv.fill(T::ZERO);
            let kr = &k[kv_row(b, j, g)..kv_row(b, j, g) + d];
            let vr = &v[kv_row(b, j, g)..kv_row(b, j, g) + d];
            // Queries at absolute position pos0 + t ≥ j see key j.
            for t in j.saturating_sub(s.pos0)..t_len {
                for h in g * group..(g + 1) * group {
                    let qi = (b * t_len + t) * h_n + h;
                    let (lse, delta) = stats[qi];
                    let qv = &q[qi * d..(qi + 1) * d];
                    let go = &dout[qi * d..(qi + 1) * d];
                    let pj = (dot(qv, kr) * c - lse).exp();
                    let ds = pj * (dot(go, vr) - delta) * c;
                    for (((dk, dv), &qq), &o) in dk.iter_mut().zip(dv.iter_mut()).zip(qv).zip(go) {
                        *dk += ds * qq;
                        *dv += pj * o;
                    }
                }
            }
        });
}
