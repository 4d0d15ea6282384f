//! Check of the small training ops against their CPU specifications, through the
//! [`TrainBackend`] methods the training step calls: RMSNorm backward
//! (`cpu/backward/rmsnorm.rs`), SwiGLU backward (`cpu/backward/swiglu.rs`), the bf16 activation
//! stash (`bf16_round`), the dropout mask (`cpu/dropout.rs`) and the fused cross-entropy
//! (`cross_entropy_fused` in `cpu/backward/cross_entropy.rs`), on odd shapes; then the
//! launchers' guards (zero sizes, short buffers, bad targets).
//!
//! Error measures and bounds:
//! - Float ops: [`max_rel_err`] (`max |got − want| / max |want|`), bound [`F32_REORDER`] = 1e-5.
//!   Device and CPU compute the same f32 formulas; they differ in the order of the f32 row
//!   reductions (CPU: one sequential sum; device: strided per-thread sums, then a shuffle tree),
//!   which moves a sum of n random-signed rounding errors by ~√n·2⁻²⁴ relative (≈ 5e-6 at
//!   n = 8193, the largest row here; typically 1e-6), and in fast math (`rsqrtf`, `__expf`,
//!   `__logf`, approximate division: a few ulp, ≲ 1e-6 for the arguments here). The CPU's
//!   cross-entropy sums in f64 with libm's `exp`, so that row sees the device's error alone.
//!   The test `reordered_f32_sums_stay_within_the_bound` replays the device's summation order
//!   on the CPU for these shapes: ≤ 1.2e-6, a quarter of the bound leaves room for fast math.
//! - Dropout mask and bf16 stash: the number of elements whose bits differ, bound 0 (both are
//!   specified bit for bit: the mask is a hash, the stash a round-to-nearest-even and a shift).
//! - Ignored cross-entropy rows (target −100) must be exact zeros, loss included: any non-zero
//!   makes the dlogits row's error infinite.
//!
//! Outputs are pre-filled with a marker value, so an op that accumulated instead of writing, or
//! skipped elements, fails.

use super::{max_rel_err, rows_or_failure, test_values, CheckRow};
use crate::backend::cpu::backward::{
    cross_entropy_fused, mean_scale, rmsnorm_backward, swiglu_backward,
};
use crate::backend::cpu::bf16_round;
use crate::backend::cpu::dropout::{dropout_mask, splitmix64};
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::{cross_entropy, dropout, ops, rmsnorm};
use crate::backend::{Backend, TrainBackend};
use crate::error::Result;

/// Bound of the float ops (see the module doc).
const F32_REORDER: f64 = 1e-5;

/// What every output buffer holds before an op writes it.
const MARKER: f32 = 7.25;

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    rows.extend(rows_or_failure("rmsnorm bwd", || rmsnorm_rows(be)));
    rows.extend(rows_or_failure("swiglu bwd", || swiglu_rows(be)));
    rows.extend(rows_or_failure("bf16 stash", || stash_rows(be)));
    rows.extend(rows_or_failure("dropout mask", || dropout_rows(be)));
    rows.extend(rows_or_failure("fused xent", || cross_entropy_rows(be)));
    rows.extend(rows_or_failure("ops guards", || guard_rows(be)));
    Ok(rows)
}

/// `(rows, dim)`: the float4 path (dim % 4 == 0: 48, 4096, 8192) and the scalar one (4097, 8193).
const RMS_SHAPES: [(usize, usize); 6] = [
    (1, 48),
    (17, 4097),
    (300, 48),
    (300, 4096),
    (3, 8192),
    (2, 8193),
];

