//! `qlora check`: the CUDA backend against its CPU specification, on the user's own GPU (as
//! `python -m bitsandbytes` checks an install). Every kernel runs on small odd shapes next to
//! the CPU spec, then a tiny model's training step and an optimizer step run on both devices.
//! Each comparison is a [`CheckRow`]: `op | max error | bound | ok`. The CUDA tests
//! (`tests/cuda_ops.rs`) call these same functions, so a check and its test cannot drift apart.
//!
//! One file per op group: `attention.rs` (flash attention forward/backward),
//! `decode_attention.rs` (inference attention over the bf16 KV cache), `nf4_dx.rs` (the
//! backward NF4 product), `ops.rs` (RMSNorm/SwiGLU backward, dropout, cross-entropy, stash),
//! `lora.rs` (the LoRA products), `lora_decode.rs` (LoRA fused into the decode GEMV), `adamw.rs`
//! and `adam8.rs` (the device optimizers, 32- and 8-bit), `model.rs` (a whole step),
//! `quantize.rs` (NF4 quantization while loading, bit for bit), `sample.rs` (the device sampler:
//! the CPU's token for the same logits and uniform).

#[cfg(feature = "cuda")]
pub mod adam8;
#[cfg(feature = "cuda")]
pub mod adamw;
#[cfg(feature = "cuda")]
pub mod attention;
#[cfg(feature = "cuda")]
pub mod decode_attention;
#[cfg(feature = "cuda")]
pub mod decode_step;
#[cfg(feature = "cuda")]
pub mod lora;
#[cfg(feature = "cuda")]
pub mod lora_decode;
#[cfg(feature = "cuda")]
pub mod model;
#[cfg(feature = "cuda")]
pub mod nf4_dx;
#[cfg(feature = "cuda")]
pub mod ops;
#[cfg(feature = "cuda")]
pub mod quantize;
#[cfg(feature = "cuda")]
pub mod sample;

/// One comparison of a device result against its specification.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRow {
    /// What ran, with its shape, e.g. `attention fwd T=17 H=4/KV=1 D=64`.
    pub op: String,
    /// The error measure the bound applies to (see the producing check).
    pub max_err: f64,
    pub bound: f64,
    pub ok: bool,
}

impl CheckRow {
    /// A row that passes when `max_err` is finite and at most `bound`.
    pub fn new(op: impl Into<String>, max_err: f64, bound: f64) -> Self {
        CheckRow {
            op: op.into(),
            max_err,
            bound,
            ok: max_err.is_finite() && max_err <= bound,
        }
    }

    /// A row for a check that could not run (launch error, mismatched sizes): always failing.
    pub fn failed(op: impl Into<String>, why: impl std::fmt::Display) -> Self {
        CheckRow {
            op: format!("{}: {why}", op.into()),
            max_err: f64::NAN,
            bound: 0.0,
            ok: false,
        }
    }
}

/// `max |got − want| / max |want|` (the error relative to the result's scale; 0 when both are
/// zero). Lengths must match (a mismatch is an infinite error).
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f64, |a, &w| a.max((w as f64).abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f64, |a, (&g, &w)| a.max((g as f64 - w as f64).abs()));
    if err == 0.0 {
        0.0
    } else if scale == 0.0 || !err.is_finite() {
        f64::INFINITY
    } else {
        err / scale
    }
}

/// Cosine similarity of two vectors (1 for two zero vectors, 0 when only one is zero).
pub fn cosine(got: &[f32], want: &[f32]) -> f64 {
    let (mut gw, mut gg, mut ww) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        gw += g * w;
        gg += g * g;
        ww += w * w;
    }
    match (gg == 0.0, ww == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => gw / (gg.sqrt() * ww.sqrt()),
    }
}

/// `‖got − want‖₂ / ‖want‖₂` (0 when both are zero).
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let (mut dd, mut ww) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w as f64;
        dd += d * d;
        ww += (w as f64) * (w as f64);
    }
    if dd == 0.0 {
        0.0
    } else if ww == 0.0 {
        f64::INFINITY
    } else {
        (dd / ww).sqrt()
    }
}

/// Deterministic pseudo-random values in `[-amp, amp)` for check inputs (splitmix64, no RNG
/// crate state to thread through).
pub fn test_values(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    use crate::backend::cpu::dropout::splitmix64;
    (0..n as u64)
        .map(|i| {
            let z = splitmix64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// Runs `f`, turning an error into one failing row named `op`.
pub fn rows_or_failure(
    op: &str,
    f: impl FnOnce() -> crate::Result<Vec<CheckRow>>,
) -> Vec<CheckRow> {
    match f() {
        Ok(rows) => rows,
        Err(e) => vec![CheckRow::failed(op, e)],
    }
}

/// The device facts `qlora check` prints first.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// e.g. `cuda:0 (NVIDIA H100 80GB HBM3, sm_90)`.
    pub name: String,
    /// The CUDA version the installed driver supports, e.g. `(13, 0)`.
    pub driver_cuda: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
}

/// Name, capability, driver and memory of the backend's device.
#[cfg(feature = "cuda")]
pub fn device_info(be: &crate::backend::cuda::backend::CudaBackend) -> crate::Result<DeviceInfo> {
    use crate::backend::Backend;
    let mut v: std::ffi::c_int = 0;
    // SAFETY: writes one int; the driver is loaded (the backend exists).
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::cudaError_enum::CUDA_SUCCESS {
        return Err(crate::Error::Backend(format!("cuDriverGetVersion: {r:?}")));
    }
    let (free_bytes, total_bytes) = be.dev.mem_info()?;
    Ok(DeviceInfo {
        name: be.name(),
        driver_cuda: (v / 1000, (v % 1000) / 10),
        total_bytes,
        free_bytes,
    })
}

/// Every check, in the order `qlora check` prints them.
#[cfg(feature = "cuda")]
pub fn run_all(be: &crate::backend::cuda::backend::CudaBackend) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    rows.extend(rows_or_failure("ops", || ops::run(be)));
    rows.extend(rows_or_failure("lora", || lora::run(be)));
    rows.extend(rows_or_failure("lora decode", || lora_decode::run(be)));
    rows.extend(rows_or_failure("nf4 dx", || nf4_dx::run(be)));
    rows.extend(rows_or_failure("attention", || attention::run(be)));
    rows.extend(rows_or_failure("decode attention", || {
        decode_attention::run(be)
    }));
    rows.extend(rows_or_failure("adamw", || adamw::run(be)));
    rows.extend(rows_or_failure("adamw8", || adam8::run(be)));
    rows.extend(rows_or_failure("training step", || model::run(be)));
    rows.extend(rows_or_failure("nf4 quantize", || quantize::run(be)));
    rows.extend(rows_or_failure("sample", || sample::run(be)));
    rows.extend(rows_or_failure("decode step", || decode_step::run(be)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_measures() {
        assert_eq!(max_rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((max_rel_err(&[1.0, 2.2], &[1.0, 2.0]) - 0.1).abs() < 1e-6);
        assert_eq!(max_rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(max_rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
        assert!((rel_l2(&[1.0, 1.0], &[1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(!CheckRow::new("x", f64::NAN, 1.0).ok);
        assert!(CheckRow::new("x", 0.5, 1.0).ok);
        let v = test_values(3, 1000, 2.0);
        assert!(v.iter().all(|x| (-2.0..2.0).contains(x)));
        assert_ne!(v[0], v[1]);
    }
}
