//! Check of the device 8-bit optimizer (`kernels/adamw8.cu`, `backend/cuda/adamw8.rs`,
//! `--optim paged_adamw_8bit`) against its host specification: `CpuBackend::adamw_step` with
//! `OptimKind::PagedAdamW8bit`, i.e. the clip then [`crate::train::optim8::step`] per tensor
//! (bitsandbytes' `kOptimizerStatic8bit2StateBlockwise` rule, reproduced bit for bit from a port
//! of bnb's kernel by `tests/optim8.rs`).
//!
//! Tensors of 1000 values (under min_8bit_size: f32 moments, bnb's 32-bit rule), 4096 (whole
//! blocks), 5000 (a partial last block), 4097 (a last block of one value, 255 padded positions in
//! its absmax; zero gradients at the first step, so every block divides 0/0 and stores the
//! m-code 255), 4100 with gradients of 1e-20 (`v = (1−β2)·g²` is subnormal, so is `m/absmax`
//! for most values: a flush-to-zero anywhere shows), and 65 537 (33 chunks, the last one value).
//! Three steps at a decaying learning rate through the `TrainBackend` methods, both sides from
//! the same state (fresh, or a CPU-made one with a different step count per tensor).
//!
//! Bounds:
//! - Without clipping, **0**: the norm only gates the update; all scalars are computed by the
//!   spec's code on the host; the kernel performs the spec's f32 operations in its order with
//!   IEEE rounding, IEEE comparisons and no flush-to-zero; absmax is a maximum of bit patterns.
//!   So every code is identical (no tie can flip: the quotient `m/absmax` compared with the
//!   midpoints is the same f32 on both sides), and p, absmax and the f32 moments are
//!   bit-identical. The error is the number of differing codes plus the largest per-tensor
//!   `max_rel_err` over p, absmax and f32 moments.
//! - Norm: as the 32-bit check (the same kernels): 2 f32 ulps, 2.4e-7 relative.
//! - With clipping (one step from a resumed state, so a difference cannot feed back): the
//!   coefficient may differ from the host's by ≤ 3 ulps (≈ 3.6e-7 relative; usually it is
//!   identical); m ∝ g·coef and v ∝ g² move by ≤ ~7e-7 relative plus a rounding or two, absmax
//!   with them, p by an lr-sized fraction of that: p, absmax and f32 moments within 2e-6 of
//!   their largest value. A code can then differ by one where `m/absmax` lies within those ulps
//!   of a midpoint (or of the sign fix's zero): the code row's error is the largest code
//!   distance (0 and 255 are neighbours through the u8 wrap), bound 1.
//! - A NaN gradient: the norm is NaN and p, codes, absmax, moments and step counts are unchanged
//!   (error: the number of changed values); host → device → host of 8-bit states (including the
//!   0/255 codes of all-zero blocks and a 32-bit state converted on upload) is exact.

use super::adamw::{download_all, step_both, upload_all, BothSides};
use super::{max_rel_err, rows_or_failure, test_values, CheckRow};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::runtime::DevBuf;
use crate::backend::TrainBackend;
use crate::error::{Error, Result};
use crate::train::optim8::for_kind;
use crate::train::{AdamParamState, AdamW, OptimKind};

const SIZES: [usize; 6] = [1000, 4096, 5000, 4097, 4100, 65_537];
/// Index of the tensor with zero gradients at the first step, and of the 1e-20 one.
const ZERO_FIRST: usize = 3;
const TINY: usize = 4;
const NORM_BOUND: f64 = 2.4e-7;
const CLIPPED_BOUND: f64 = 2e-6;

fn params() -> Vec<Vec<f32>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(t, &n)| test_values(0xA810 + t as u64, n, 1.0))
        .collect()
}