fn rmsnorm_rows(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let eps = 1e-5f32;
    let mut out = Vec::new();
    for (i, &(rows, dim)) in RMS_SHAPES.iter().enumerate() {
        let n = rows * dim;
        let seed = 100 + 10 * i as u64;
        let x = test_values(seed, n, 2.0);
        let dy = test_values(seed + 1, n, 1.0);
        let w: Vec<f32> = test_values(seed + 2, dim, 0.5)
            .iter()
            .map(|v| 1.0 + v)
            .collect();
        let mut want = vec![0.0f32; n];
        rmsnorm_backward(&mut want, &dy, &x, &w, rows, dim, eps);
        let (xd, dyd, wd) = (be.upload(&x)?, be.upload(&dy)?, be.upload(&w)?);
        let mut dx = be.upload(&vec![MARKER; n])?;
        be.rmsnorm_backward(&mut dx, &dyd, &xd, &wd, rows, dim, eps)?;
        let got = be.download(&dx)?;
        out.push(CheckRow::new(
            format!("rmsnorm bwd dx [{rows}, {dim}]"),
            max_rel_err(&got, &want),
            F32_REORDER,
        ));
    }
    Ok(out)
}

/// Gates that saturate the sigmoid or overflow `exp(−g)` (g < −88: σ = 0 on both sides).
const SWIGLU_EXTREMES: [f32; 8] = [-100.0, -88.5, -30.0, -10.0, 0.0, 10.0, 30.0, 100.0];

fn swiglu_rows(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    for (i, n) in [1usize, 17 * 48, 300 * 4097].into_iter().enumerate() {
        let seed = 200 + 10 * i as u64;
        let mut gate = test_values(seed, n, 8.0);
        if n > SWIGLU_EXTREMES.len() {
            gate[..SWIGLU_EXTREMES.len()].copy_from_slice(&SWIGLU_EXTREMES);
        }
        let up = test_values(seed + 1, n, 2.0);
        let dh = test_values(seed + 2, n, 1.0);
        let (mut dg_want, mut du_want) = (vec![0.0f32; n], vec![0.0f32; n]);
        swiglu_backward(&mut dg_want, &mut du_want, &dh, &gate, &up);
        let (gd, ud, dhd) = (be.upload(&gate)?, be.upload(&up)?, be.upload(&dh)?);
        let mut dg = be.upload(&vec![MARKER; n])?;
        let mut du = be.upload(&vec![MARKER; n])?;
        be.swiglu_backward(&mut dg, &mut du, &dhd, &gd, &ud, n)?;
        let err = max_rel_err(&be.download(&dg)?, &dg_want)
            .max(max_rel_err(&be.download(&du)?, &du_want));
        out.push(CheckRow::new(
            format!("swiglu bwd dgate, dup n={n}"),
            err,
            F32_REORDER,
        ));
    }
    Ok(out)
}

/// Elements of `got` whose bits differ from `want` (a length mismatch counts every element).
fn bit_mismatches(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return got.len().max(want.len()) as f64;
    }
    got.iter()
        .zip(want)
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count() as f64
}

