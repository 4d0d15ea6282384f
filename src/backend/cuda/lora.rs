//! LoRA adapter term and its backward on the device: bf16 products on cuBLAS, f32 results.
//! CPU spec and derivation: [`crate::backend::cpu::backward::lora_forward_add`] and
//! [`crate::backend::cpu::backward::lora_backward`]; elementwise kernels: `kernels/lora.cu`;
//! check: `src/check/lora.rs` (a CPU emulation of exactly this rounding, and the f32 spec).
//!
//! Mixed precision as QLoRA trains (bitsandbytes + PEFT with `bf16=True`: the adapter weights keep
//! f32 master copies, autocast runs every matmul on bf16 operands with f32 accumulation): every
//! GEMM operand is rounded to bf16 (RNE) and multiplied by `cublasGemmEx` with f32 accumulation
//! and f32 output ([`blas::gemm_half`]); every accumulation (`y`, `dx`, `dA`, `dB`) happens in
//! f32 in the GEMM's epilogue (`beta = 1`). With `h(·)` = round to bf16, `x̃ = x ⊙ keep`:
//! ```text
//! forward   xa  = h(x̃)·h(A)ᵀ                 [m, r]    f32, written (kept for the backward)
//!           y  += s · h(xa)·h(B)ᵀ            [m, out]
//! backward  dB += s · h(dy)ᵀ·h(xa)           [out, r]
//!           g   = s · h(dy)·h(B)             [m, r]    f32 scratch
//!           dA += h(g)ᵀ·h(x̃)                 [r, in]
//!           dx += keep ⊙ (h(g)·h(A))         [m, in]   (no mask: straight into dx, beta = 1;
//!                                                       mask: into an f32 scratch `ga`, then
//!                                                       `lora_dx_keep_f32`: dx += keep ⊙ ga)
//! ```
//! `h(x̃)` is one kernel (`lora_keep_bf16`: `bf16(x · keep)`, the product rounded to f32 first),
//! or plain [`ops::to_half`] without a mask; `h(A)`, `h(B)` are rounded from the f32 masters on
//! every call (r × in values: cheap next to the `m × in` operands); `h(x̃)` is recomputed by the
//! backward rather than kept, since one [`LoraScratch`] serves every projection of the model.
//! Shapes: x, keep `[m, in]`, A `[r, in]`, B `[out, r]`, all row-major f32 on the device.

use super::blas::{self, RowMajor};
use super::ops::{self, grid};
use super::runtime::{CudaDevice, DevBuf};
use crate::backend::LoraShape;
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, PushKernelArg};

/// bf16 (and f32) staging buffers of the LoRA products, grown on demand ([`CudaDevice::grown`])
/// and reused, so a training step allocates nothing here after its first (largest) projection.
/// Sizes for `m` rows, `in`, `out` features and rank `r`; the `[m, in]` and `[m, out]` buffers
/// dominate: at m = 8192 and 11008 features, 180 MB in bf16, and `ga` 360 MB in f32.
#[derive(Default)]
pub struct LoraScratch {
    /// `h(x ⊙ keep)` `[m, in]`.
    x: Option<DevBuf<u16>>,
    /// `h(A)` `[r, in]`.
    a: Option<DevBuf<u16>>,
    /// `h(B)` `[out, r]`.
    b: Option<DevBuf<u16>>,
    /// `h(xa)` `[m, r]`.
    xa: Option<DevBuf<u16>>,
    /// `h(dy)` `[m, out]`.
    dy: Option<DevBuf<u16>>,
    /// `g = s · h(dy)·h(B)` `[m, r]`, f32.
    g: Option<DevBuf<f32>>,
    /// `h(g)` `[m, r]`.
    g_half: Option<DevBuf<u16>>,
    /// `h(g)·h(A)` `[m, in]`, f32 (only under a dropout mask).
    ga: Option<DevBuf<f32>>,
}

/// An error naming buffer `what` when it holds fewer than the `want` values of shape `sh`.
fn need(what: &str, have: usize, want: usize, sh: LoraShape) -> Result<()> {
    if have < want {
        return Err(Error::Backend(format!(
            "cuda lora {what}: buffer holds {have} values, {sh:?} needs {want}"
        )));
    }
    Ok(())
}

