//! Check of the flash attention kernels (`kernels/flash_attention.cu`, launchers in
//! `backend/cuda/flash_attention.rs`) against their CPU specification (the CPU backend's
//! `TrainBackend::attention_train` / `attention_backward`, i.e.
//! [`crate::backend::cpu::flash_attention`] per packed sequence), forward and backward, on both
//! device paths: tensor cores (head_dim 64 and 128) and the general f32 kernels (head_dim 16 and
//! 24, as the tiny fixtures use). Single sequences of 1, 17, 300 and 513 tokens (inside, one
//! short of, and past the 64-row tiles), GQA ratios 1, 3 and 4, and packed batches (the
//! varlen layout training uses): two equal sequences, lens `[1, 17, 64, 130]` and
//! `[300, 5, 213]` (one row, a partial tile, a whole tile and a tile past the 32-query backward
//! tiles; sequences starting mid-tile, so a kernel that lets a tile cross a sequence boundary
//! fails) with GQA ratios 1 and 4 on both paths, and one batch holding an empty sequence. Not
//! every combination, but each length, ratio and head_dim appears on the tensor-core path, and
//! the f32 path covers the same lengths. The backward gets the CPU forward's `out` and `lse`,
//! so its rows measure the backward alone.
//!
//! Bounds. The tensor-core path rounds Q, K, V, dout (and P, dS) to bf16: each operand carries a
//! relative error of at most 2^-9 (≈ 2e-3, RNE), random in sign, while every sum is f32. The
//! CPU model of exactly these roundings (`tests::bf16_model_within_bounds`, run on the check's
//! own cases) lands below half of each bound (most rows at a quarter):
//! - scores `s = c·q·k` shift by ≤ 2^-8·c·Σ|q_d k_d| (≈ 4e-2 for D = 128 with q, k in ±2, if
//!   every rounding went the same way), ~2e-3 rms; lse moves by a P-weighted average of those
//!   shifts: **max |Δlse| ≤ 2e-2** (absolute: lse is O(ln T), a relative measure would flatter
//!   long rows; modelled ≤ 8.7e-3, on the 300-token packed sequence).
//! - out = Σ P v with P and v each rounded once and P shifted by Δs: ~3 roundings of 2^-9
//!   relative to the output's scale: **max rel err ≤ 2e-2** (modelled ≤ 5e-3).
//! - gradients: dS = P ⊙ (dP − Δ) loses a little more where dP ≈ Δ, so the element-wise
//!   maximum is not a fair measure: **rel_l2 ≤ 2e-2** per gradient (modelled ≤ 5.2e-3), and
//!   the direction, what the optimizer sees: **1 − cos ≤ 1e-3** for the worst of dq, dk, dv
//!   (modelled ≤ 1.3e-5).
//! - T = 1 makes dq and dk exactly 0 (one key, a constant softmax): those rows bound the max
//!   abs value instead, **≤ 1e-2** (bf16 noise of dP − Δ times c·|k|, ~1e-3).
//!
//! The f32 path differs from the spec only in summation order and fast-math `expf` (a few ulp of
//! the argument): **max rel err ≤ 1e-4** for out, dq, dk, dv, max |Δlse| ≤ 1e-4, and an exactly
//! zero gradient stays below 1e-6.

use super::{cosine, max_rel_err, rel_l2, rows_or_failure, test_values, CheckRow};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::flash_attention::{backward_packed, forward_packed, FlashScratch};
use crate::backend::{Packed, TrainBackend};
use crate::error::Result;

/// `(sequence lengths, heads, kv_heads, head_dim)`.
type Case = (&'static [usize], usize, usize, usize);

#[rustfmt::skip]
const CASES: [Case; 16] = [
    // tensor cores: single sequences
    (&[1], 4, 1, 64),
    (&[17, 17], 6, 2, 128),
    (&[300], 2, 2, 64),
    (&[513], 4, 1, 128),
    (&[513], 3, 1, 64),
    // tensor cores: packed
    (&[1, 17, 64, 130], 4, 1, 64),
    (&[1, 17, 64, 130], 2, 2, 128),
    (&[300, 5, 213], 4, 4, 64),
    (&[300, 5, 213], 8, 2, 128),
    // f32: single sequences
    (&[1], 4, 1, 24),
    (&[17], 4, 4, 16),
    (&[300], 6, 2, 24),
    (&[513], 4, 1, 16),
    // f32: packed
    (&[1, 17, 64, 130], 4, 1, 24),
    (&[300, 5, 213], 3, 3, 16),
    (&[7, 0, 70], 4, 2, 16),
];

/// Input amplitudes: q, k in ±2 put the scores `c·q·k` (std ≈ 4/3) over a few units, so the
/// softmax is neither flat nor one-hot; v and dout in ±1.
const QK_AMP: f32 = 2.0;

fn packed(&(lens, heads, kv_heads, head_dim): &Case) -> Packed<'static> {
    Packed {
        lens,
        heads,
        kv_heads,
        head_dim,
    }
}

