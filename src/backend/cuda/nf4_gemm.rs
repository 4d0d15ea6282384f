//! Launchers of `kernels/nf4_gemm.cu` (the fused NF4 tensor-core GEMM, bf16 inputs and f32
//! accumulation) and of its baseline, "dequantize to a bf16 scratch weight, then cuBLAS bf16
//! GEMM" (`nf4_dequant_bf16` + `f32_to_bf16` + `cublasGemmEx`). Both compute
//! `y[m, n] = Σ_k bf16(x[m, k]) · bf16(dequant(W)[n, k])` with f32 sums; the CPU spec is
//! [`crate::backend::cpu::nf4_gemm_bf16`].

use super::nf4::DeviceNf4;
use super::ops::{grid, to_half};
use super::runtime::{CudaDevice, DevBuf};
use crate::error::{Error, Result};
use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// Largest `m` the small-tile configuration (32×64 tiles) handles; above it 128×128 tiles.
const SMALL_TILE_MAX_M: usize = 64;

fn check_sizes(w: &DeviceNf4, y: usize, x: usize, m: usize, what: &str) -> Result<()> {
    if x < m * w.cols || y < m * w.rows {
        return Err(Error::Backend(format!(
            "{what}: buffers too small for [{m}, {}] · [{}, {}]ᵀ",
            w.cols, w.rows, w.cols
        )));
    }
    Ok(())
}

impl DeviceNf4 {
    /// Whether the fused GEMM takes this weight: `cols % 16 == 0` and `blocksize >= 16`, so
    /// every 16-element run of a row lies in one quantization block (all Llama shapes).
    pub fn gemm_supported(&self) -> bool {
        self.cols % 16 == 0 && self.blocksize >= 16
    }

    /// Fused tensor-core product `y[m, rows] (+)= x[m, cols] · dequant(W)ᵀ` with bf16 inputs and
    /// f32 accumulation; `accumulate` adds to `y` instead of overwriting it (residual fusion).
    pub fn gemm(
        &self,
        dev: &CudaDevice,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        m: usize,
        accumulate: bool,
    ) -> Result<()> {
        if !self.gemm_supported() {
            return Err(Error::Backend(format!(
                "nf4 gemm needs cols % 16 == 0 and blocksize >= 16, got [{}, {}] blocksize {}",
                self.rows, self.cols, self.blocksize
            )));
        }
        check_sizes(self, y.len(), x.len(), m, "nf4 gemm")?;
        if m == 0 || self.rows == 0 {
            return Ok(());
        }
        let (name, bm, bn, threads) = if m <= SMALL_TILE_MAX_M {
            ("nf4_gemm_bf16_32x64", 32, 64, 128)
        } else {
            ("nf4_gemm_bf16_128x128", 128, 128, 256)
        };
        let grid_y = m.div_ceil(bm);
        if grid_y > 65_535 || m > i32::MAX as usize || self.rows > i32::MAX as usize {
            return Err(Error::Backend(format!(
                "nf4 gemm: {m} rows is more than one launch takes"
            )));
        }
        let f = dev.function("nf4_gemm", name)?;
        let dq = self.dq_flag();
        let (m32, n32, k32, acc) = (
            m as i32,
            self.rows as i32,
            self.cols as i32,
            accumulate as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (self.rows.div_ceil(bn) as u32, grid_y as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = dev.stream.launch_builder(&f);
        b.arg(y).arg(x);
        self.push_args(&mut b, &dq);
        b.arg(&m32).arg(&n32).arg(&k32).arg(&acc);
        // SAFETY: arguments match NF4_GEMM_ARGS in kernels/nf4_gemm.cu; sizes checked above;
        // cols % 16 == 0 and whole allocations (256-byte aligned) give the kernel's alignment.
        unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("{name}: {e}")))?;
        Ok(())
    }