/// Checks the inputs both directions share: x, keep, A, B, xa and the `[m, out]` buffer (y or dy).
fn check_common(
    sh: LoraShape,
    x: usize,
    keep: Option<usize>,
    a: usize,
    b: usize,
    xa: usize,
    mo: (&str, usize),
) -> Result<()> {
    let LoraShape {
        rows: m,
        in_features: k,
        out_features: n,
        rank: r,
    } = sh;
    need("x", x, m * k, sh)?;
    if let Some(keep) = keep {
        need("dropout mask", keep, m * k, sh)?;
    }
    need("A", a, r * k, sh)?;
    need("B", b, n * r, sh)?;
    need("xa", xa, m * r, sh)?;
    need(mo.0, mo.1, m * n, sh)
}

/// `out = h(x ⊙ keep)` over `n` values (`h(x)` without a mask).
fn dropped_half(
    dev: &CudaDevice,
    out: &mut CudaSlice<u16>,
    x: &CudaSlice<f32>,
    keep: Option<&CudaSlice<f32>>,
    n: usize,
) -> Result<()> {
    let Some(keep) = keep else {
        return ops::to_half(dev, out, x, n, false);
    };
    // Sizes were checked by the public launchers (out comes from `grown(.., n)`).
    let f = dev.function("lora", "lora_keep_bf16")?;
    let n64 = n as i64;
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(x).arg(keep).arg(&n64);
    // SAFETY: matches lora_keep_bf16(bf16*, const float*, const float*, int64_t); out, x and keep
    // hold at least n values (checked by the callers).
    unsafe { b.launch(grid(n)) }.map_err(|e| Error::Backend(format!("lora_keep_bf16: {e}")))?;
    Ok(())
}

/// `xa = (x ⊙ keep)·Aᵀ` (written, f32), `y += scale · xa·Bᵀ`, on bf16 operands (module docs).
/// `keep` is `None` without dropout (evaluation, generation).
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_add(
    dev: &CudaDevice,
    blas: &CudaBlas,
    scratch: &mut LoraScratch,
    y: &mut CudaSlice<f32>,
    xa: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    keep: Option<&CudaSlice<f32>>,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    scale: f32,
    sh: LoraShape,
) -> Result<()> {
    check_common(
        sh,
        x.len(),
        keep.map(|k| k.len()),
        a.len(),
        b.len(),
        xa.len(),
        ("y", y.len()),
    )?;
    let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
    if m == 0 {
        return Ok(());
    }
    let LoraScratch {
        x: xh,
        a: ah,
        b: bh,
        xa: xah,
        ..
    } = scratch;
    let xh = dev.grown(xh, m * k)?;
    let ah = dev.grown(ah, r * k)?;
    let bh = dev.grown(bh, n * r)?;
    let xah = dev.grown(xah, m * r)?;
    dropped_half(dev, xh, x, keep, m * k)?;
    ops::to_half(dev, ah, a, r * k, false)?;
    ops::to_half(dev, bh, b, n * r, false)?;
    // xa[m, r] = h(x̃)[m, in] · h(A)[r, in]ᵀ
    blas::gemm_half(blas, &dev.stream, xa, xh, ah, RowMajor::xwt(m, k, r), false)?;
    ops::to_half(dev, xah, xa, m * r, false)?;
    // y[m, out] += s · h(xa)[m, r] · h(B)[out, r]ᵀ
    let p = RowMajor::xwt(m, r, n).scaled(scale, 1.0);
    blas::gemm_half(blas, &dev.stream, y, xah, bh, p, false)
}