fn name(p: Packed) -> String {
    let path = if matches!(p.head_dim, 64 | 128) {
        "bf16 tc"
    } else {
        "f32"
    };
    let lens = match p.lens {
        [t] => format!("T={t}"),
        l => format!("lens={l:?}"),
    };
    format!(
        "flash attn {path} {lens} H={}/KV={} D={}",
        p.heads, p.kv_heads, p.head_dim
    )
}

/// `max |got − want|` (infinite on a length mismatch or a non-finite value).
fn max_abs_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .fold(0f64, |a, (&g, &w)| a.max((g as f64 - w as f64).abs()))
}

/// The inputs of a case: `(q, k, v, dout)`.
fn inputs(p: Packed, seed: u64) -> [Vec<f32>; 4] {
    let qn = p.rows() * p.heads * p.head_dim;
    let kvn = p.rows() * p.kv_heads * p.head_dim;
    [
        test_values(seed, qn, QK_AMP),
        test_values(seed + 1, kvn, QK_AMP),
        test_values(seed + 2, kvn, 1.0),
        test_values(seed + 3, qn, 1.0),
    ]
}

/// The CPU spec: `[out, lse, dq, dk, dv]`.
fn spec(p: Packed, [q, k, v, dout]: &[Vec<f32>; 4]) -> Result<[Vec<f32>; 5]> {
    let cpu = CpuBackend::new();
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; p.rows() * p.heads];
    cpu.attention_train(&mut out, &mut lse, q, k, v, p)?;
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; k.len()],
    );
    cpu.attention_backward(&mut dq, &mut dk, &mut dv, dout, q, k, v, &out, &lse, p)?;
    Ok([out, lse, dq, dk, dv])
}

/// Error rows of one case from the device results `[out, lse, dq, dk, dv]`.
fn compare(p: Packed, got: &[Vec<f32>; 5], want: &[Vec<f32>; 5]) -> Vec<CheckRow> {
    let n = name(p);
    let tc = matches!(p.head_dim, 64 | 128);
    // (bound on out's max rel err, on lse's max abs err, on a zero gradient's max abs value)
    let (out_b, lse_b, zero_b) = if tc {
        (2e-2, 2e-2, 1e-2)
    } else {
        (1e-4, 1e-4, 1e-6)
    };
    let mut rows = vec![
        CheckRow::new(
            format!("{n} out (max rel)"),
            max_rel_err(&got[0], &want[0]),
            out_b,
        ),
        CheckRow::new(
            format!("{n} lse (max abs)"),
            max_abs_err(&got[1], &want[1]),
            lse_b,
        ),
    ];
    let mut worst_cos = 0f64;
    for (i, g) in ["dq", "dk", "dv"].iter().enumerate() {
        let (got, want) = (&got[2 + i], &want[2 + i]);
        if want.iter().all(|&w| w == 0.0) {
            // T = 1: one key, a constant softmax, dq = dk = 0 exactly; the device keeps the
            // rounding noise of dP − Δ (bf16: ≲ 2^-9·Σ|dout·v| scaled by c·|k|, ~1e-3).
            let e = max_abs_err(got, want);
            rows.push(CheckRow::new(
                format!("{n} {g} (max abs, exact 0)"),
                e,
                zero_b,
            ));
        } else if tc {
            let e = rel_l2(got, want);
            rows.push(CheckRow::new(format!("{n} {g} (rel l2)"), e, 2e-2));
            worst_cos = worst_cos.max(1.0 - cosine(got, want));
        } else {
            let e = max_rel_err(got, want);
            rows.push(CheckRow::new(format!("{n} {g} (max rel)"), e, 1e-4));
        }
    }
    if tc {
        rows.push(CheckRow::new(
            format!("{n} dq/dk/dv (1 - cos)"),
            worst_cos,
            1e-3,
        ));
    }
    rows
}