fn stash_rows(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    // Every bf16 bit pattern widened: the spec is the shift (f32 bits = bf16 bits << 16), which
    // is `bf16::to_f32` for every non-NaN pattern and keeps NaN payloads as they are.
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let want: Vec<f32> = all
        .iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect();
    let bits = be.dev.upload(&all)?;
    let mut wide = be.upload(&vec![MARKER; all.len()])?;
    ops::bf16_to_f32(&be.dev, &mut wide, &bits, all.len())?;
    let mut out = vec![CheckRow::new(
        "bf16 → f32 all 65536 bit patterns (mismatches)",
        bit_mismatches(&be.download(&wide)?, &want),
        0.0,
    )];

    // The round trip of the training step: random values plus ±0, ties to even, overflow to
    // ±inf, ±inf themselves, and f32 subnormals (the bf16 conversion, `cvt.rn.bf16.f32`, does not
    // flush them: counted in a row of their own, so a flush would be named as such).
    let n = 100_003;
    let mut x = test_values(300, n, 4.0);
    let tiny = test_values(301, 64, 1e-38); // |v| < 1e-38 < f32::MIN_POSITIVE: subnormals
    let special = [
        0.0,
        -0.0,
        f32::from_bits(1),
        -f32::from_bits(0x0001_8000),
        f32::MIN_POSITIVE,
        1.0 + 1.0 / 256.0, // tie: rounds to even (1.0)
        1.0 + 3.0 / 256.0, // tie: rounds to even (1.015625)
        -(1.0 + 1.0 / 128.0 + 1.0 / 256.0 + 1e-7),
        f32::from_bits(0x7F7F_0000), // the largest finite bf16
        f32::MAX,                    // rounds up to +inf
        -f32::MAX,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e-30,
    ];
    x[..special.len()].copy_from_slice(&special);
    x[special.len()..special.len() + tiny.len()].copy_from_slice(&tiny);
    let want: Vec<f32> = x.iter().map(|&v| bf16_round(v)).collect();
    let saved = be.stash(be.upload(&x)?, n)?;
    let got = be.download(&be.unstash(&saved, n)?)?;
    if got.len() != n {
        return Err(crate::error::Error::Backend(format!(
            "bf16 stash: unstash gave {} values for {n}",
            got.len()
        )));
    }
    let (mut normal, mut subnormal) = (0usize, 0usize);
    for ((v, g), w) in x.iter().zip(&got).zip(&want) {
        if g.to_bits() != w.to_bits() {
            if v.is_subnormal() {
                subnormal += 1;
            } else {
                normal += 1;
            }
        }
    }
    out.push(CheckRow::new(
        format!("bf16 stash round trip n={n} (mismatches)"),
        normal as f64,
        0.0,
    ));
    out.push(CheckRow::new(
        "bf16 stash round trip, f32 subnormal inputs (mismatches)",
        subnormal as f64,
        0.0,
    ));
    Ok(out)
}

fn dropout_rows(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let seed = 0x5EED_0000_D0D0_0001u64;
    let cases = [
        (0.1f32, 0u64, 100_003usize),
        (0.1, 12_345, 100_003),
        (0.5, 0, 100_003),
        (0.5, 12_345, 100_003),
        (0.0, 7, 1001),
        (1e-45, 0, 1001),
    ];
    for (p, offset, len) in cases {
        let mut want = vec![0.0f32; len];
        dropout_mask(&mut want, p, seed, offset);
        let mut keep = be.upload(&vec![MARKER; len])?;
        be.dropout_mask(&mut keep, len, p, seed, offset)?;
        out.push(CheckRow::new(
            format!("dropout mask p={p} offset={offset} len={len} (mismatches)"),
            bit_mismatches(&be.download(&keep)?, &want),
            0.0,
        ));
    }
    Ok(out)
}

/// `(rows, vocab)`: the float4 path (384, 32000, 49152) and the scalar one (1001).
const XENT_SHAPES: [(usize, usize); 5] =
    [(1, 384), (17, 32_000), (300, 384), (7, 1001), (3, 49_152)];

/// Targets with the edges of the vocabulary and every fifth row (from row 3) ignored.
fn xent_targets(rows: usize, vocab: usize, seed: u64) -> Vec<i32> {
    (0..rows)
        .map(|r| match r {
            0 => vocab as i32 - 1,
            1 => 0,
            _ if r % 5 == 3 => -100,
            _ => (splitmix64(seed ^ r as u64) % vocab as u64) as i32,
        })
        .collect()
}