/// Accumulates `dA`, `dB` and the adapter's share of `dx` (derivation in
/// `cpu/backward/lora.rs`, rounding in the module docs). `dy` `[m, out]` is the projection's
/// output gradient; `x`, `keep` and `xa` are what the forward saw and wrote (the same mask).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    dev: &CudaDevice,
    blas: &CudaBlas,
    scratch: &mut LoraScratch,
    dx: &mut CudaSlice<f32>,
    da: &mut CudaSlice<f32>,
    db: &mut CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    keep: Option<&CudaSlice<f32>>,
    xa: &CudaSlice<f32>,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    scale: f32,
    sh: LoraShape,
) -> Result<()> {
    check_common(
        sh,
        x.len(),
        keep.map(|k| k.len()),
        a.len(),
        b.len(),
        xa.len(),
        ("dy", dy.len()),
    )?;
    let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
    need("dx", dx.len(), m * k, sh)?;
    need("dA", da.len(), r * k, sh)?;
    need("dB", db.len(), n * r, sh)?;
    if m == 0 {
        return Ok(());
    }
    let LoraScratch {
        x: xh,
        a: ah,
        b: bh,
        xa: xah,
        dy: dyh,
        g,
        g_half: gh,
        ga,
    } = scratch;
    let dyh = dev.grown(dyh, m * n)?;
    let xah = dev.grown(xah, m * r)?;
    let bh = dev.grown(bh, n * r)?;
    let g = dev.grown(g, m * r)?;
    let gh = dev.grown(gh, m * r)?;
    let xh = dev.grown(xh, m * k)?;
    let ah = dev.grown(ah, r * k)?;
    ops::to_half(dev, dyh, dy, m * n, false)?;
    ops::to_half(dev, xah, xa, m * r, false)?;
    ops::to_half(dev, bh, b, n * r, false)?;
    // dB[out, r] += s · h(dy)[m, out]ᵀ · h(xa)[m, r]
    let p = RowMajor::xtw(n, m, r).scaled(scale, 1.0);
    blas::gemm_half(blas, &dev.stream, db, dyh, xah, p, false)?;
    // g[m, r] = s · h(dy)[m, out] · h(B)[out, r]
    let p = RowMajor::xw(m, n, r).scaled(scale, 0.0);
    blas::gemm_half(blas, &dev.stream, g, dyh, bh, p, false)?;
    ops::to_half(dev, gh, g, m * r, false)?;
    // dA[r, in] += h(g)[m, r]ᵀ · h(x̃)[m, in]
    dropped_half(dev, xh, x, keep, m * k)?;
    let p = RowMajor::xtw(r, m, k).scaled(1.0, 1.0);
    blas::gemm_half(blas, &dev.stream, da, gh, xh, p, false)?;
    // dx[m, in] += keep ⊙ (h(g)[m, r] · h(A)[r, in])
    ops::to_half(dev, ah, a, r * k, false)?;
    let Some(keep) = keep else {
        let p = RowMajor::xw(m, r, k).scaled(1.0, 1.0);
        return blas::gemm_half(blas, &dev.stream, dx, gh, ah, p, false);
    };
    let ga = dev.grown(ga, m * k)?;
    blas::gemm_half(blas, &dev.stream, ga, gh, ah, RowMajor::xw(m, r, k), false)?;
    let f = dev.function("lora", "lora_dx_keep_f32")?;
    let n64 = (m * k) as i64;
    let mut lb = dev.stream.launch_builder(&f);
    lb.arg(dx).arg(keep).arg(&**ga).arg(&n64);
    // SAFETY: matches lora_dx_keep_f32(float*, const float*, const float*, int64_t); dx and keep
    // were checked to hold m·in values, ga was grown to m·in.
    unsafe { lb.launch(grid(m * k)) }
        .map_err(|e| Error::Backend(format!("lora_dx_keep_f32: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every buffer is checked against the shape, and the error names the short one.
    #[test]
    fn buffer_sizes_are_checked() {
        let sh = LoraShape {
            rows: 3,
            in_features: 10,
            out_features: 7,
            rank: 2,
        };
        let ok = (30, Some(30), 20, 14, 6, ("y", 21));
        let run = |(x, keep, a, b, xa, mo): (usize, Option<usize>, usize, usize, usize, _)| {
            check_common(sh, x, keep, a, b, xa, mo)
        };
        assert!(run(ok).is_ok());
        assert!(run((30, None, 20, 14, 6, ("y", 21))).is_ok());
        let short = [
            ((29, Some(30), 20, 14, 6, ("y", 21)), "x"),
            ((30, Some(29), 20, 14, 6, ("y", 21)), "dropout mask"),
            ((30, Some(30), 19, 14, 6, ("y", 21)), "A"),
            ((30, Some(30), 20, 13, 6, ("y", 21)), "B"),
            ((30, Some(30), 20, 14, 5, ("y", 21)), "xa"),
            ((30, Some(30), 20, 14, 6, ("dy", 20)), "dy"),
        ];
        for (args, what) in short {
            let e = run(args).expect_err(what).to_string();
            assert!(e.contains(&format!("cuda lora {what}:")), "{e}");
        }
    }
}
