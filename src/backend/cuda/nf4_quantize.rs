//! Launcher of `kernels/nf4_quantize.cu`: NF4 quantization of a checkpoint tensor on the device,
//! bit-identical with the CPU spec [`crate::quant::quantize_nf4`] (checked byte for byte by
//! `src/check/quantize.rs`). This is how `--quant nf4` loads a model onto a GPU
//! ([`crate::backend::Backend::quantize_linear`]):
//!
//! 1. the tensor's stored bytes (f16, bf16 or f32) go from the memory map straight to the device
//!    (no f32 copy on the host: host memory stays at the pages of the one tensor being read);
//! 2. the kernel writes the packed codes and one f32 absmax per block, and the smallest flat
//!    index of a non-finite element, if any (one 8-byte read back per tensor, the only wait);
//! 3. with double quantization, the f32 absmax (4 bytes per 64 weights: 2.8 MB for a 4096×11008
//!    projection) comes back to the host, where [`crate::quant::double_quant::compress_absmax`]
//!    (the spec itself) quantizes it, and its 8-bit codes go back up. The nested step stays on the
//!    host on purpose: its offset is torch's CPU `mean`, a cascade sum whose exact order the spec
//!    reproduces, and its 8-bit codes come from bnb's 65536-entry table; a device version would
//!    have to mirror both bit for bit for a step that takes milliseconds per tensor.

use super::nf4::{DeviceNf4, Scales};
use super::runtime::CudaDevice;
use crate::backend::RawTensor;
use crate::error::{Error, Result};
use crate::quant::double_quant::compress_absmax;
use crate::quant::nf4::check_blocksize;
use crate::weights::DType;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Threads per CTA (8 warps, one quantization block per warp), as the kernel header says.
const THREADS: u32 = 256;
/// Largest grid launched; the kernel strides over the remaining blocks.
const MAX_GRID: usize = 1 << 16;

/// The kernel for a stored dtype, and its element width in bytes (`None`: not a float we read).
fn kernel_for(dtype: DType) -> Option<(&'static str, usize)> {
    match dtype {
        DType::F16 => Some(("nf4_quantize_f16", 2)),
        DType::BF16 => Some(("nf4_quantize_bf16", 2)),
        DType::F32 => Some(("nf4_quantize_f32", 4)),
        _ => None,
    }
}

/// Runs the kernel: `packed` (`ceil(n / 2)` bytes) and `absmax` (`ceil(n / blocksize)` values)
/// receive the NF4 codes and f32 scales of the `n` elements of `x` (stored `dtype` bytes on the
/// device, from a fresh allocation: the kernel reads element pairs as 4- or 8-byte words);
/// `bad[0]` is lowered to the smallest flat index of a non-finite element (set it to `u64::MAX`
/// first). `n = 0` launches nothing.
#[allow(clippy::too_many_arguments)]
pub fn nf4_quantize(
    dev: &CudaDevice,
    packed: &mut CudaSlice<u8>,
    absmax: &mut CudaSlice<f32>,
    bad: &mut CudaSlice<u64>,
    x: &CudaSlice<u8>,
    dtype: DType,
    n: usize,
    blocksize: usize,
) -> Result<()> {
    check_blocksize(blocksize)?;
    let Some((name, width)) = kernel_for(dtype) else {
        return Err(Error::Backend(format!(
            "nf4 quantize: dtype {dtype} is not F16, BF16 or F32"
        )));
    };
    if n == 0 {
        return Ok(());
    }
    let nblocks = n.div_ceil(blocksize);
    if x.len() < n * width
        || packed.len() < n.div_ceil(2)
        || absmax.len() < nblocks
        || bad.is_empty()
    {
        return Err(Error::Backend(format!(
            "nf4 quantize: {n} {dtype} elements in blocks of {blocksize} need {} input bytes, {} packed bytes, {nblocks} scales and 1 flag; got {}, {}, {}, {}",
            n * width,
            n.div_ceil(2),
            x.len(),
            packed.len(),
            absmax.len(),
            bad.len()
        )));
    }
    let f = dev.function("nf4_quantize", name)?;
    let warps = (THREADS / 32) as usize;
    let cfg = LaunchConfig {
        grid_dim: (nblocks.div_ceil(warps).min(MAX_GRID) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n64, log2) = (n as i64, blocksize.trailing_zeros() as i32);
    let mut b = dev.stream.launch_builder(&f);
    b.arg(packed)
        .arg(absmax)
        .arg(bad)
        .arg(x)
        .arg(&n64)
        .arg(&log2);
    // SAFETY: the arguments match the kernel's signature in kernels/nf4_quantize.cu (the input
    // pointer's element type is the dtype's; `x` is a whole allocation, so aligned); every buffer
    // holds what the kernel indexes for `n` and `blocksize` (checked above).
    unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("{name}: {e}")))?;
    Ok(())
}