fn cross_entropy_rows(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    for (i, &(rows, vocab)) in XENT_SHAPES.iter().enumerate() {
        let seed = 400 + 10 * i as u64;
        let targets = xent_targets(rows, vocab, seed);
        let mut logits = test_values(seed + 1, rows * vocab, 8.0);
        // Row 0 masks its first logits (a whole float4, a thread's only one at V = 384) with
        // −inf; row 2 is confident (its target far above the rest: a loss near 0).
        logits[..4].fill(f32::NEG_INFINITY);
        if let Some(&t) = targets.get(2) {
            logits[2 * vocab + t as usize] += 30.0;
        }
        let scale = mean_scale::<f32>(&targets);
        let mut want = logits.clone();
        let mut want_loss = vec![0.0f32; rows];
        cross_entropy_fused(&mut want, &mut want_loss, &targets, vocab, scale);

        let mut z = be.upload(&logits)?;
        let mut losses = be.upload(&vec![MARKER; rows])?;
        be.cross_entropy_fused(&mut z, &mut losses, &targets, vocab, scale)?;
        let (got, got_loss) = (be.download(&z)?, be.download(&losses)?);
        let ignored_nonzero = targets.iter().enumerate().any(|(r, &t)| {
            t < 0
                && (got_loss[r].to_bits() != 0
                    || got[r * vocab..(r + 1) * vocab]
                        .iter()
                        .any(|v| v.to_bits() != 0))
        });
        let grad_err = if ignored_nonzero {
            f64::INFINITY
        } else {
            max_rel_err(&got, &want)
        };
        let shape = format!("[{rows}, {vocab}]");
        out.push(CheckRow::new(
            format!("fused xent loss {shape}"),
            max_rel_err(&got_loss, &want_loss),
            F32_REORDER,
        ));
        out.push(CheckRow::new(
            format!("fused xent dlogits {shape} (−100 rows exactly 0)"),
            grad_err,
            F32_REORDER,
        ));
    }
    Ok(out)
}

/// Zero sizes return `Ok` (no launch), short buffers and bad targets an error; the error measure
/// is the number of launchers that behaved otherwise.
fn guard_rows(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let dev = &*be.dev;
    let mut small = be.upload(&[MARKER; 4])?;
    let other = be.upload(&[1.0; 4])?;
    let bits = dev.upload(&[0u16; 4])?;
    let mut wrong = 0;
    let mut expect = |ok: bool, r: Result<()>| {
        if r.is_ok() != ok {
            wrong += 1;
        }
    };
    expect(
        true,
        rmsnorm::rmsnorm_backward(dev, &mut small, &other, &other, &other, 0, 4, 1e-5),
    );
    expect(
        false,
        rmsnorm::rmsnorm_backward(dev, &mut small, &other, &other, &other, 2, 4, 1e-5),
    );
    let mut small2 = be.upload(&[MARKER; 4])?;
    expect(
        true,
        ops::swiglu_backward(dev, &mut small, &mut small2, &other, &other, &other, 0),
    );
    expect(
        false,
        ops::swiglu_backward(dev, &mut small, &mut small2, &other, &other, &other, 5),
    );
    expect(true, ops::bf16_to_f32(dev, &mut small, &bits, 0));
    expect(false, ops::bf16_to_f32(dev, &mut small, &bits, 5));
    expect(true, dropout::dropout_mask(dev, &mut small, 0, 0.1, 1, 0));
    expect(false, dropout::dropout_mask(dev, &mut small, 5, 0.1, 1, 0));
    expect(false, dropout::dropout_mask(dev, &mut small, 4, 1.0, 1, 0));
    expect(
        true,
        cross_entropy::cross_entropy_fused(dev, &mut small, &mut small2, &[], 4, 1.0),
    );
    expect(
        false,
        cross_entropy::cross_entropy_fused(dev, &mut small, &mut small2, &[0, 1], 4, 1.0),
    );
    expect(
        false,
        cross_entropy::cross_entropy_fused(dev, &mut small, &mut small2, &[4], 4, 1.0),
    );
    // Nothing above may have written the buffers.
    let untouched = be.download(&small)?.iter().all(|&v| v == MARKER)
        && be.download(&small2)?.iter().all(|&v| v == MARKER);
    Ok(vec![CheckRow::new(
        "ops guards: zero sizes Ok, short buffers and bad targets Err, nothing written",
        (wrong + usize::from(!untouched)) as f64,
        0.0,
    )])
}

