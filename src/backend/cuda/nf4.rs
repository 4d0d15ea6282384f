//! Launchers of `kernels/nf4.cu`: NF4 weights resident on the device, dequantization
//! (bit-exact with [`crate::quant::dequantize_nf4`], to f32 or bf16) and the fused GEMV for
//! decoding (`y = x·dequant(W)ᵀ` for up to [`GEMV_MAX_M`] rows, W read once, decoded in
//! registers). The tensor-core GEMM over the same weights is in `nf4_gemm.rs`.

use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use crate::quant::{Absmax, Nf4Tensor};
use cudarc::driver::{CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};

/// Largest batch the GEMV kernel takes (its per-lane accumulator array).
pub const GEMV_MAX_M: usize = 8;

/// An NF4 tensor `[rows, cols]` on the device, in bitsandbytes' layout.
pub struct DeviceNf4 {
    pub rows: usize,
    pub cols: usize,
    pub(super) blocksize: usize,
    blocksize_log2: i32,
    packed: DevBuf<u8>,
    /// f32 scales, or a 1-element placeholder with double quantization.
    absmax: DevBuf<f32>,
    double_quant: bool,
    q: DevBuf<u8>,
    nested_absmax: DevBuf<f32>,
    nested_code: DevBuf<f32>,
    offset: f32,
    pub(super) nested_blocksize: i32,
}

/// Per-block scales of a [`DeviceNf4`] being assembled by [`DeviceNf4::from_parts`].
pub enum Scales<'a> {
    /// One f32 absmax per block, already on the device.
    Device(DevBuf<f32>),
    /// Scales on the host (f32 or double-quantized), uploaded as they are.
    Host(&'a Absmax),
}

impl DeviceNf4 {
    /// The packed codes (their address identifies the weight, `Backend::linear_addr`).
    pub(super) fn packed(&self) -> &DevBuf<u8> {
        &self.packed
    }

    /// Uploads a 2-D NF4 tensor (double-quantized scales stay in their 8-bit form).
    pub fn upload(dev: &CudaDevice, t: &Nf4Tensor) -> Result<Self> {
        t.validate()?;
        if t.shape.len() != 2 {
            return Err(Error::Backend(format!(
                "NF4 weight must be 2-D, got {:?}",
                t.shape
            )));
        }
        let packed = dev.upload(&t.packed)?;
        Self::from_parts(
            dev,
            (t.shape[0], t.shape[1]),
            t.blocksize,
            packed,
            Scales::Host(&t.absmax),
        )
    }

    /// A weight `[rows, cols]` from codes already on the device (`ceil(rows·cols / 2)` bytes in
    /// bitsandbytes' layout) and its scales, one per block of `blocksize` (a power of two).
    pub fn from_parts(
        dev: &CudaDevice,
        (rows, cols): (usize, usize),
        blocksize: usize,
        packed: DevBuf<u8>,
        scales: Scales<'_>,
    ) -> Result<Self> {
        let n = rows * cols;
        let nblocks = n.div_ceil(blocksize.max(1));
        let count = match &scales {
            Scales::Device(a) => a.len(),
            Scales::Host(a) => a.len(),
        };
        if !blocksize.is_power_of_two() || packed.len() != n.div_ceil(2) || count != nblocks {
            return Err(Error::Backend(format!(
                "NF4 weight [{rows}, {cols}] in blocks of {blocksize}: needs {} packed bytes and {nblocks} scales, got {} and {count}",
                n.div_ceil(2),
                packed.len()
            )));
        }
        let one_f = || dev.upload(&[0f32]);
        let one_u = || dev.upload(&[0u8]);
        let (absmax, double_quant, q, nested_absmax, nested_code, offset, nested_blocksize) =
            match scales {
                Scales::Device(a) => (a, false, one_u()?, one_f()?, one_f()?, 0.0, 1),
                Scales::Host(Absmax::F32(v)) => {
                    (dev.upload(v)?, false, one_u()?, one_f()?, one_f()?, 0.0, 1)
                }
                Scales::Host(Absmax::Double {
                    q,
                    offset,
                    nested_absmax,
                    nested_code,
                    nested_blocksize,
                }) => (
                    one_f()?,
                    true,
                    dev.upload(q)?,
                    dev.upload(nested_absmax)?,
                    dev.upload(nested_code)?,
                    *offset,
                    *nested_blocksize as i32,
                ),
            };
        Ok(DeviceNf4 {
            rows,
            cols,
            blocksize,
            blocksize_log2: blocksize.trailing_zeros() as i32,
            packed,
            absmax,
            double_quant,
            q,
            nested_absmax,
            nested_code,
            offset,
            nested_blocksize,
        })
    }