/// Gradients of step `step`: ±0.01 in blocks of varying scale (codes spread over the maps;
/// global norm ≈ 1.4, so clipping to 0.3 is active), the TINY tensor ±1e-20, the ZERO_FIRST one
/// zero at step 0.
fn grads(step: u64) -> Vec<Vec<f32>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            if t == ZERO_FIRST && step == 0 {
                return vec![0.0; n];
            }
            let amp = if t == TINY { 1e-20 } else { 0.01 };
            let mut g = test_values(0xA8A0 + 16 * step + t as u64, n, amp);
            for (i, x) in g.iter_mut().enumerate() {
                // 10^0 .. 10^-3 by block of 256: some blocks' values are far below others'.
                *x *= [1.0, 0.1, 0.01, 0.001][(i / 256) % 4];
            }
            g
        })
        .collect()
}

/// Per-tensor states of a CPU run of `steps` steps from fresh (tensor t skips its first
/// `t % 3` steps, so the step counts differ), with the parameters it ends with.
fn resumed(hyper: &AdamW, steps: u64) -> Result<(Vec<Vec<f32>>, Vec<AdamParamState>)> {
    let cpu = CpuBackend::new();
    let mut p = params();
    let mut states: Vec<AdamParamState> = Vec::new();
    for (t, &n) in SIZES.iter().enumerate() {
        let mut st = cpu.adamw_init(&[n], None, OptimKind::PagedAdamW8bit)?;
        for k in (t as u64 % 3)..steps {
            let mut g = [grads(100 + k)[t].clone()];
            let mut pp = vec![std::mem::take(&mut p[t])];
            {
                let mut pr: Vec<&mut Vec<f32>> = pp.iter_mut().collect();
                let mut gr: Vec<&mut Vec<f32>> = g.iter_mut().collect();
                cpu.adamw_step(&mut st, &mut pr, &mut gr, hyper, hyper.lr, 0.0)?;
            }
            p[t] = pp.pop().expect("one tensor");
        }
        states.push(st.states.pop().expect("one tensor"));
    }
    Ok((p, states))
}

/// Differences between device (`g*`) and host (`w*`) results: `(largest per-tensor max_rel_err
/// over p, absmax and f32 moments, number of differing codes, largest code distance)`; ∞ when
/// a step count or a state's form differs.
fn diff(
    gp: &[Vec<f32>],
    gs: &[AdamParamState],
    wp: &[Vec<f32>],
    ws: &[AdamParamState],
) -> (f64, usize, u32) {
    let (mut err, mut count, mut far) = (0f64, 0usize, 0u32);
    for t in 0..wp.len() {
        err = err.max(max_rel_err(&gp[t], &wp[t]));
        if gs[t].step != ws[t].step {
            return (f64::INFINITY, 0, 0);
        }
        match (&gs[t].q8, &ws[t].q8) {
            (Some(g), Some(w)) => {
                err = err
                    .max(max_rel_err(&g.m_absmax, &w.m_absmax))
                    .max(max_rel_err(&g.v_absmax, &w.v_absmax));
                for (a, b) in g
                    .m_codes
                    .iter()
                    .zip(&w.m_codes)
                    .chain(g.v_codes.iter().zip(&w.v_codes))
                {
                    if a != b {
                        count += 1;
                        let d = a.abs_diff(*b) as u32;
                        far = far.max(d.min(256 - d));
                    }
                }
            }
            (None, None) => {
                err = err
                    .max(max_rel_err(&gs[t].m, &ws[t].m))
                    .max(max_rel_err(&gs[t].v, &ws[t].v));
            }
            _ => return (f64::INFINITY, 0, 0),
        }
    }
    (err, count, far)
}

struct Case {
    weight_decay: f64,
    max_norm: f32,
    resumed: bool,
    steps: u64,
}

