//! Check of the device optimizer (`kernels/adamw.cu`, `backend/cuda/adamw.rs`) against its host
//! specification: `CpuBackend::adamw_step`, i.e. [`crate::train::clip_grad_norm`] (or
//! [`crate::train::grad_norm`] without clipping) then [`crate::train::AdamW::update`] per tensor.
//!
//! Tensors of 1, 7, 4096 and 65 537 values (the 7-value tensor has gradients of 1e-20, so its
//! `v = (1−β2)·g²` is subnormal: a flush-to-zero anywhere in the update shows up as an error),
//! three steps at a decaying learning rate, through the `TrainBackend` methods. Both sides start
//! from the same state (fresh, or a resumed one with a different step count per tensor) and see
//! the same parameters and gradients; the gradient buffers are rewritten in place for the second
//! step (cached device table) and replaced for the third (rebuilt table).
//!
//! Bounds:
//! - Norm (`|got − want| / want`, max over the steps): the device sums each tensor's squares in
//!   f64 in another order than the host; the difference, ≤ n·2⁻⁵³ relative (≈ 7e-12 here), can
//!   move a per-tensor norm rounded to f32 by at most 1 ulp, which moves the total by at most
//!   1 ulp before its own rounding: at most 2 ulps, 2⁻²² ≈ 2.4e-7 relative.
//! - p, m, v without clipping: **0**. The norm only gates the update (finite on both sides), all
//!   scalars are computed by the same host code, and the kernel performs the host's f32
//!   operations in its order with IEEE rounding and no flush-to-zero, so every value is
//!   bit-identical. The error is the largest per-tensor `max_rel_err` (per-tensor scale, so the
//!   subnormal tensor counts), over p, m and v.
//! - p, m, v with clipping: the coefficient `max_norm / (total + 1e-6)` inherits the norm's ≤ 2
//!   ulps plus ≤ 1 ulp of its own rounding (≤ 3·2⁻²⁴·2 ≈ 3.6e-7 relative; it is usually exactly
//!   the host's, and then the error is 0). g·coef carries that into m (≈ 3.6e-7), v ∝ g²
//!   (≈ 7.2e-7), and each rounding downstream may then land on the neighbouring f32 (2⁻²⁴ ≈
//!   6e-8 each, a few per step over three steps); the update of p is lr-sized (2e-4), so p moves
//!   by at most an ulp per step. Bound 2e-6, measured against each quantity's largest value over
//!   all tensors (`max_rel_err` of the concatenation: a subnormal v has an absolute resolution of
//!   2⁻¹⁴⁹, so relative to itself a 1-ulp coefficient change could show as a percent).
//! - A NaN gradient: the norm must be NaN and p, m, v and the step counts unchanged bit for bit
//!   (error: the number of changed values); the state upload → download round trip is exact.

use super::{max_rel_err, rows_or_failure, test_values, CheckRow};
use crate::backend::cpu::CpuBackend;
use crate::backend::cpu::CpuOptState;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::runtime::DevBuf;
use crate::backend::cuda::train::DeviceOptState;
use crate::backend::TrainBackend;
use crate::error::{Error, Result};
use crate::train::{AdamParamState, AdamW, OptimKind};

const SIZES: [usize; 4] = [1, 7, 4096, 65_537];
/// Step counts of the resumed state, per tensor.
const RESUMED_STEPS: [u64; 4] = [3, 0, 10, 1000];
/// 2 f32 ulps (see the module docs).
const NORM_BOUND: f64 = 2.4e-7;
const CLIPPED_BOUND: f64 = 2e-6;

struct Case {
    paged: bool,
    weight_decay: f64,
    max_norm: f32,
    resumed: bool,
}

fn kind(paged: bool) -> OptimKind {
    if paged {
        OptimKind::PagedAdamW32bit
    } else {
        OptimKind::AdamW
    }
}

