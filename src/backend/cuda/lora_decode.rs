//! LoRA at decode without merging: launchers of `kernels/nf4.cu`'s `lora_xa_{f32,bf16}` and
//! `nf4_gemv_lora_{f32,bf16}_k32`, the CUDA [`crate::backend::Backend::matmul_lora`] for NF4
//! weights at up to [`GEMV_MAX_M`] rows and rank ≤ [`MAX_RANK`]: two launches per adapted
//! projection (the `x·Aᵀ` GEMV, then the NF4 GEMV that adds `scale · xa·Bᵀ` inside its own
//! reduction) instead of the NF4 GEMV plus the bf16 cuBLAS path of `lora.rs` (conversions, two
//! GEMMs, the add). The adapter is read once per call, as [`Adapter`] says: in f32 (an adapter
//! being trained; `4 · rank · (in + out)` bytes per projection) or in bf16 (the copies of a
//! frozen one, `Llama::freeze_adapter`; `2 · rank · (in + out)` bytes). Products and sums are
//! f32 either way. Spec: the unfused default, [`crate::backend::matmul_lora_unfused`] (f32, no
//! rounding; on A and B pre-rounded to bf16 for the bf16 kernels).

use super::nf4::{DeviceNf4, GEMV_MAX_M};
use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Largest rank the fused GEMV takes (two ranks per lane).
pub const MAX_RANK: usize = 64;

/// The adapter matrices the fused kernels read: `A` `[rank, in]`, `B` `[out, rank]`.
#[derive(Clone, Copy)]
pub enum Adapter<'a> {
    /// f32 (the truth, and what an adapter being trained has).
    F32(&'a CudaSlice<f32>, &'a CudaSlice<f32>),
    /// bf16 bits, rounded to nearest even from the f32 matrices (a frozen adapter's copies).
    Bf16(&'a CudaSlice<u16>, &'a CudaSlice<u16>),
}

impl Adapter<'_> {
    /// Elements held by `A` and `B`.
    fn lens(&self) -> (usize, usize) {
        match self {
            Adapter::F32(a, b) => (a.len(), b.len()),
            Adapter::Bf16(a, b) => (a.len(), b.len()),
        }
    }

    /// The `x·Aᵀ` kernel and the fused NF4 + `xa·Bᵀ` kernel for this element type.
    fn kernels(&self) -> (&'static str, &'static str) {
        match self {
            Adapter::F32(..) => ("lora_xa_f32", "nf4_gemv_lora_f32_k32"),
            Adapter::Bf16(..) => ("lora_xa_bf16", "nf4_gemv_lora_bf16_k32"),
        }
    }
}

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
    (adapter, scale, rank): (Adapter<'_>, f32, usize),
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
    let (a_len, b_len) = adapter.lens();
    let sizes = [
        ("x", x.len(), m * k),
        ("y", y.len(), m * n),
        ("lora_A", a_len, rank * k),
        ("lora_B", b_len, n * rank),
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
    let (xa_name, gemv_name) = adapter.kernels();
    let (m32, r32, k64) = (m as i32, rank as i32, k as i64);
    let f = dev.function("nf4", xa_name)?;
    let cfg = LaunchConfig {
        grid_dim: (rank as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = dev.stream.launch_builder(&f);
    l.arg(&mut **xa).arg(x);
    match adapter {
        Adapter::F32(a, _) => l.arg(a),
        Adapter::Bf16(a, _) => l.arg(a),
    };
    l.arg(&m32).arg(&r32).arg(&k64);
    // SAFETY: matches lora_xa_{f32,bf16}(float*, const float*, const {float,uint16_t}*, int, int,
    // int64_t); x [m, k], A [rank, k] checked above, xa holds m·rank; k % 32 == 0 keeps the
    // 16-byte loads of x and A aligned.
    unsafe { l.launch(cfg) }.map_err(|e| Error::Backend(format!("{xa_name}: {e}")))?;

    let f = dev.function("nf4", gemv_name)?;
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
    l.arg(&m32).arg(&n64).arg(&k64).arg(&acc).arg(&**xa);
    match adapter {
        Adapter::F32(_, b) => l.arg(b),
        Adapter::Bf16(_, b) => l.arg(b),
    };
    l.arg(&scale).arg(&r32);
    // SAFETY: matches nf4_gemv_lora_{f32,bf16}_k32 (nf4_gemv_f32_k32's arguments, then const
    // float*, const {float,uint16_t}*, float, int); sizes checked above; cols % 32 == 0 and
    // blocksize ≥ 32 as the k32 GEMV needs; B is read element-wise (no alignment needed).
    unsafe { l.launch(cfg) }.map_err(|e| Error::Backend(format!("{gemv_name}: {e}")))?;
    Ok(())
}
