//! Check of the CUDA LoRA products (`backend/cuda/lora.rs`: bf16 operands on cuBLAS, f32
//! accumulation) against two references, on four shapes, without and with a dropout mask, every
//! output accumulating into a non-zero initial buffer (as gradient accumulation does):
//!
//! (a) **bf16 emulation**, a tight bound: this file's CPU emulation rounds to bf16 exactly where
//!     the device does ([`bf16_round`], module docs of `backend/cuda/lora.rs`) and sums in f64.
//!     A product of two bf16 values is exact in f32 (8 + 8 significant bits), so the device
//!     differs from the emulation only by its f32 accumulation (order, tensor-core rounding,
//!     split-K reductions) and the `alpha·acc + beta·C` epilogue. Measure, per element:
//!     `(|got − want| − allow)⁺ / (|init| + Σ|terms|)`, maximum over the output, bound
//!     [`TIGHT`] = 1e-5. Sequential f32 summation has the worst case `(K − 1)·2⁻²⁴` (2.4e-4 at
//!     K = 4096) but the partial sums of these random-sign terms stay near `√K` terms, so even
//!     K roundings that all go one way (tensor cores truncate) cost about `√K·2⁻²⁴` of
//!     `Σ|terms|`: 3.8e-6 at K = 4096, and the tensor cores round once per k-step of 8–16
//!     products, not per product. (The CPU's f32 spec sits within 1.9e-7 of the unrounded
//!     emulation on the smaller shapes.) Yet 1e-5 catches operands rounded otherwise than
//!     specified: that shifts each sum by ~2⁻⁹/√K of `Σ|terms|`, ≥ 3e-5 for K ≤ 4096, far more
//!     on the small shapes. `allow` covers the one rounding the emulation cannot pin down:
//!     `h(g)` rounds the device's own f32 `g = s·h(dy)·h(B)`, which may sit on the other side of
//!     a bf16 rounding boundary than the exact value; where `g ± TIGHT·Σ|terms|` rounds to two
//!     bf16 values, their gap times the other operand is allowed on `dA` and `dx` (0 elsewhere).
//!     `y` is emulated from the device's `xa` (the values the device rounds; `xa` itself is
//!     checked separately), the backward from the device's `xa` too, as training chains them.
//!
//! (b) **f32 spec** ([`crate::backend::cpu::backward`]), a bf16-level bound: `‖got − spec‖₂ /
//!     ‖spec − init‖₂` on the increment (what the call added), the worst of the five outputs
//!     against [`SPEC_REL_L2`] = 1e-2. Each bf16 rounding has relative error ≤ 2⁻⁸ (RMS ≈ 1.6e-3),
//!     the errors of independent terms average like the terms, and the longest chain (`dx`, `dA`:
//!     `h(dy)`, `h(B)`, `h(g)`, `h(A)` or `h(x̃)`, plus the forward's `xa` error through `dB`)
//!     gives ≈ 3–4e-3; the host test `bf16_emulation_is_within_the_spec_bound` measures
//!     exactly these cases: 2.1e-3 to 3.5e-3, and 4.3e-3 on the 8 values of `xa` at m = 1.
//!
//! Rows per (shape, mask): one per reference, `max_err` the worst output, every output's figure
//! in the row's name. One [`LoraScratch`] serves all cases, and the shapes do not grow
//! monotonically, so reuse of a larger scratch is exercised too.

use super::{rel_l2, test_values, CheckRow};
use crate::backend::cpu::backward::{lora_backward as spec_backward, lora_forward_add as spec_fwd};
use crate::backend::cpu::bf16_round;
use crate::backend::cpu::dropout::dropout_mask;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::lora::{lora_backward, lora_forward_add, LoraScratch};
use crate::backend::LoraShape;
use crate::error::Result;
use rayon::prelude::*;