    /// Writes `bf16(dequant(W))` (`rows · cols` values, bf16 bits) into `out`.
    pub fn dequantize_bf16(&self, dev: &CudaDevice, out: &mut CudaSlice<u16>) -> Result<()> {
        let n = self.rows * self.cols;
        if out.len() < n {
            return Err(Error::Backend(format!(
                "nf4 dequantize_bf16: output holds {} values, needs {n}",
                out.len()
            )));
        }
        let f = dev.function("nf4", "nf4_dequant_bf16")?;
        let (dq, n64) = (self.dq_flag(), n as i64);
        let mut b = dev.stream.launch_builder(&f);
        b.arg(out);
        self.push_args(&mut b, &dq);
        b.arg(&n64);
        // SAFETY: matches nf4_dequant_bf16 in kernels/nf4.cu; `out` holds n values. One thread
        // per run of 8 elements.
        unsafe { b.launch(grid(n.div_ceil(8))) }
            .map_err(|e| Error::Backend(format!("nf4_dequant_bf16: {e}")))?;
        Ok(())
    }
}

/// `y[m, n] = x_bf16[m, k] · w_bf16[n, k]ᵀ` with f32 output and f32 compute through
/// `cublasGemmEx` (row-major operands mapped as in [`super::ops::gemm_wt`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_cublas(
    blas: &CudaBlas,
    stream: &cudarc::driver::CudaStream,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<u16>,
    w: &CudaSlice<u16>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    gemm_half_cublas(blas, stream, y, x, w, m, k, n, false)
}

/// [`gemm_bf16_cublas`] for 16-bit operands of either kind: bf16, or f16 when `f16`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_half_cublas(
    blas: &CudaBlas,
    stream: &cudarc::driver::CudaStream,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<u16>,
    w: &CudaSlice<u16>,
    m: usize,
    k: usize,
    n: usize,
    f16: bool,
) -> Result<()> {
    if y.len() < m * n || x.len() < m * k || w.len() < n * k {
        return Err(Error::Backend(format!(
            "cuBLAS bf16 gemm: buffers too small for [{m}, {k}] · [{n}, {k}]ᵀ"
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let (alpha, beta) = (1f32, 0f32);
    let (wp, _rw) = w.device_ptr(stream);
    let (xp, _rx) = x.device_ptr(stream);
    let (yp, _ry) = y.device_ptr_mut(stream);
    use blas_sys::cublasOperation_t as Op;
    use blas_sys::cudaDataType_t as Ty;
    let half = if f16 { Ty::CUDA_R_16F } else { Ty::CUDA_R_16BF };
    // SAFETY: the pointers come from live allocations holding the sizes checked above; the
    // handle is bound to `stream` (CudaBlas::new) and the guards keep the buffers' events
    // ordered until the call returns.
    unsafe {
        blas_result::gemm_ex(
            *blas.handle(),
            Op::CUBLAS_OP_T,
            Op::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            wp as *const _,
            half,
            k as i32,
            xp as *const _,
            half,
            k as i32,
            (&beta) as *const f32 as *const _,
            yp as *mut _,
            Ty::CUDA_R_32F,
            n as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Backend(format!("cuBLAS 16-bit gemm: {e}")))
}

/// Scratch buffers of the dequantize + cuBLAS baseline, grown on demand and reused.
#[derive(Default)]
pub struct Bf16Scratch {
    pub(super) w: Option<DevBuf<u16>>,
    pub(super) x: Option<DevBuf<u16>>,
}

impl Bf16Scratch {
    /// The activation scratch, at least `len` values (16-bit).
    pub fn x_scratch(&mut self, dev: &CudaDevice, len: usize) -> Result<&mut DevBuf<u16>> {
        dev.grown(&mut self.x, len)
    }

    /// The baseline product: dequantize W to bf16, round x to bf16, cuBLAS bf16 GEMM (f32 out).
    pub fn gemm(
        &mut self,
        dev: &CudaDevice,
        blas: &CudaBlas,
        w: &DeviceNf4,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        m: usize,
    ) -> Result<()> {
        check_sizes(w, y.len(), x.len(), m, "nf4 dequant + cuBLAS")?;
        let ws = dev.grown(&mut self.w, w.rows * w.cols)?;
        w.dequantize_bf16(dev, ws)?;
        let xs = dev.grown(&mut self.x, m * w.cols)?;
        to_half(dev, xs, x, m * w.cols, false)?;
        let ws = self.w.as_ref().expect("grown above");
        gemm_bf16_cublas(blas, &dev.stream, y, xs, ws, m, w.cols, w.rows)
    }
}