fn run_case(be: &CudaBackend, c: &Case) -> Result<Vec<CheckRow>> {
    let cpu = CpuBackend::new();
    let hyper = AdamW {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: c.weight_decay,
    };
    let kind = OptimKind::PagedAdamW8bit;
    let (mut hp, init) = if c.resumed {
        resumed(&hyper, 3)?
    } else {
        (params(), Vec::new())
    };
    let host = c.resumed.then_some(init);
    let mut hs = cpu.adamw_init(&SIZES, host.clone(), kind)?;
    let mut ds = be.adamw_init(&SIZES, host, kind)?;
    let mut dp = upload_all(be, &hp)?;
    let mut norm_err = 0f64;
    for step in 0..c.steps {
        let lr = hyper.lr * (1.0 - 0.25 * step as f64);
        let mut hg = grads(step);
        let mut dg = upload_all(be, &hg)?;
        let sides = BothSides {
            cpu: &cpu,
            hs: &mut hs,
            hp: &mut hp,
            be,
            ds: &mut ds,
            dp: &mut dp,
        };
        let e = step_both(sides, &mut hg, &mut dg, &hyper, lr, c.max_norm)?;
        norm_err = norm_err.max(e);
    }
    let gp = download_all(be, &dp)?;
    let gs = be.adamw_download(&ds)?;
    let (err, count, far) = diff(&gp, &gs, &hp, &hs.states);
    let name = format!(
        "adamw8 {} wd={} clip={}{} sizes {:?} ×{} step{}",
        if ds.paged() { "paged" } else { "device memory" },
        c.weight_decay,
        c.max_norm,
        if c.resumed { " resumed" } else { "" },
        SIZES,
        c.steps,
        if c.steps == 1 { "" } else { "s" }
    );
    let mut rows = vec![CheckRow::new(format!("{name}: norm"), norm_err, NORM_BOUND)];
    if c.max_norm > 0.0 {
        rows.push(CheckRow::new(
            format!("{name}: p, absmax, f32 m/v (clipped)"),
            err,
            CLIPPED_BOUND,
        ));
        rows.push(CheckRow::new(
            format!("{name}: largest code distance ({count} codes differ)"),
            far as f64,
            1.0,
        ));
    } else {
        rows.push(CheckRow::new(
            format!("{name}: p, codes, absmax, f32 m/v (bit-exact; {count} codes differ)"),
            err + count as f64,
            0.0,
        ));
    }
    Ok(rows)
}

/// Bit patterns of everything in the states (for "unchanged" comparisons).
fn fingerprint(ps: &[Vec<f32>], ss: &[AdamParamState]) -> Vec<u32> {
    let mut out: Vec<u32> = ps.iter().flatten().map(|x| x.to_bits()).collect();
    for s in ss {
        out.push(s.step as u32);
        out.extend(s.m.iter().chain(&s.v).map(|x| x.to_bits()));
        if let Some(q) = &s.q8 {
            out.extend(q.m_codes.iter().chain(&q.v_codes).map(|&c| c as u32));
            out.extend(q.m_absmax.iter().chain(&q.v_absmax).map(|x| x.to_bits()));
        }
    }
    out
}

/// A NaN gradient after one normal step: the norm is NaN and nothing changes.
fn nan_gradient(be: &CudaBackend) -> Result<CheckRow> {
    let hyper = AdamW {
        lr: 2e-4,
        weight_decay: 0.001,
        ..AdamW::default()
    };
    let mut ds = be.adamw_init(&SIZES, None, OptimKind::PagedAdamW8bit)?;
    let mut dp = upload_all(be, &params())?;
    for bad in [false, true] {
        let mut g = grads(1);
        if bad {
            g[2][1234] = f32::NAN;
        }
        let mut dg = upload_all(be, &g)?;
        let before = fingerprint(&download_all(be, &dp)?, &be.adamw_download(&ds)?);
        let norm = {
            let mut p: Vec<&mut DevBuf<f32>> = dp.iter_mut().collect();
            let mut g: Vec<&mut DevBuf<f32>> = dg.iter_mut().collect();
            be.adamw_step(&mut ds, &mut p, &mut g, &hyper, hyper.lr, 0.3)?
        };
        if !bad {
            continue;
        }
        let after = fingerprint(&download_all(be, &dp)?, &be.adamw_download(&ds)?);
        let changed = before.len().abs_diff(after.len())
            + before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let err = if norm.is_nan() {
            changed as f64
        } else {
            f64::INFINITY
        };
        return Ok(CheckRow::new(
            format!("adamw8 NaN gradient: norm {norm}, changed p/codes/absmax/steps"),
            err,
            0.0,
        ));
    }
    unreachable!("the second pass returns")
}

