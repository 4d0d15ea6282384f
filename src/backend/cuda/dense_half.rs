//! Launchers of `kernels/dense_half.cu`: dense projection weights kept on the device as 16-bit
//! values (bf16 or f16) when that loses nothing — a bf16 or f16 checkpoint widened to f32 on
//! the host narrows back exactly — which halves their memory and the bytes a decode step reads
//! (Llama-2-7B's lm_head: 500 MiB in f32, 250 MiB here). Decoding (≤ 8 rows) runs the
//! 16-bit-weight GEMV with f32 activations, so it is exact like the f32 path; prefill rounds
//! the activations to the weight's format and calls `cublasGemmEx` (f32 accumulation).

use super::nf4_gemm::{gemm_half_cublas, Bf16Scratch};
use super::ops::to_half;
use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// Largest batch the 16-bit GEMV takes.
pub const HALF_GEMV_MAX_M: usize = 8;

/// A dense `[rows, cols]` weight stored as 16-bit values on the device.
pub struct DeviceHalf {
    pub rows: usize,
    pub cols: usize,
    /// f16 storage (else bf16).
    pub f16: bool,
    pub(super) w: DevBuf<u16>,
}

impl DeviceHalf {
    /// Uploads `data` as bf16 or f16 if every value survives the round trip exactly and
    /// `cols % 8 == 0` (the GEMV's 16-byte loads); `None` otherwise (keep it in f32).
    pub fn lossless(
        dev: &CudaDevice,
        rows: usize,
        cols: usize,
        data: &[f32],
    ) -> Result<Option<Self>> {
        if cols % 8 != 0 || data.is_empty() {
            return Ok(None);
        }
        let as_bf16 = |v: &f32| bf16::from_f32(*v);
        let as_f16 = |v: &f32| f16::from_f32(*v);
        let (bits, is_f16): (Vec<u16>, bool) = if data
            .iter()
            .all(|v| as_bf16(v).to_f32().to_bits() == v.to_bits())
        {
            (data.iter().map(|v| as_bf16(v).to_bits()).collect(), false)
        } else if data
            .iter()
            .all(|v| as_f16(v).to_f32().to_bits() == v.to_bits())
        {
            (data.iter().map(|v| as_f16(v).to_bits()).collect(), true)
        } else {
            return Ok(None);
        };
        Ok(Some(DeviceHalf {
            rows,
            cols,
            f16: is_f16,
            w: dev.upload(&bits)?,
        }))
    }

    /// A bf16 copy of the device f32 matrix `x` `[rows, cols]` (each value rounded to nearest
    /// even, on the device): the frozen-adapter copies of `Backend::lora_inference_copy`. Unlike
    /// [`DeviceHalf::lossless`], `cols` need not be a multiple of 8 ([`DeviceHalf::gemv`]
    /// refuses such a weight). `None` for an empty matrix.
    pub fn bf16_of(
        dev: &CudaDevice,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self>> {
        let n = rows * cols;
        if n == 0 {
            return Ok(None);
        }
        let mut w = dev.zeros::<u16>(n)?;
        to_half(dev, &mut w, x, n, false)?;
        Ok(Some(DeviceHalf {
            rows,
            cols,
            f16: false,
            w,
        }))
    }

    /// Device bytes of the weight.
    pub fn nbytes(&self) -> usize {
        2 * self.w.len()
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ` for `m ≤ HALF_GEMV_MAX_M` (f32 activations and sums).
    pub fn gemv(
        &self,
        dev: &CudaDevice,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        m: usize,
    ) -> Result<()> {
        if m > HALF_GEMV_MAX_M {
            return Err(Error::Backend(format!(
                "16-bit gemv takes 0..={HALF_GEMV_MAX_M} rows, got {m}"
            )));
        }
        self.check(y.len(), x.len(), m)?;
        if self.cols % 8 != 0 {
            return Err(Error::Backend(format!(
                "16-bit gemv needs in_features % 8 == 0 (16-byte loads), got {}",
                self.cols
            )));
        }
        if m == 0 || self.rows == 0 {
            return Ok(()); // nothing to compute, as on the CPU
        }
        let name = if self.f16 {
            "gemv_f16w_f32"
        } else {
            "gemv_bf16w_f32"
        };
        let f = dev.function("dense_half", name)?;
        let (m32, n, k) = (m as i32, self.rows as i64, self.cols as i64);
        let cfg = LaunchConfig {
            grid_dim: ((self.rows as u32).div_ceil(16), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = dev.stream.launch_builder(&f);
        b.arg(y).arg(x).arg(&*self.w).arg(&m32).arg(&n).arg(&k);
        // SAFETY: matches gemv_{bf16,f16}w_f32(float*, const float*, const uint16_t*, int,
        // int64_t, int64_t); sizes checked; cols % 8 == 0 (checked at upload) aligns the loads.
        unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("{name}: {e}")))?;
        Ok(())
    }

    /// `y[m, rows] = half(x)[m, cols] · Wᵀ` through cuBLAS (activations rounded to W's format).
    pub fn gemm(
        &self,
        dev: &CudaDevice,
        blas: &CudaBlas,
        scratch: &mut Bf16Scratch,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        m: usize,
    ) -> Result<()> {
        self.check(y.len(), x.len(), m)?;
        let n = m * self.cols;
        let xs = scratch.x_scratch(dev, n)?;
        to_half(dev, xs, x, n, self.f16)?;
        gemm_half_cublas(
            blas,
            &dev.stream,
            y,
            xs,
            &self.w,
            m,
            self.cols,
            self.rows,
            self.f16,
        )
    }

    fn check(&self, y: usize, x: usize, m: usize) -> Result<()> {
        if x < m * self.cols || y < m * self.rows {
            return Err(Error::Backend(format!(
                "16-bit matmul: buffers too small for [{m}, {}] · [{}, {}]ᵀ",
                self.cols, self.rows, self.cols
            )));
        }
        Ok(())
    }
}
