//! Launcher of `kernels/dropout.cu`: the inverted-dropout mask of `cpu/dropout.rs`, bit for bit.
//!
//! The CPU file is the single source of the mask's definition. The kernel repeats its hash
//! (SplitMix64 with the same constants: they MUST match, and `qlora check` compares the two
//! masks bit for bit, `src/check/ops.rs`), but does no floating-point arithmetic: the two f32
//! decisions of the spec are taken here on the host ([`mask_params`]), so fast math, flush-to-zero
//! or a contracted multiply on the device cannot change a single bit:
//! - `u < p` with `u = k · 2⁻²⁴` for the integer `k = z >> 40` becomes `k < ceil(p · 2²⁴)`
//!   (exact in f64; true for `p = 0`, subnormal `p` and every `p < 1`);
//! - the kept value `1 / (1 − p)` is the CPU's f32 expression, computed here with IEEE division.

use super::ops::grid;
use super::runtime::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// `(threshold, scale)` for drop probability `p` (`0 ≤ p < 1`): element `e` of the mask is `0`
/// when `splitmix64(seed ⊕ e·γ) >> 40 < threshold`, else `scale`, exactly as
/// `cpu::dropout::dropout_mask` decides `dropout_uniform(seed, e) < p`.
pub fn mask_params(p: f32) -> (u32, f32) {
    // p < 1 so p·2²⁴ < 2²⁴: the product is exact in f64 and the ceiling fits a u32.
    let threshold = (p as f64 * (1u64 << 24) as f64).ceil() as u32;
    let scale = crate::backend::cpu::dropout::dropout_scale(p);
    (threshold, scale)
}

/// `keep[i]` = element `offset + i` of the mask `(seed, p)` (see `cpu/dropout.rs`), `i < len`.
pub fn dropout_mask(
    dev: &CudaDevice,
    keep: &mut CudaSlice<f32>,
    len: usize,
    p: f32,
    seed: u64,
    offset: u64,
) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Backend(format!(
            "dropout mask: probability {p} must be in [0, 1)"
        )));
    }
    if keep.len() < len {
        return Err(Error::Backend(format!(
            "dropout mask: buffer holds {} values, op needs {len}",
            keep.len()
        )));
    }
    if len == 0 {
        return Ok(());
    }
    let (threshold, scale) = mask_params(p);
    let f = dev.function("dropout", "dropout_mask_f32")?;
    let len64 = len as i64;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(keep)
        .arg(&len64)
        .arg(&seed)
        .arg(&offset)
        .arg(&threshold)
        .arg(&scale);
    // SAFETY: matches dropout_mask_f32(float*, int64_t, uint64_t, uint64_t, uint32_t, float);
    // keep holds at least len values (checked above) and the kernel writes indices < len only.
    unsafe { b.launch(grid(len)) }.map_err(|e| Error::Backend(format!("dropout_mask_f32: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::dropout::{dropout_mask as cpu_mask, splitmix64};

    /// The kernel's arithmetic for element `e`, on the host.
    fn kernel_element(seed: u64, e: u64, threshold: u32, scale: f32) -> f32 {
        let z = splitmix64(seed ^ e.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        if ((z >> 40) as u32) < threshold {
            0.0
        } else {
            scale
        }
    }

    const PS: [f32; 11] = [
        0.0,
        1e-45, // the smallest subnormal: drops k = 0 only
        1e-30,
        1.0 / 16_777_216.0, // 2⁻²⁴ exactly: drops k = 0 only
        0.05,
        0.1,
        0.3,
        0.5,
        0.7,
        0.999_999,
        0.999_999_94, // the largest f32 below 1
    ];

    #[test]
    fn threshold_decides_as_the_f32_comparison() {
        for p in PS {
            let (t, scale) = mask_params(p);
            assert_eq!(scale.to_bits(), (1.0f32 / (1.0 - p)).to_bits());
            // Every k near the threshold, and a sweep: k < t ⇔ k·2⁻²⁴ < p (the CPU's u < p).
            let near = (t.saturating_sub(3)..=(t + 3).min((1 << 24) - 1)).collect::<Vec<_>>();
            let sweep = (0..1u32 << 24).step_by(997);
            for k in near.into_iter().chain(sweep) {
                let u = k as f32 * (1.0 / (1u64 << 24) as f32);
                assert_eq!(k < t, u < p, "p {p:e} k {k} threshold {t}");
            }
        }
        assert_eq!(mask_params(0.0).0, 0);
        assert_eq!(mask_params(1e-45).0, 1);
        assert_eq!(mask_params(0.5).0, 1 << 23);
    }

    #[test]
    fn kernel_arithmetic_equals_the_cpu_mask() {
        let len = 20_001;
        for p in PS {
            let (t, scale) = mask_params(p);
            for (seed, offset) in [(0u64, 0u64), (42, 12_345), (u64::MAX, 1 << 40)] {
                let mut want = vec![0.0f32; len];
                cpu_mask(&mut want, p, seed, offset);
                for (i, w) in want.iter().enumerate() {
                    let got = kernel_element(seed, offset + i as u64, t, scale);
                    assert_eq!(
                        got.to_bits(),
                        w.to_bits(),
                        "p {p:e} seed {seed} element {i}"
                    );
                }
            }
        }
    }
}
