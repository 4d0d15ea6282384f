//! Check of LoRA at decode (`kernels/nf4.cu`'s `lora_xa_f32` + `nf4_gemv_lora_f32_k32`,
//! launcher `backend/cuda/lora_decode.rs`): the CUDA backend's `matmul_lora` on NF4 weights
//! against the CPU's (the spec: the NF4 product, then `lora_forward_add`, all f32), with and
//! without the fused residual add.
//!
//! Cases: m = 1, 2, 3, 8 input rows (decode is 1); ranks 1, 8, 16, 33 (one lane with two ranks,
//! the others one) and 64; output rows that are not a multiple of the 16 a CTA takes (100, 300,
//! 1000); inputs 96 to 4096 (the k32 GEMV needs in % 32 == 0). A, B and x are scaled so that the
//! adapter term is about as large as the base product (a dropped or doubled term is an O(1)
//! error).
//!
//! Bound: both sides compute in f32 from identical NF4 values (the GEMV's decoding is bit-exact,
//! checked in tests/cuda_ops.rs); they differ only in summation order (lane strides and warp
//! trees against the CPU's sequential sums) over at most 4096 + 64 terms: a relative error of
//! order √k · 2⁻²⁴ ≈ 4e-6 typically, k · 2⁻²⁴ ≈ 2.4e-4 if every rounding went the same way, so
//! **max rel err ≤ 1e-4** (any wrong index, rank or scale is O(1)).

use super::{max_rel_err, rows_or_failure, test_values, CheckRow};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::backend::CudaBackend;
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

    let wc = cpu.linear(HostLinear::Nf4(w.clone()))?;
    let mut want = y0.clone();
    let term = LoraTerm {
        a: &a,
        b: &b,
        scale,
        rank,
    };
    cpu.matmul_lora(&mut want, &x, &wc, Some(term), m, add)?;

    let wg = be.linear(HostLinear::Nf4(w))?;
    let (ag, bg) = (be.upload(&a)?, be.upload(&b)?);
    let term = LoraTerm {
        a: &ag,
        b: &bg,
        scale,
        rank,
    };
    let mut y = be.upload(&y0)?;
    be.matmul_lora(&mut y, &be.upload(&x)?, &wg, Some(term), m, add)?;
    let got = be.download(&y)?;
    Ok(vec![CheckRow::new(
        name(c),
        max_rel_err(&got, &want),
        BOUND,
    )])
}

/// One row per case.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        rows.extend(rows_or_failure(&name(c), || {
            device_case(be, c, 0x10AD + 16 * i as u64)
        }));
    }
    Ok(rows)
}