/// Bound of the device against the bf16 emulation (module docs, (a)).
pub const TIGHT: f64 = 1e-5;
/// Bound of the device against the f32 spec, relative L2 of the increment (module docs, (b)).
pub const SPEC_REL_L2: f64 = 1e-2;
/// `(rows, in, out, rank)`: a single token, odd sizes, a mid shape, a Llama-like projection.
/// (17, 200, …) follows the larger (300, 576, …) so it runs on an oversized scratch.
pub const SHAPES: [(usize, usize, usize, usize); 4] = [
    (1, 64, 96, 8),
    (300, 576, 192, 8),
    (17, 200, 48, 16),
    (513, 1056, 4096, 16),
];
/// Dropout probability of the masked cases (the mask holds 0 or 1/0.9, not a bf16 value).
const DROP_P: f32 = 0.1;
/// `s = α / r`, e.g. α = 16 at r = 8.
const SCALE: f32 = 2.0;

/// Host inputs of one case.
pub struct Case {
    pub sh: LoraShape,
    pub x: Vec<f32>,
    pub keep: Option<Vec<f32>>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub scale: f32,
    pub dy: Vec<f32>,
    /// Initial contents of the accumulated outputs.
    pub y0: Vec<f32>,
    pub dx0: Vec<f32>,
    pub da0: Vec<f32>,
    pub db0: Vec<f32>,
}

impl Case {
    /// Deterministic inputs: x, dy in [-1, 1); A in ±1/√in (Kaiming-like), B in ±0.3, so `xa`,
    /// the `y` increment and the gradients are O(0.1–100); initial outputs in ±0.5.
    pub fn new(sh: LoraShape, masked: bool, seed: u64) -> Self {
        let LoraShape {
            rows: m,
            in_features: k,
            out_features: n,
            rank: r,
        } = sh;
        let v = |i: u64, len: usize, amp: f32| test_values(seed * 16 + i, len, amp);
        let keep = masked.then(|| {
            let mut keep = vec![0f32; m * k];
            dropout_mask(&mut keep, DROP_P, seed, 0);
            keep
        });
        Case {
            sh,
            x: v(0, m * k, 1.0),
            keep,
            a: v(1, r * k, 1.0 / (k as f32).sqrt()),
            b: v(2, n * r, 0.3),
            scale: SCALE,
            dy: v(3, m * n, 1.0),
            y0: v(4, m * n, 0.5),
            dx0: v(5, m * k, 0.5),
            da0: v(6, r * k, 0.5),
            db0: v(7, n * r, 0.5),
        }
    }

    fn name(&self) -> String {
        let LoraShape {
            rows,
            in_features,
            out_features,
            rank,
        } = self.sh;
        let mask = if self.keep.is_some() {
            format!("mask p={DROP_P}")
        } else {
            "no mask".into()
        };
        format!("lora m={rows} in={in_features} out={out_features} r={rank} {mask}")
    }
}

/// One output as the device should produce it: `want` (f64), the scale of its error bound
/// `mag = |init| + Σ|terms|`, and `allow`, the extra error a tie in `h(g)` may cause.
pub struct Expect {
    pub want: Vec<f64>,
    pub mag: Vec<f64>,
    pub allow: Vec<f64>,
}

/// The five outputs of one case, in the order [`OUTPUTS`] names them.
pub type Outputs<T> = [T; 5];
/// Names of the outputs: forward `xa`, `y`; backward `dB`, `dA`, `dx`.
pub const OUTPUTS: [&str; 5] = ["xa", "y", "dB", "dA", "dx"];

/// `(Σ_k A[i, k]·B[k, j], Σ_k |A[i, k]·B[k, j]|)` in f64 for row-major `A` `[m, kd]`, `B`
/// `[kd, n]` (callers transpose first); rows in parallel.
fn products(a: &[f32], b: &[f32], m: usize, kd: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0f64; m * n];
    let mut mag = vec![0f64; m * n];
    let w = n.max(1);
    c.par_chunks_mut(w)
        .zip(mag.par_chunks_mut(w))
        .enumerate()
        .for_each(|(i, (c, mag))| {
            for (kk, &aik) in a[i * kd..(i + 1) * kd].iter().enumerate() {
                if aik == 0.0 {
                    continue;
                }
                let aik = aik as f64;
                for ((c, mag), &bkj) in c.iter_mut().zip(mag.iter_mut()).zip(&b[kk * n..]) {
                    let t = aik * bkj as f64;
                    *c += t;
                    *mag += t.abs();
                }
            }
        });
    (c, mag)
}