/// Host states → device → host, paged and not: bit for bit (a CPU-made state with all-zero
/// blocks' 0/255 codes, hand-set extreme codes, and a 32-bit state converted on upload).
fn round_trip(be: &CudaBackend) -> Result<CheckRow> {
    let hyper = AdamW::default();
    let (_, mut states) = resumed(&hyper, 2)?;
    if let Some(q) = states[1].q8.as_mut() {
        q.m_codes[0] = 0;
        q.m_codes[4095] = 255;
        q.v_absmax[3] = f32::from_bits(1); // a subnormal absmax survives the trip
    }
    let mut f32_state = AdamParamState::new(SIZES[2]);
    f32_state.step = 4;
    f32_state.m = test_values(0xA8F0, SIZES[2], 1e-3);
    f32_state.v = test_values(0xA8F1, SIZES[2], 1e-2)
        .iter()
        .map(|x| x * x)
        .collect();
    states[2] = f32_state;
    let want: Vec<AdamParamState> = states
        .iter()
        .cloned()
        .map(|s| for_kind(s, OptimKind::PagedAdamW8bit))
        .collect();
    let mut n = 0;
    for paged in [true, false] {
        // `adamw` is not paged; the 8-bit optimizer takes `paged` from the kind, so the
        // unpaged layout is exercised through DeviceAdamW8 directly.
        let back = if paged {
            let ds = be.adamw_init(&SIZES, Some(states.clone()), OptimKind::PagedAdamW8bit)?;
            be.adamw_download(&ds)?
        } else {
            let mut ds = crate::backend::cuda::adamw8::DeviceAdamW8::new(&be.dev, &SIZES, false)?;
            ds.upload_state(&be.dev, &want)?;
            ds.download_state(&be.dev)?
        };
        let (g, w) = (fingerprint(&[], &back), fingerprint(&[], &want));
        n += g.len().abs_diff(w.len()) + g.iter().zip(&w).filter(|(a, b)| a != b).count();
        n += usize::from(
            back.iter()
                .map(|s| s.q8.is_some())
                .ne(want.iter().map(|s| s.q8.is_some())),
        );
    }
    Ok(CheckRow::new(
        format!("adamw8 state upload → download, paged and not, sizes {SIZES:?}: changed values"),
        n as f64,
        0.0,
    ))
}

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let cases = [
        Case {
            weight_decay: 0.001,
            max_norm: 0.0,
            resumed: false,
            steps: 3,
        },
        Case {
            weight_decay: 0.0,
            max_norm: 0.0,
            resumed: true,
            steps: 3,
        },
        Case {
            weight_decay: 0.01,
            max_norm: 0.3,
            resumed: true,
            steps: 1,
        },
    ];
    let mut rows = Vec::new();
    for c in &cases {
        let what = format!("adamw8 wd={} clip={}", c.weight_decay, c.max_norm);
        rows.extend(rows_or_failure(&what, || run_case(be, c)));
    }
    rows.extend(rows_or_failure("adamw8 NaN gradient", || {
        Ok(vec![nan_gradient(be)?])
    }));
    rows.extend(rows_or_failure("adamw8 state round trip", || {
        Ok(vec![round_trip(be)?])
    }));
    if rows.is_empty() {
        return Err(Error::Backend("adamw8 check produced no rows".into()));
    }
    Ok(rows)
}