    /// Copies the weight back to the host, in the form [`DeviceNf4::upload`] takes (checks).
    pub fn download(&self, dev: &CudaDevice) -> Result<Nf4Tensor> {
        let n = self.rows * self.cols;
        let nblocks = n.div_ceil(self.blocksize);
        fn take<T>(mut v: Vec<T>, len: usize) -> Vec<T> {
            v.truncate(len);
            v
        }
        let absmax = if self.double_quant {
            Absmax::Double {
                q: take(dev.download(&self.q)?, nblocks),
                offset: self.offset,
                nested_absmax: dev.download(&self.nested_absmax)?,
                nested_code: dev.download(&self.nested_code)?,
                nested_blocksize: self.nested_blocksize as usize,
            }
        } else {
            Absmax::F32(take(dev.download(&self.absmax)?, nblocks))
        };
        Ok(Nf4Tensor {
            shape: vec![self.rows, self.cols],
            blocksize: self.blocksize,
            packed: take(dev.download(&self.packed)?, n.div_ceil(2)),
            absmax,
        })
    }

    /// Device bytes of the weight (packed codes and scales).
    pub fn nbytes(&self) -> usize {
        self.packed.len() + 4 * self.absmax.len() + self.q.len() + 4 * self.nested_absmax.len()
    }

    /// Pushes the weight's arguments in the order every NF4 kernel takes them: `packed, dq,
    /// absmax, q, nested_absmax, nested_code, offset, nested_blocksize, blocksize_log2`.
    pub(super) fn push_args<'a>(&'a self, b: &mut LaunchArgs<'a>, dq: &'a i32) {
        b.arg(&*self.packed)
            .arg(dq)
            .arg(&*self.absmax)
            .arg(&*self.q)
            .arg(&*self.nested_absmax)
            .arg(&*self.nested_code)
            .arg(&self.offset)
            .arg(&self.nested_blocksize)
            .arg(&self.blocksize_log2);
    }

    /// `1` with double-quantized scales, else `0` (the kernels' `dq` argument).
    pub(super) fn dq_flag(&self) -> i32 {
        self.double_quant as i32
    }

    /// Writes `dequant(W)` (`rows · cols` f32) into `out`.
    pub fn dequantize(&self, dev: &CudaDevice, out: &mut CudaSlice<f32>) -> Result<()> {
        let n = (self.rows * self.cols) as i64;
        if out.len() < n as usize {
            return Err(Error::Backend(format!(
                "nf4 dequantize: output holds {} values, needs {n}",
                out.len()
            )));
        }
        let f = dev.function("nf4", "nf4_dequant_f32")?;
        let dq = self.dq_flag();
        // One thread per run of 8 elements (see kernels/nf4.cu).
        let cfg = super::ops::grid((n as usize).div_ceil(8));
        let mut b = dev.stream.launch_builder(&f);
        b.arg(out);
        self.push_args(&mut b, &dq);
        b.arg(&n);
        // SAFETY: the argument list matches the kernel's signature in kernels/nf4.cu; every
        // buffer holds what the kernel indexes (checked above and by `Nf4Tensor::validate`).
        unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("nf4_dequant_f32: {e}")))?;
        Ok(())
    }

    /// `y[m, rows] (+)= x[m, cols] · dequant(W)ᵀ` for `m ≤ GEMV_MAX_M`; `accumulate` adds to
    /// `y` (a fused residual add) instead of overwriting it.
    pub fn gemv(
        &self,
        dev: &CudaDevice,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        if m > GEMV_MAX_M {
            return Err(Error::Backend(format!(
                "nf4 gemv takes 0..={GEMV_MAX_M} rows, got {m}"
            )));
        }
        if m == 0 || self.rows == 0 {
            return Ok(()); // nothing to compute, as on the CPU
        }
        if x.len() < m * self.cols || y.len() < m * self.rows {
            return Err(Error::Backend(format!(
                "nf4 gemv: buffers too small for [{m}, {}] · [{}, {}]ᵀ",
                self.cols, self.rows, self.cols
            )));
        }
        // The bandwidth kernel needs whole 32-element runs inside one quantization block.
        let fast = self.cols % 32 == 0 && self.blocksize >= 32;
        let (name, rows_per_block, threads) = if fast {
            ("nf4_gemv_f32_k32", 16, 128)
        } else {
            ("nf4_gemv_f32", 8, 256)
        };
        let f = dev.function("nf4", name)?;
        let (dq, m32, acc) = (self.dq_flag(), m as i32, accumulate as i32);
        let (rows, cols) = (self.rows as i64, self.cols as i64);
        let cfg = LaunchConfig {
            grid_dim: ((self.rows as u32).div_ceil(rows_per_block), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = dev.stream.launch_builder(&f);
        b.arg(y).arg(x);
        self.push_args(&mut b, &dq);
        b.arg(&m32).arg(&rows).arg(&cols).arg(&acc);
        // SAFETY: arguments match kernels/nf4.cu's nf4_gemv_f32 / nf4_gemv_f32_k32 (same
        // signature); sizes checked above; the k32 kernel's alignment needs hold when `fast`.
        unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("{name}: {e}")))?;
        Ok(())
    }
}
