//! Check of the backward NF4 product `dx = dy · W` (`kernels/nf4_gemm_dx.cu`, both tile
//! configurations, and the "dequantize to bf16 + cuBLAS" baseline) and of the 16-bit dense
//! `dx` product (cuBLAS, bf16 and f16 weights) against the CPU spec
//! [`crate::backend::cpu::nf4_gemm_dx`], on odd shapes: partial tiles in every dimension, a
//! reduction length that is odd (dy read element by element) or not a multiple of the 32-wide
//! step, quantization blocks crossing W's rows, both scale formats, overwrite and accumulate.
//!
//! Error measure (as `tests/cuda_ops.rs`' `gemm_err` for the forward): per output,
//! `|got − want| / (Σ_n |half(dy[m, n]) · w[n, k]| + |dx₀[m, k]| + 1e-6)` (the previous value
//! counts when accumulating), maximised over the outputs. Bound 2e-5 for every row: the operands
//! are identical to the spec's (bf16 or f16 values; their products are exact in f32), so only the
//! f32 summation differs. Tensor cores add 16-term blocks (truncating, at most about 2^-23 of
//! the running magnitude each) and the kernel then adds N / 16 blocks in sequence plus the
//! accumulate: with N ≤ 333 that is under 30 · 2^-23 ≈ 3.6e-6 of Σ|terms| in the worst case,
//! leaving a 5× margin; a decoding or indexing mistake moves an output by a whole term, ≥ 1e-3
//! of Σ|terms| here.

use super::{test_values, CheckRow};
use crate::backend::cpu::nf4_gemm_dx::{gemm_dx_rounded, nf4_gemm_dx_bf16};
use crate::backend::cpu::{bf16_round, nf4_bf16_weights};
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::dense_half::DeviceHalf;
use crate::backend::cuda::nf4::DeviceNf4;
use crate::backend::cuda::nf4_gemm::Bf16Scratch;
use crate::backend::cuda::nf4_gemm_dx::DxTiles;
use crate::error::Result;
use crate::quant::quantize_nf4;
use cudarc::driver::CudaSlice;

const BOUND: f64 = 2e-5;

/// (m, n, k, blocksize, double quant, accumulate): m from one row to just past four 128-row
/// tiles, n (the reduction) 200 (6¼ steps of 32) or 333 (odd), k 64, 96 (blocks of 64 cross
/// rows; under one 128-wide tile) or 1056 (8¼ tiles of 128, 16½ of 64).
const CASES: [(usize, usize, usize, usize, bool, bool); 8] = [
    (1, 200, 64, 64, true, false),
    (5, 333, 96, 128, false, true),
    (17, 200, 1056, 64, false, false),
    (17, 333, 64, 128, true, true),
    (300, 333, 64, 128, true, true),
    (300, 200, 1056, 64, true, false),
    (513, 200, 96, 64, true, true),
    (513, 333, 1056, 128, false, false),
];

/// The measure described in the module doc; `w` is the rounded `[n, k]` weight, `round` the
/// rounding of `dy` both sides used.
#[allow(clippy::too_many_arguments)]
fn dx_err(
    got: &[f32],
    want: &[f32],
    dx0: Option<&[f32]>,
    dy: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
    round: impl Fn(f32) -> f32,
) -> f64 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let mut mag = vec![0f64; m * k];
    for r in 0..m {
        let row = &mut mag[r * k..(r + 1) * k];
        for o in 0..n {
            let a = (round(dy[r * n + o]) as f64).abs();
            for (s, &v) in row.iter_mut().zip(&w[o * k..(o + 1) * k]) {
                *s += a * (v as f64).abs();
            }
        }
    }
    let mut worst = 0f64;
    for i in 0..m * k {
        let prev = dx0.map_or(0.0, |p| (p[i] as f64).abs());
        let e = (got[i] as f64 - want[i] as f64).abs() / (mag[i] + prev + 1e-6);
        worst = worst.max(e);
    }
    worst
}

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let dev = &be.dev;
    let blas = be.blas();
    let mut scratch = Bf16Scratch::default();
    let mut rows = Vec::new();
    for (c, &(m, n, k, bs, dq, acc)) in CASES.iter().enumerate() {
        let seed = 100 + 10 * c as u64;
        let t = quantize_nf4(&test_values(seed, n * k, 0.7), &[n, k], bs, dq)?;
        let wb = nf4_bf16_weights(&t);
        let dy = test_values(seed + 1, m * n, 1.5);
        let dx0 = test_values(seed + 2, m * k, 1.0);
        let mut want = dx0.clone();
        nf4_gemm_dx_bf16(&mut want, &dy, &t, m, acc);
        let shape = format!("[{m},{n}]·[{n},{k}] bs {bs} dq {dq} acc {acc}");
        let d = DeviceNf4::upload(dev, &t)?;
        if !d.gemm_dx_supported() {
            rows.push(CheckRow::failed(
                format!("nf4 dx fused {shape}"),
                "weight not supported",
            ));
            continue;
        }
        let dyd = dev.upload(&dy)?;
        let prev = acc.then_some(&dx0[..]);
        let mut measure = |what: String, run: &mut dyn FnMut(&mut CudaSlice<f32>) -> Result<()>| {
            let row = dev.upload(&dx0).and_then(|mut dxd| {
                run(&mut dxd)?;
                dev.download(&dxd)
            });
            rows.push(match row {
                Ok(got) => CheckRow::new(
                    what,
                    dx_err(&got, &want, prev, &dy, &wb, (m, n, k), bf16_round),
                    BOUND,
                ),
                Err(e) => CheckRow::failed(what, e),
            });
        };
        for tiles in [DxTiles::Small, DxTiles::Large] {
            measure(format!("nf4 dx fused {tiles} {shape}"), &mut |dxd| {
                d.gemm_dx_tiles(dev, dxd, &dyd, m, acc, tiles)
            });
        }
        measure(format!("nf4 dx dequant+cuBLAS {shape}"), &mut |dxd| {
            scratch.gemm_dx(dev, blas, &d, dxd, &dyd, m, acc)
        });
    }
    rows.extend(dense_rows(be, &mut scratch)?);
    rows.push(refusal_row(be)?);
    Ok(rows)
}

