//! Check of LoRA at decode (`kernels/nf4.cu`'s `lora_xa_{f32,bf16}` +
//! `nf4_gemv_lora_{f32,bf16}_k32`, launcher `backend/cuda/lora_decode.rs`): the CUDA backend's
//! `matmul_lora` on NF4 weights against the CPU's (the spec: the NF4 product, then
//! `lora_forward_add`, all f32), with and without the fused residual add; once with the f32
//! adapter (training's, unfrozen) and once with its bf16 copies (`Backend::lora_inference_copy`,
//! what a frozen adapter carries at generate / chat / eval).
//!
//! Cases: m = 1, 2, 3, 8 input rows (decode is 1); ranks 1, 8, 16, 33 (one lane with two ranks,
//! the others one) and 64; output rows that are not a multiple of the 16 a CTA takes (100, 300,
//! 1000); inputs 96 to 4096 (the k32 GEMV needs in % 32 == 0). A, B and x are scaled so that the
//! adapter term is about as large as the base product (a dropped or doubled term is an O(1)
//! error).
//!
//! Bound (f32 adapter, and bf16 copies against the spec run on A and B pre-rounded to bf16 with
//! `bf16_round`, the same round-to-nearest-even as the device's `f32_to_bf16`, so that both
//! sides multiply identical values): both sides compute in f32 from identical operands (the
//! GEMV's NF4 decoding is bit-exact, checked in tests/cuda_ops.rs; bf16 widens to f32 exactly);
//! they differ only in summation order (lane strides and warp trees against the CPU's
//! sequential sums) over at most 4096 + 64 terms: a relative error of order √k · 2⁻²⁴ ≈ 4e-6
//! typically, k · 2⁻²⁴ ≈ 2.4e-4 if every rounding went the same way, so **max rel err ≤ 1e-4**
//! (any wrong index, rank, scale or widening is O(1)).
//!
//! The bf16 copies against the unrounded f32 spec are a row too: that is the rounding's own
//! effect, not a summation-order one. Each element of A and B moves by at most 2⁻⁹ relative; with
//! independent signs the adapter term moves by about 2⁻⁹·√(2/3) ≈ 1.6e-3 of its typical size (the
//! emulator measures 3e-4 to 1.5e-3 of the output's scale), so **≤ 1e-2**: it shows the
//! accuracy `--adapter` trades for half the bytes and still fails on an O(1) error.

use super::{max_rel_err, rows_or_failure, test_values, CheckRow};
use crate::backend::cpu::{bf16_round, CpuBackend};
use crate::backend::cuda::backend::{CudaBackend, CudaLinear};
use crate::backend::{Backend, HostLinear, LoraTerm};
use crate::error::Result;
use crate::quant::quantize_nf4;

/// `(m, out, in, rank, add)`.
type Case = (usize, usize, usize, usize, bool);

const CASES: [Case; 7] = [
    (1, 256, 512, 64, false),
    (1, 300, 4096, 16, true),
    (1, 1000, 96, 1, false),
    (2, 100, 352, 33, true),
    (3, 100, 128, 8, false),
    (8, 64, 256, 64, true),
    (1, 4096, 4096, 64, true),
];

const BOUND: f64 = 1e-4;
/// bf16 copies against the unrounded f32 adapter (see the module comment).
const BF16_VS_F32_BOUND: f64 = 1e-2;

fn name(&(m, n, k, r, add): &Case) -> String {
    let op = if add { "+=" } else { "=" };
    format!("nf4 lora gemv y[{m},{n}] {op} x·Wᵀ + s·x·Aᵀ·Bᵀ in={k} r={r}")
}

fn device_case(be: &CudaBackend, c: &Case, seed: u64) -> Result<Vec<CheckRow>> {
    let &(m, n, k, rank, add) = c;
    let cpu = CpuBackend::new();
    let w = quantize_nf4(&test_values(seed, n * k, 0.05), &[n, k], 64, true)?;
    let x = test_values(seed + 1, m * k, 1.0);
    let a = test_values(seed + 2, rank * k, 0.05);
    let b = test_values(seed + 3, n * rank, 0.5 / (rank as f32).sqrt());
    let y0 = test_values(seed + 4, m * n, 1.0);
    let scale = 2.0;

    // The spec on the CPU, on f32 A and B and on A and B rounded to bf16.
    let wc = cpu.linear(HostLinear::Nf4(w.clone()))?;
    let spec = |a: &[f32], b: &[f32]| -> Result<Vec<f32>> {
        let (a, b) = (a.to_vec(), b.to_vec());
        let mut want = y0.clone();
        let term = LoraTerm {
            a: &a,
            b: &b,
            scale,
            rank,
            frozen: None,
        };
        cpu.matmul_lora(&mut want, &x, &wc, Some(term), m, add)?;
        Ok(want)
    };
    let round = |v: &[f32]| v.iter().map(|&e| bf16_round(e)).collect::<Vec<_>>();
    let want = spec(&a, &b)?;
    let want16 = spec(&round(&a), &round(&b))?;

    let wg = be.linear(HostLinear::Nf4(w))?;
    let (xg, ag, bg) = (be.upload(&x)?, be.upload(&a)?, be.upload(&b)?);
    let a16 = be.lora_inference_copy(&ag, rank, k)?;
    let b16 = be.lora_inference_copy(&bg, n, rank)?;
    let device = |frozen: Option<(&CudaLinear, &CudaLinear)>| -> Result<Vec<f32>> {
        let term = LoraTerm {
            a: &ag,
            b: &bg,
            scale,
            rank,
            frozen,
        };
        let mut y = be.upload(&y0)?;
        be.matmul_lora(&mut y, &xg, &wg, Some(term), m, add)?;
        be.download(&y)
    };
    let got = device(None)?;
    let (Some(a16), Some(b16)) = (&a16, &b16) else {
        return Err(crate::Error::Backend(
            "lora_inference_copy made no bf16 copy".into(),
        ));
    };
    let got16 = device(Some((a16, b16)))?;
    let n16 = name(c).replace("gemv", "gemv bf16 A,B");
    Ok(vec![
        CheckRow::new(name(c), max_rel_err(&got, &want), BOUND),
        CheckRow::new(n16.clone(), max_rel_err(&got16, &want16), BOUND),
        CheckRow::new(
            format!("{n16} vs f32 A,B"),
            max_rel_err(&got16, &want),
            BF16_VS_F32_BOUND,
        ),
    ])
}

/// Three rows per case (f32 adapter; bf16 copies against the rounded and the f32 spec).
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        rows.extend(rows_or_failure(&name(c), || {
            device_case(be, c, 0x10AD + 16 * i as u64)
        }));
    }
    Ok(rows)
}