/// Quantizes the stored tensor `raw` (`[rows, cols]`) into a device NF4 weight, exactly as
/// [`crate::quant::quantize_nf4`] would on its widened values (see the module doc for the
/// steps). `Ok(None)` for what the host path should handle and report itself: a dtype other
/// than F16 / BF16 / F32, or an empty tensor. A non-finite element is an
/// [`Error::InvalidArg`] `non-finite weight {value} at flat index {i}` (the loader's wording).
pub fn quantize_to_device(
    dev: &CudaDevice,
    raw: RawTensor<'_>,
    (rows, cols): (usize, usize),
    blocksize: usize,
    double_quant: bool,
) -> Result<Option<DeviceNf4>> {
    let n = rows * cols;
    let Some((_, width)) = kernel_for(raw.dtype) else {
        return Ok(None);
    };
    if n == 0 {
        return Ok(None);
    }
    check_blocksize(blocksize)?;
    if raw.bytes.len() != n * width {
        return Err(Error::InvalidArg(format!(
            "a [{rows}, {cols}] {} tensor needs {} bytes, got {}",
            raw.dtype,
            n * width,
            raw.bytes.len()
        )));
    }
    let x = dev.upload(raw.bytes)?;
    let mut packed = dev.zeros::<u8>(n.div_ceil(2))?;
    let mut absmax = dev.zeros::<f32>(n.div_ceil(blocksize))?;
    let mut bad = dev.upload(&[u64::MAX])?;
    nf4_quantize(
        dev,
        &mut packed,
        &mut absmax,
        &mut bad,
        &x,
        raw.dtype,
        n,
        blocksize,
    )?;
    drop(x); // freed in stream order, after the kernel
    let first_bad = dev.download(&bad)?[0];
    if first_bad != u64::MAX {
        let i = first_bad as usize;
        let v = raw.get_f32(i).unwrap_or(f32::NAN);
        return Err(Error::InvalidArg(format!(
            "non-finite weight {v} at flat index {i}"
        )));
    }
    let scales;
    let host_scales;
    if double_quant {
        host_scales = compress_absmax(&dev.download(&absmax)?);
        scales = Scales::Host(&host_scales);
    } else {
        scales = Scales::Device(absmax);
    }
    DeviceNf4::from_parts(dev, (rows, cols), blocksize, packed, scales).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel clamps the absmax at `NF4Q_MIN_ABSMAX_BITS`: the bits of the spec's `1e-38`
    /// (a subnormal f32).
    #[test]
    fn kernel_constants_match_the_spec() {
        let src = include_str!("../../../kernels/nf4_quantize.cu");
        assert_eq!(1e-38f32.to_bits(), 0x006c_e3ee);
        assert!(1e-38f32.is_subnormal());
        assert!(src.contains("#define NF4Q_MIN_ABSMAX_BITS 0x006ce3eeu"));
        assert_eq!(kernel_for(DType::BF16), Some(("nf4_quantize_bf16", 2)));
        assert_eq!(kernel_for(DType::I8), None);
    }
}
