//! LoRA at decode without merging: launchers of `kernels/nf4.cu`'s `lora_xa_f32` and
//! `nf4_gemv_lora_f32_k32`, the CUDA [`crate::backend::Backend::matmul_lora`] for NF4 weights at
//! up to [`GEMV_MAX_M`] rows and rank ≤ [`MAX_RANK`]: two launches per adapted projection (the
//! `x·Aᵀ` GEMV, then the NF4 GEMV that adds `scale · xa·Bᵀ` inside its own reduction) instead of
//! the NF4 GEMV plus the bf16 cuBLAS path of `lora.rs` (conversions, two GEMMs, the add). The
//! adapter is read once in f32: `4 · rank · (in + out)` bytes per projection. Spec: the
//! unfused default, [`crate::backend::matmul_lora_unfused`] (f32, no rounding).

use super::nf4::{DeviceNf4, GEMV_MAX_M};
use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Largest rank the fused GEMV takes (two ranks per lane).
pub const MAX_RANK: usize = 64;

/// Whether [`nf4_lora_gemv`] takes this product (else the unfused path runs).
pub fn fused_supported(w: &DeviceNf4, rows: usize, rank: usize) -> bool {
    (1..=GEMV_MAX_M).contains(&rows)
        && (1..=MAX_RANK).contains(&rank)
        && w.cols % 32 == 0
        && w.blocksize >= 32
}

/// `y (+)= x·dequant(W)ᵀ + scale · (x·Aᵀ)·Bᵀ` for `m` rows; `xa` `[m, rank]` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn nf4_lora_gemv(
    dev: &CudaDevice,
    xa: &mut Option<DevBuf<f32>>,
    w: &DeviceNf4,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    (a, b, scale, rank): (&CudaSlice<f32>, &CudaSlice<f32>, f32, usize),
    m: usize,
    accumulate: bool,
) -> Result<()> {
    if !fused_supported(w, m, rank) {
        return Err(Error::Backend(format!(
            "nf4 lora gemv: unsupported m = {m}, rank = {rank}, [{}, {}] blocksize {}",
            w.rows, w.cols, w.blocksize
        )));
    }
    let (n, k) = (w.rows, w.cols);
    let sizes = [
        ("x", x.len(), m * k),
        ("y", y.len(), m * n),
        ("lora_A", a.len(), rank * k),
        ("lora_B", b.len(), n * rank),
    ];
    if let Some((what, have, want)) = sizes.iter().find(|(_, h, w)| h < w) {
        return Err(Error::Backend(format!(
            "nf4 lora gemv: {what} holds {have} values, needs {want}"
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let xa = dev.grown(xa, m * rank)?;
    let (m32, r32, k64) = (m as i32, rank as i32, k as i64);
    let f = dev.function("nf4", "lora_xa_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (rank as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = dev.stream.launch_builder(&f);
    l.arg(&mut **xa).arg(x).arg(a).arg(&m32).arg(&r32).arg(&k64);
    // SAFETY: matches lora_xa_f32(float*, const float*×2, int, int, int64_t); x [m, k], A
    // [rank, k] checked above, xa holds m·rank; k % 32 == 0 keeps the float4 loads aligned.
    unsafe { l.launch(cfg) }.map_err(|e| Error::Backend(format!("lora_xa_f32: {e}")))?;

    let f = dev.function("nf4", "nf4_gemv_lora_f32_k32")?;
    let (dq, acc) = (w.dq_flag(), accumulate as i32);
    let (n64, k64) = (n as i64, k as i64);
    let cfg = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(16), 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = dev.stream.launch_builder(&f);
    l.arg(y).arg(x);
    w.push_args(&mut l, &dq);
    l.arg(&m32)
        .arg(&n64)
        .arg(&k64)
        .arg(&acc)
        .arg(&**xa)
        .arg(b)
        .arg(&scale)
        .arg(&r32);
    // SAFETY: matches nf4_gemv_lora_f32_k32 (nf4_gemv_f32_k32's arguments, then const float*×2,
    // float, int); sizes checked above; cols % 32 == 0 and blocksize ≥ 32 as the k32 GEMV needs.
    unsafe { l.launch(cfg) }.map_err(|e| Error::Backend(format!("nf4_gemv_lora_f32_k32: {e}")))?;
    Ok(())
}