/// `Aᵀ` `[cols, rows]` of row-major `A` `[rows, cols]`.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

/// `h(x ⊙ keep)`: the product rounded to f32 first, as `lora_keep_bf16` does.
fn dropped(c: &Case, h: fn(f32) -> f32) -> Vec<f32> {
    match &c.keep {
        None => c.x.iter().map(|&v| h(v)).collect(),
        Some(keep) => c.x.iter().zip(keep).map(|(&v, &k)| h(v * k)).collect(),
    }
}

fn round(v: &[f32], h: fn(f32) -> f32) -> Vec<f32> {
    v.iter().map(|&v| h(v)).collect()
}

/// `want = init + s·c`, `mag = |init| + |s|·mag` (an accumulated output, no tie allowance).
fn accumulated(init: &[f32], s: f64, (c, mag): (Vec<f64>, Vec<f64>)) -> Expect {
    Expect {
        want: init
            .iter()
            .zip(&c)
            .map(|(&i, &c)| i as f64 + s * c)
            .collect(),
        mag: init
            .iter()
            .zip(&mag)
            .map(|(&i, &m)| (i as f64).abs() + s.abs() * m)
            .collect(),
        allow: vec![0.0; c.len()],
    }
}

/// The device's outputs emulated on the host with rounding `h` (`bf16_round`, or the identity
/// for the f32 spec): `xa` from the inputs, `y` and the backward from `xa_dev`, the `xa` the
/// device wrote (the values it rounds to bf16 for `y` and `dB`).
pub fn emulate(c: &Case, xa_dev: &[f32], h: fn(f32) -> f32) -> Outputs<Expect> {
    let LoraShape {
        rows: m,
        in_features: k,
        out_features: n,
        rank: r,
    } = c.sh;
    let s = c.scale as f64;
    let xt = dropped(c, h);
    let (ah, bh, dyh, xah) = (
        round(&c.a, h),
        round(&c.b, h),
        round(&c.dy, h),
        round(xa_dev, h),
    );
    // Forward: xa = h(x̃)·h(A)ᵀ (written, beta = 0), y += s·h(xa)·h(B)ᵀ.
    let xa = accumulated(
        &vec![0.0; m * r],
        1.0,
        products(&xt, &transpose(&ah, r, k), m, k, r),
    );
    let y = accumulated(&c.y0, s, products(&xah, &transpose(&bh, n, r), m, r, n));
    // dB += s·h(dy)ᵀ·h(xa)
    let dyt = transpose(&dyh, m, n);
    let db = accumulated(&c.db0, s, products(&dyt, &xah, n, m, r));
    // g = s·h(dy)·h(B) in f32 on the device, then h(g); `gap` is the bf16 gap where the
    // device's g may round either way (module docs).
    let (g, gmag) = products(&dyh, &bh, m, n, r);
    let (gh, gap): (Vec<f32>, Vec<f32>) = g
        .iter()
        .zip(&gmag)
        .map(|(&g, &mag)| {
            let (g, eps) = (s * g, TIGHT * s.abs() * mag);
            let gap = h((g + eps) as f32) - h((g - eps) as f32);
            (h(g as f32), gap)
        })
        .unzip();
    // dA += h(g)ᵀ·h(x̃)
    let (ght, gapt) = (transpose(&gh, m, r), transpose(&gap, m, r));
    let mut da = accumulated(&c.da0, 1.0, products(&ght, &xt, r, m, k));
    da.allow = products(&gapt, &xt, r, m, k).1;
    // dx += keep ⊙ (h(g)·h(A))
    let (ga, gamag) = products(&gh, &ah, m, r, k);
    let gap_a = products(&gap, &ah, m, r, k).1;
    let keep = |i: usize| c.keep.as_ref().map_or(1.0, |kp| kp[i] as f64);
    let dx = Expect {
        want: (0..m * k)
            .map(|i| c.dx0[i] as f64 + keep(i) * ga[i])
            .collect(),
        mag: (0..m * k)
            .map(|i| (c.dx0[i] as f64).abs() + keep(i).abs() * gamag[i])
            .collect(),
        allow: (0..m * k).map(|i| keep(i).abs() * gap_a[i]).collect(),
    };
    [xa, y, db, da, dx]
}