/// The gradients of step `step`: ±0.01 (global norm ≈ 1.5, so clipping to 0.3 is active),
/// the 7-value tensor ±1e-20.
fn grads(step: u64) -> Vec<Vec<f32>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            let amp = if n == 7 { 1e-20 } else { 0.01 };
            test_values(0xADA0 + 16 * step + t as u64, n, amp)
        })
        .collect()
}

fn initial_states(resumed: bool) -> Vec<AdamParamState> {
    SIZES
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            let mut s = AdamParamState::new(n);
            if resumed && RESUMED_STEPS[t] > 0 {
                s.step = RESUMED_STEPS[t];
                s.m = test_values(0xAD30 + t as u64, n, 1e-3);
                s.v = test_values(0xAD40 + t as u64, n, 1e-2)
                    .iter()
                    .map(|x| x * x)
                    .collect();
            }
            s
        })
        .collect()
}

fn params() -> Vec<Vec<f32>> {
    SIZES
        .iter()
        .enumerate()
        .map(|(t, &n)| test_values(0xAD10 + t as u64, n, 1.0))
        .collect()
}

pub(super) fn upload_all(be: &CudaBackend, xs: &[Vec<f32>]) -> Result<Vec<DevBuf<f32>>> {
    xs.iter().map(|x| be.dev.upload(x)).collect()
}

pub(super) fn download_all(be: &CudaBackend, xs: &[DevBuf<f32>]) -> Result<Vec<Vec<f32>>> {
    xs.iter().map(|x| be.dev.download(x)).collect()
}

/// The host's and the device's state, parameters and gradients of a check.
pub(super) struct BothSides<'a> {
    pub cpu: &'a CpuBackend,
    pub hs: &'a mut CpuOptState,
    pub hp: &'a mut [Vec<f32>],
    pub be: &'a CudaBackend,
    pub ds: &'a mut DeviceOptState,
    pub dp: &'a mut [DevBuf<f32>],
}

/// One `adamw_step` on the host spec (gradients `hg`) and on the device (the same gradients,
/// `dg`): the relative error of the device's gradient norm (∞ when either is not finite or the
/// host's is 0).
pub(super) fn step_both(
    s: BothSides<'_>,
    hg: &mut [Vec<f32>],
    dg: &mut [DevBuf<f32>],
    hyper: &AdamW,
    lr: f64,
    max_norm: f32,
) -> Result<f64> {
    let want = {
        let mut p: Vec<&mut Vec<f32>> = s.hp.iter_mut().collect();
        let mut g: Vec<&mut Vec<f32>> = hg.iter_mut().collect();
        s.cpu
            .adamw_step(s.hs, &mut p, &mut g, hyper, lr, max_norm)?
    };
    let got = {
        let mut p: Vec<&mut DevBuf<f32>> = s.dp.iter_mut().collect();
        let mut g: Vec<&mut DevBuf<f32>> = dg.iter_mut().collect();
        s.be.adamw_step(s.ds, &mut p, &mut g, hyper, lr, max_norm)?
    };
    Ok(if got.is_finite() && want.is_finite() && want > 0.0 {
        ((got as f64 - want as f64) / want as f64).abs()
    } else {
        f64::INFINITY
    })
}

/// Largest per-tensor `max_rel_err` over p, m and v (∞ when a step count differs).
fn per_tensor_err(
    gp: &[Vec<f32>],
    gs: &[AdamParamState],
    wp: &[Vec<f32>],
    ws: &[AdamParamState],
) -> f64 {
    if gs.iter().zip(ws).any(|(g, w)| g.step != w.step) {
        return f64::INFINITY;
    }
    let mut err = 0f64;
    for t in 0..wp.len() {
        err = err
            .max(max_rel_err(&gp[t], &wp[t]))
            .max(max_rel_err(&gs[t].m, &ws[t].m))
            .max(max_rel_err(&gs[t].v, &ws[t].v));
    }
    err
}