/// The 16-bit dense dx product: a bf16 weight (NF4-decoded values, bf16-exact) and an f16 one
/// (values rounded to f16, which bf16 does not hold), dy rounded to the weight's format.
fn dense_rows(be: &CudaBackend, scratch: &mut Bf16Scratch) -> Result<Vec<CheckRow>> {
    let dev = &be.dev;
    let (m, n, k) = (37, 333, 96);
    let t = quantize_nf4(&test_values(900, n * k, 0.7), &[n, k], 64, true)?;
    let f16_round = |v: f32| half::f16::from_f32(v).to_f32();
    let weights = [
        ("bf16", nf4_bf16_weights(&t)),
        (
            "f16",
            test_values(901, n * k, 0.7)
                .into_iter()
                .map(f16_round)
                .collect(),
        ),
    ];
    let dy = test_values(902, m * n, 1.5);
    let dx0 = test_values(903, m * k, 1.0);
    let dyd = dev.upload(&dy)?;
    let mut rows = Vec::new();
    for (name, w) in weights {
        let is_f16 = name == "f16";
        let round = |v: f32| if is_f16 { f16_round(v) } else { bf16_round(v) };
        for acc in [false, true] {
            let what = format!("dense {name} dx [{m},{n}]·[{n},{k}] acc {acc}");
            let h = match DeviceHalf::lossless(dev, n, k, &w)? {
                Some(h) if h.f16 == is_f16 => h,
                _ => {
                    rows.push(CheckRow::failed(
                        what,
                        format!("weight not stored as {name}"),
                    ));
                    continue;
                }
            };
            let mut want = dx0.clone();
            gemm_dx_rounded(&mut want, &dy, &w, m, n, k, round, acc);
            let mut dxd = dev.upload(&dx0)?;
            let got = h
                .gemm_dx(dev, be.blas(), scratch, &mut dxd, &dyd, m, acc)
                .and_then(|()| dev.download(&dxd));
            rows.push(match got {
                Ok(got) => {
                    let prev = acc.then_some(&dx0[..]);
                    let err = dx_err(&got, &want, prev, &dy, &w, (m, n, k), round);
                    CheckRow::new(what, err, BOUND)
                }
                Err(e) => CheckRow::failed(what, e),
            });
        }
    }
    Ok(rows)
}

/// A weight the fused kernel cannot take (k % 16 ≠ 0) is refused, not miscomputed.
fn refusal_row(be: &CudaBackend) -> Result<CheckRow> {
    let dev = &be.dev;
    let (m, n, k) = (3, 5, 40);
    let t = quantize_nf4(&test_values(950, n * k, 0.5), &[n, k], 64, true)?;
    let d = DeviceNf4::upload(dev, &t)?;
    let (dyd, mut dxd) = (dev.zeros::<f32>(m * n)?, dev.zeros::<f32>(m * k)?);
    let refused = !d.gemm_dx_supported() && d.gemm_dx(dev, &mut dxd, &dyd, m, false).is_err();
    Ok(CheckRow::new(
        format!("nf4 dx refuses [{n},{k}] (k % 16 ≠ 0)"),
        if refused { 0.0 } else { 1.0 },
        0.0,
    ))
}