#[cfg(test)]
mod tests {
    //! The bound [`F32_REORDER`] against the device's summation order, replayed on the CPU
    //! (f32 with libm's `exp`: the reordering alone, without fast math).
    use super::*;

    /// `Σ terms` as a block of `threads` sums it: thread `t` adds groups `t, t + threads, …` of
    /// `group` consecutive terms (one float4 when `group` = 4) sequentially, then a pairwise
    /// tree over the threads (warp shuffles and the warp-partials pass).
    fn device_sum(terms: &[f32], threads: usize, group: usize) -> f32 {
        let mut partial = vec![0.0f32; threads];
        for (g, chunk) in terms.chunks(group).enumerate() {
            partial[g % threads] += chunk.iter().sum::<f32>();
        }
        while partial.len() > 1 {
            let half = partial.len() / 2;
            for i in 0..half {
                partial[i] += partial[i + half];
            }
            partial.truncate(half);
        }
        partial[0]
    }

    #[test]
    fn reordered_f32_sums_stay_within_the_bound() {
        let eps = 1e-5f32;
        for &(rows, dim) in &RMS_SHAPES {
            let rows = rows.min(4);
            let n = rows * dim;
            let x = test_values(1, n, 2.0);
            let dy = test_values(2, n, 1.0);
            let w: Vec<f32> = test_values(3, dim, 0.5).iter().map(|v| 1.0 + v).collect();
            let mut want = vec![0.0f32; n];
            rmsnorm_backward(&mut want, &dy, &x, &w, rows, dim, eps);
            let group = if dim % 4 == 0 { 4 } else { 1 };
            let mut got = vec![0.0f32; n];
            for r in 0..rows {
                let (xr, gr) = (&x[r * dim..][..dim], &dy[r * dim..][..dim]);
                let sq: Vec<f32> = xr.iter().map(|v| v * v).collect();
                let wgx: Vec<f32> = (0..dim).map(|j| w[j] * gr[j] * xr[j]).collect();
                let inv = 1.0 / (device_sum(&sq, 256, group) / dim as f32 + eps).sqrt();
                let c = device_sum(&wgx, 256, group) * inv * inv * inv / dim as f32;
                for j in 0..dim {
                    got[r * dim + j] = w[j] * gr[j] * inv - xr[j] * c;
                }
            }
            let err = max_rel_err(&got, &want);
            eprintln!("rmsnorm [{rows}, {dim}]: {err:e}");
            assert!(err < F32_REORDER / 4.0, "rmsnorm [{rows}, {dim}]: {err:e}");
        }
        for &(rows, vocab) in &XENT_SHAPES {
            let rows = rows.min(4);
            let targets = xent_targets(rows, vocab, 9);
            let logits = test_values(10, rows * vocab, 8.0);
            let scale = mean_scale::<f32>(&targets);
            let mut want = logits.clone();
            let mut want_loss = vec![0.0f32; rows];
            cross_entropy_fused(&mut want, &mut want_loss, &targets, vocab, scale);
            let group = if vocab % 4 == 0 { 4 } else { 1 };
            let (mut got, mut got_loss) = (vec![0.0f32; rows * vocab], vec![0.0f32; rows]);
            for (r, &t) in targets.iter().enumerate() {
                if t < 0 {
                    continue;
                }
                let z = &logits[r * vocab..][..vocab];
                let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
                let s = device_sum(&e, 512, group);
                got_loss[r] = (m - z[t as usize]) + s.ln();
                let f = scale / s;
                for (j, g) in got[r * vocab..][..vocab].iter_mut().enumerate() {
                    *g = e[j] * f - if j == t as usize { scale } else { 0.0 };
                }
            }
            let err = max_rel_err(&got, &want).max(max_rel_err(&got_loss, &want_loss));
            eprintln!("xent [{rows}, {vocab}]: {err:e}");
            assert!(err < F32_REORDER / 4.0, "xent [{rows}, {vocab}]: {err:e}");
        }
    }
}