/// Largest `max_rel_err` of the concatenated p, m and v (∞ when a step count differs).
fn global_err(
    gp: &[Vec<f32>],
    gs: &[AdamParamState],
    wp: &[Vec<f32>],
    ws: &[AdamParamState],
) -> f64 {
    if gs.iter().zip(ws).any(|(g, w)| g.step != w.step) {
        return f64::INFINITY;
    }
    let m = |s: &[AdamParamState]| -> Vec<f32> { s.iter().flat_map(|s| s.m.clone()).collect() };
    let v = |s: &[AdamParamState]| -> Vec<f32> { s.iter().flat_map(|s| s.v.clone()).collect() };
    max_rel_err(&gp.concat(), &wp.concat())
        .max(max_rel_err(&m(gs), &m(ws)))
        .max(max_rel_err(&v(gs), &v(ws)))
}

/// Number of values (p, m, v) and step counts whose bits differ.
fn changed(
    gp: &[Vec<f32>],
    gs: &[AdamParamState],
    wp: &[Vec<f32>],
    ws: &[AdamParamState],
) -> usize {
    let diff = |a: &[f32], b: &[f32]| {
        a.len().abs_diff(b.len())
            + a.iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count()
    };
    let mut n = gp.len().abs_diff(wp.len()) + gs.len().abs_diff(ws.len());
    for (g, w) in gp.iter().zip(wp) {
        n += diff(g, w);
    }
    for (g, w) in gs.iter().zip(ws) {
        n += diff(&g.m, &w.m) + diff(&g.v, &w.v) + usize::from(g.step != w.step);
    }
    n
}

fn paged_name(requested: bool, got: bool) -> &'static str {
    match (requested, got) {
        (true, true) => "paged",
        (true, false) => "paged→device memory (no concurrent managed access)",
        _ => "device memory",
    }
}