/// `max (|got − want| − allow)⁺ / mag` (module docs, (a)); infinite for a non-finite value, a
/// length mismatch, or an error where `mag` is 0.
pub fn tight_err(got: &[f32], e: &Expect) -> f64 {
    if got.len() != e.want.len() || got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let mut worst = 0f64;
    for (i, &g) in got.iter().enumerate() {
        let excess = (g as f64 - e.want[i]).abs() - e.allow[i];
        if excess > 0.0 {
            worst = worst.max(if e.mag[i] > 0.0 {
                excess / e.mag[i]
            } else {
                f64::INFINITY
            });
        }
    }
    worst
}

/// The f32 spec's outputs, chained as training chains them (the backward sees the spec's `xa`).
pub fn spec(c: &Case) -> Outputs<Vec<f32>> {
    let keep = c.keep.as_deref();
    let (mut y, mut xa) = (c.y0.clone(), vec![0f32; c.sh.rows * c.sh.rank]);
    spec_fwd(&mut y, &mut xa, &c.x, keep, &c.a, &c.b, c.scale, c.sh);
    let (mut dx, mut da, mut db) = (c.dx0.clone(), c.da0.clone(), c.db0.clone());
    spec_backward(
        &mut dx, &mut da, &mut db, &c.dy, &c.x, keep, &xa, &c.a, &c.b, c.scale, c.sh,
    );
    [xa, y, db, da, dx]
}

/// `‖got − want‖₂ / ‖want − init‖₂`: the error of what the call added (module docs, (b)).
pub fn increment_rel_l2(got: &[f32], want: &[f32], init: &[f32]) -> f64 {
    if got.len() != want.len() || want.len() != init.len() {
        return f64::INFINITY;
    }
    let inc = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .zip(init)
            .map(|(&v, &i)| (v as f64 - i as f64) as f32)
            .collect()
    };
    rel_l2(&inc(got), &inc(want))
}

/// The initial contents of each output (zeros for `xa`, which is written).
fn inits(c: &Case) -> Outputs<Vec<f32>> {
    let xa0 = vec![0f32; c.sh.rows * c.sh.rank];
    [
        xa0,
        c.y0.clone(),
        c.db0.clone(),
        c.da0.clone(),
        c.dx0.clone(),
    ]
}

/// A row: the worst of `errs` against `bound`, every output's figure in the name.
fn row(name: &str, what: &str, errs: [f64; 5], bound: f64) -> CheckRow {
    let figures: Vec<String> = OUTPUTS
        .iter()
        .zip(errs)
        .map(|(o, e)| format!("{o} {e:.1e}"))
        .collect();
    let worst = errs.iter().fold(
        0f64,
        |a, &e| {
            if e.is_nan() {
                f64::INFINITY
            } else {
                a.max(e)
            }
        },
    );
    CheckRow::new(
        format!("{name}: {what} ({})", figures.join(", ")),
        worst,
        bound,
    )
}