fn device_case(be: &CudaBackend, p: Packed, seed: u64) -> Result<Vec<CheckRow>> {
    let dev = &be.dev;
    let ins = inputs(p, seed);
    let want = spec(p, &ins)?;
    let [q, k, v, dout] = &ins;
    let (gq, gk, gv, gdo) = (
        dev.upload(q)?,
        dev.upload(k)?,
        dev.upload(v)?,
        dev.upload(dout)?,
    );
    // Outputs start as NaN, so anything the kernels leave unwritten fails the row.
    let mut gout = dev.upload(&vec![f32::NAN; q.len()])?;
    let mut glse = dev.upload(&vec![f32::NAN; want[1].len()])?;
    // One scratch for both directions: the backward reuses the forward's sequence tables.
    let mut scratch = FlashScratch::default();
    forward_packed(dev, &mut scratch, &mut gout, &mut glse, &gq, &gk, &gv, p)?;
    let (ref_out, ref_lse) = (dev.upload(&want[0])?, dev.upload(&want[1])?);
    let mut gdq = dev.upload(&vec![f32::NAN; q.len()])?;
    let mut gdk = dev.upload(&vec![f32::NAN; k.len()])?;
    let mut gdv = dev.upload(&vec![f32::NAN; k.len()])?;
    let (g, s) = ((&mut gdq, &mut gdk, &mut gdv), &mut scratch);
    backward_packed(
        dev, s, g.0, g.1, g.2, &gdo, &gq, &gk, &gv, &ref_out, &ref_lse, p,
    )?;
    let got = [
        dev.download(&gout)?,
        dev.download(&glse)?,
        dev.download(&gdq)?,
        dev.download(&gdk)?,
        dev.download(&gdv)?,
    ];
    Ok(compare(p, &got, &want))
}

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let p = packed(c);
        rows.extend(rows_or_failure(&name(p), || {
            device_case(be, p, 0xA77E + 16 * i as u64)
        }));
    }
    Ok(rows)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::bf16_round;

    fn bf(x: f64) -> f64 {
        bf16_round(x as f32) as f64
    }

    /// The tensor-core kernels' roundings on the CPU: q, k, v, dout, P (as an operand of P·V and
    /// Pᵀ·dout) and dS rounded to bf16, everything else exact (f64). The backward starts from the
    /// spec's `out` and `lse`, as the check's device backward does.
    fn bf16_model(
        p: Packed,
        [q, k, v, dout]: &[Vec<f32>; 4],
        want: &[Vec<f32>; 5],
    ) -> [Vec<f32>; 5] {
        let (d, group) = (p.head_dim, p.heads / p.kv_heads);
        let c = 1.0 / (d as f64).sqrt();
        // Row t (j) of the sequence starting at row b.
        let row = |b: usize, t: usize, h: usize| ((b + t) * p.heads + h) * d;
        let kv = |b: usize, j: usize, g: usize| ((b + j) * p.kv_heads + g) * d;
        let dotb = |x: &[f32], y: &[f32]| {
            x.iter()
                .zip(y)
                .map(|(&a, &b)| bf(a as f64) * bf(b as f64))
                .sum::<f64>()
        };
        let mut out = vec![0f64; q.len()];
        let mut lse = vec![0f64; want[1].len()];
        let (mut dq, mut dk, mut dv) = (
            vec![0f64; q.len()],
            vec![0f64; k.len()],
            vec![0f64; k.len()],
        );
        for (b, len) in p.spans() {
            for t in 0..len {
                for h in 0..p.heads {
                    let (qi, g) = (row(b, t, h), h / group);
                    let (qv, go) = (&q[qi..qi + d], &dout[qi..qi + d]);
                    let sc: Vec<f64> = (0..=t)
                        .map(|j| c * dotb(qv, &k[kv(b, j, g)..][..d]))
                        .collect();
                    let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let l: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for (j, x) in sc.iter().enumerate() {
                        let p = bf((x - m).exp());
                        for e in 0..d {
                            out[qi + e] += p * bf(v[kv(b, j, g) + e] as f64) / l;
                        }
                    }
                    let si = (b + t) * p.heads + h;
                    lse[si] = m + l.ln();
                    let (ref_lse, ref_out) = (want[1][si] as f64, &want[0][qi..qi + d]);
                    let delta: f64 = go
                        .iter()
                        .zip(ref_out)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    for (j, x) in sc.iter().enumerate() {
                        let kj = kv(b, j, g);
                        let p = (x - ref_lse).exp();
                        let ds = bf(p * (dotb(go, &v[kj..kj + d]) - delta));
                        for e in 0..d {
                            dv[kj + e] += bf(p) * bf(go[e] as f64);
                            dk[kj + e] += c * ds * bf(qv[e] as f64);
                            dq[qi + e] += c * ds * bf(k[kj + e] as f64);
                        }
                    }
                }
            }
        }
        [out, lse, dq, dk, dv].map(|x| x.into_iter().map(|x| x as f32).collect())
    }

    /// The tensor-core bounds hold with room to spare for the bf16 roundings alone: every row of
    /// the modelled kernel is below half its bound.
    #[test]
    fn bf16_model_within_bounds() {
        let mut worst = 0f64;
        for (i, c) in CASES.iter().enumerate() {
            let p = packed(c);
            if !matches!(p.head_dim, 64 | 128) {
                continue;
            }
            let ins = inputs(p, 0xA77E + 16 * i as u64);
            let want = spec(p, &ins).unwrap();
            for r in compare(p, &bf16_model(p, &ins, &want), &want) {
                eprintln!("{:64} {:.3e} (bound {:.0e})", r.op, r.max_err, r.bound);
                worst = worst.max(r.max_err / r.bound);
            }
        }
        assert!(
            worst <= 0.5,
            "a modelled error exceeds half its bound ({worst:.2})"
        );
    }
}