/// Three steps on both sides; rows for the norm and for p, m, v.
fn run_case(be: &CudaBackend, c: &Case) -> Result<Vec<CheckRow>> {
    let cpu = CpuBackend::new();
    let hyper = AdamW {
        lr: 2e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: c.weight_decay,
    };
    let init = initial_states(c.resumed);
    let mut hs = cpu.adamw_init(&SIZES, Some(init.clone()), kind(c.paged))?;
    let mut ds = be.adamw_init(&SIZES, Some(init), kind(c.paged))?;
    let mut hp = params();
    let mut dp = upload_all(be, &hp)?;
    let mut dg: Vec<DevBuf<f32>> = Vec::new();
    let mut norm_err = 0f64;
    for step in 0..3u64 {
        let lr = hyper.lr * (1.0 - 0.25 * step as f64);
        let mut hg = grads(step);
        if step == 1 {
            // Same buffers, new values: the device table stays cached.
            for (d, h) in dg.iter_mut().zip(&hg) {
                be.dev
                    .stream
                    .memcpy_htod(h, &mut **d)
                    .map_err(|e| Error::Backend(format!("adamw check: gradient upload: {e}")))?;
            }
        } else {
            dg = upload_all(be, &hg)?;
        }
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
    let name = format!(
        "adamw {} wd={} clip={}{} sizes {:?} ×3 steps",
        paged_name(c.paged, ds.paged()),
        c.weight_decay,
        c.max_norm,
        if c.resumed { " resumed" } else { "" },
        SIZES
    );
    let state_row = if c.max_norm > 0.0 {
        CheckRow::new(
            format!("{name}: p, m, v (clipped)"),
            global_err(&gp, &gs, &hp, &hs),
            CLIPPED_BOUND,
        )
    } else {
        CheckRow::new(
            format!("{name}: p, m, v (bit-exact)"),
            per_tensor_err(&gp, &gs, &hp, &hs),
            0.0,
        )
    };
    Ok(vec![
        CheckRow::new(format!("{name}: norm"), norm_err, NORM_BOUND),
        state_row,
    ])
}

/// A NaN gradient after one normal step: the norm is NaN and nothing changes.
fn nan_gradient(be: &CudaBackend) -> Result<CheckRow> {
    let hyper = AdamW {
        lr: 2e-4,
        weight_decay: 0.001,
        ..AdamW::default()
    };
    let mut ds = be.adamw_init(&SIZES, None, OptimKind::PagedAdamW32bit)?;
    let mut dp = upload_all(be, &params())?;
    let mut dg = upload_all(be, &grads(0))?;
    {
        let mut p: Vec<&mut DevBuf<f32>> = dp.iter_mut().collect();
        let mut g: Vec<&mut DevBuf<f32>> = dg.iter_mut().collect();
        be.adamw_step(&mut ds, &mut p, &mut g, &hyper, hyper.lr, 0.3)?;
    }
    let before_p = download_all(be, &dp)?;
    let before_s = be.adamw_download(&ds)?;
    let mut bad = grads(1);
    bad[2][1234] = f32::NAN;
    let host_norm = crate::train::grad_norm(bad.iter().map(|g| &g[..]));
    let mut dg = upload_all(be, &bad)?;
    let norm = {
        let mut p: Vec<&mut DevBuf<f32>> = dp.iter_mut().collect();
        let mut g: Vec<&mut DevBuf<f32>> = dg.iter_mut().collect();
        be.adamw_step(&mut ds, &mut p, &mut g, &hyper, hyper.lr, 0.3)?
    };
    let after_p = download_all(be, &dp)?;
    let after_s = be.adamw_download(&ds)?;
    let n = changed(&after_p, &after_s, &before_p, &before_s);
    let err = if norm.is_nan() && host_norm.is_nan() {
        n as f64
    } else {
        f64::INFINITY
    };
    Ok(CheckRow::new(
        format!("adamw NaN gradient: norm {norm} (host {host_norm}), changed p/m/v/steps"),
        err,
        0.0,
    ))
}

/// Host states → device → host, paged and not: bit for bit, steps included.
fn round_trip(be: &CudaBackend) -> Result<CheckRow> {
    let mut states = initial_states(true);
    states[1].step = 7;
    states[1].m = vec![-0.0, 1e-45, f32::MIN_POSITIVE, -1.5, 3.0, f32::MAX, 2.0];
    states[1].v = vec![0.0, 1e-40, 1.0, 2.0, 3.0, 4.0, f32::INFINITY];
    let mut n = 0;
    for paged in [true, false] {
        let ds = be.adamw_init(&SIZES, Some(states.clone()), kind(paged))?;
        let back = be.adamw_download(&ds)?;
        n += changed(&[], &back, &[], &states);
    }
    Ok(CheckRow::new(
        format!("adamw state upload → download, paged and not, sizes {SIZES:?}: changed values"),
        n as f64,
        0.0,
    ))
}

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let cases = [
        Case {
            paged: true,
            weight_decay: 0.001,
            max_norm: 0.3,
            resumed: false,
        },
        Case {
            paged: true,
            weight_decay: 0.0,
            max_norm: 0.0,
            resumed: false,
        },
        Case {
            paged: false,
            weight_decay: 0.001,
            max_norm: 0.0,
            resumed: true,
        },
        Case {
            paged: false,
            weight_decay: 0.0,
            max_norm: 0.3,
            resumed: false,
        },
    ];
    // One failing case (a launch error) must not hide the others' rows.
    let mut rows = Vec::new();
    for c in &cases {
        let what = format!(
            "adamw paged={} wd={} clip={}",
            c.paged, c.weight_decay, c.max_norm
        );
        rows.extend(rows_or_failure(&what, || run_case(be, c)));
    }
    rows.extend(rows_or_failure("adamw NaN gradient", || {
        Ok(vec![nan_gradient(be)?])
    }));
    rows.extend(rows_or_failure("adamw state round trip", || {
        Ok(vec![round_trip(be)?])
    }));
    Ok(rows)
}