/// Runs forward then backward of one case on the device; returns `[xa, y, dB, dA, dx]`.
fn run_device(be: &CudaBackend, scratch: &mut LoraScratch, c: &Case) -> Result<Outputs<Vec<f32>>> {
    let dev = &be.dev;
    let LoraShape {
        rows: m, rank: r, ..
    } = c.sh;
    let (x, a, b, dy) = (
        dev.upload(&c.x)?,
        dev.upload(&c.a)?,
        dev.upload(&c.b)?,
        dev.upload(&c.dy)?,
    );
    let keep = c.keep.as_ref().map(|k| dev.upload(k)).transpose()?;
    let keep = keep.as_deref();
    let mut y = dev.upload(&c.y0)?;
    let mut xa = dev.zeros::<f32>(m * r)?;
    let (blas, s) = (be.blas(), c.scale);
    lora_forward_add(
        dev, blas, scratch, &mut y, &mut xa, &x, keep, &a, &b, s, c.sh,
    )?;
    let (mut dx, mut da, mut db) = (
        dev.upload(&c.dx0)?,
        dev.upload(&c.da0)?,
        dev.upload(&c.db0)?,
    );
    lora_backward(
        dev, blas, scratch, &mut dx, &mut da, &mut db, &dy, &x, keep, &xa, &a, &b, s, c.sh,
    )?;
    let mut xa = dev.download(&xa)?;
    xa.truncate(m * r);
    Ok([
        xa,
        dev.download(&y)?,
        dev.download(&db)?,
        dev.download(&da)?,
        dev.download(&dx)?,
    ])
}

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    let mut scratch = LoraScratch::default();
    for (i, &(m, in_features, out_features, rank)) in SHAPES.iter().enumerate() {
        for masked in [false, true] {
            let sh = LoraShape {
                rows: m,
                in_features,
                out_features,
                rank,
            };
            let c = Case::new(sh, masked, 1 + 2 * i as u64 + masked as u64);
            let got = run_device(be, &mut scratch, &c)?;
            let want = emulate(&c, &got[0], bf16_round);
            let tight: Vec<f64> = got
                .iter()
                .zip(&want)
                .map(|(g, e)| tight_err(g, e))
                .collect();
            rows.push(row(
                &c.name(),
                "vs bf16 emulation, max err / Σ|terms|",
                tight.try_into().expect("five outputs"),
                TIGHT,
            ));
            let f32_spec = spec(&c);
            let init = inits(&c);
            let l2: Vec<f64> = (0..5)
                .map(|o| increment_rel_l2(&got[o], &f32_spec[o], &init[o]))
                .collect();
            rows.push(row(
                &c.name(),
                "vs f32 spec, rel. L2 of the increment",
                l2.try_into().expect("five outputs"),
                SPEC_REL_L2,
            ));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape((rows, in_features, out_features, rank): (usize, usize, usize, usize)) -> LoraShape {
        LoraShape {
            rows,
            in_features,
            out_features,
            rank,
        }
    }

    /// The emulation's `xa` rounded to f32: what a device matching it exactly would write.
    fn emulated_xa(c: &Case, h: fn(f32) -> f32) -> Vec<f32> {
        let xa0 = vec![0f32; c.sh.rows * c.sh.rank];
        emulate(c, &xa0, h)[0]
            .want
            .iter()
            .map(|&v| v as f32)
            .collect()
    }

    /// Without rounding, the emulation is the f32 spec: its index and transpose bookkeeping is
    /// the spec's, and the spec (f32 sums) lies within the tight bound of the f64 sums.
    #[test]
    fn emulation_without_rounding_is_the_f32_spec() {
        let id: fn(f32) -> f32 = |v| v;
        let mut worst = 0f64;
        for (i, &sh) in SHAPES[..3].iter().enumerate() {
            for masked in [false, true] {
                let c = Case::new(shape(sh), masked, 100 + i as u64);
                // Chained from the spec's xa, as the device check chains from the device's.
                let got = spec(&c);
                let want = emulate(&c, &got[0], id);
                for o in 0..5 {
                    let e = tight_err(&got[o], &want[o]);
                    assert!(e < TIGHT / 10.0, "{} {}: {e:e}", c.name(), OUTPUTS[o]);
                    worst = worst.max(e);
                }
            }
        }
        eprintln!("f32 spec against the unrounded emulation: {worst:.2e} of Σ|terms|");
    }

    /// The bound of (b): a device that matches the bf16 emulation exactly is within
    /// [`SPEC_REL_L2`] of the f32 spec with a wide margin on every check shape, and the rounding
    /// does show (the measure is not trivially 0).
    #[test]
    fn bf16_emulation_is_within_the_spec_bound() {
        let mut worst = 0f64;
        for (i, &sh) in SHAPES.iter().enumerate() {
            for masked in [false, true] {
                let c = Case::new(shape(sh), masked, 1 + 2 * i as u64 + masked as u64);
                let xa = emulated_xa(&c, bf16_round);
                let want = emulate(&c, &xa, bf16_round);
                let got: Vec<Vec<f32>> = want
                    .iter()
                    .map(|e| e.want.iter().map(|&v| v as f32).collect())
                    .collect();
                let (f32_spec, init) = (spec(&c), inits(&c));
                let l2: Vec<f64> = (0..5)
                    .map(|o| increment_rel_l2(&got[o], &f32_spec[o], &init[o]))
                    .collect();
                eprintln!("{}: {:?}", c.name(), l2);
                for (o, &e) in l2.iter().enumerate() {
                    assert!(
                        (1e-4..SPEC_REL_L2 / 2.0).contains(&e),
                        "{} {}: {e:e}",
                        c.name(),
                        OUTPUTS[o]
                    );
                    worst = worst.max(e);
                }
            }
        }
        eprintln!("worst rel. L2 against the f32 spec: {worst:.2e}");
    }

    /// The tight measure: excess over the allowance relative to `mag`, infinite for NaN.
    #[test]
    fn tight_measure() {
        let e = Expect {
            want: vec![1.0, 2.0, 0.0],
            mag: vec![10.0, 10.0, 0.0],
            allow: vec![0.0, 0.5, 0.0],
        };
        assert_eq!(tight_err(&[1.0, 2.0, 0.0], &e), 0.0);
        assert!((tight_err(&[1.1, 2.0, 0.0], &e) - 0.01).abs() < 1e-7);
        assert_eq!(tight_err(&[1.0, 2.4, 0.0], &e), 0.0); // within the allowance
        assert!((tight_err(&[1.0, 3.0, 0.0], &e) - 0.05).abs() < 1e-7);
        assert_eq!(tight_err(&[1.0, 2.0, 1e-3], &e), f64::INFINITY); // error where mag = 0
        assert_eq!(tight_err(&[f32::NAN, 2.0, 0.0], &e), f64::INFINITY);
        assert_eq!(tight_err(&[1.0], &e), f64::INFINITY);
    }

    /// A `g` on a bf16 rounding boundary gets the gap as allowance on `dA` and `dx`, one off it
    /// none: 1 + 2⁻⁸ is the midpoint between the bf16 values 1 and 1 + 2⁻⁷, 1 + 2⁻⁶ a bf16 value.
    #[test]
    fn ties_in_g_are_allowed_for() {
        let sh = shape((1, 1, 1, 1));
        let mut c = Case::new(sh, false, 7);
        (c.x, c.a, c.b, c.dy) = (vec![1.0], vec![1.0], vec![1.0], vec![1.0]);
        // g = s·dy·B with dy = B = 1: the scale (f32, never rounded) places g.
        for (s, gap) in [(1.0 + 1.0 / 256.0, 1.0 / 128.0), (1.0 + 1.0 / 64.0, 0.0)] {
            c.scale = s;
            let out = emulate(&c, &[1.0], bf16_round);
            assert_eq!(out[3].allow, vec![gap], "dA at s = {s}");
            assert_eq!(out[4].allow, vec![gap], "dx at s = {s}");
        }
    }

    #[test]
    fn transpose_and_products() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
        assert_eq!(transpose(&a, 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let b = [1.0, -1.0, 0.0, 2.0, 1.0, 0.5]; // [3, 2]
        let (c, mag) = products(&a, &b, 2, 3, 2);
        assert_eq!(c, vec![4.0, 4.5, 10.0, 9.0]);
        assert_eq!(mag, vec![4.0, 6.5, 10.0, 17.0]);
    }
}
