//! Launchers of `kernels/nf4_gemm_dx.cu`: the backward product `dx = dy · W` of a frozen
//! projection, NF4 decoded in the tile loader, bf16 tensor cores, f32 accumulation; and its
//! baselines. PLACEHOLDER: to be written.

use super::dense_half::DeviceHalf;
use super::nf4::DeviceNf4;
use super::nf4_gemm::Bf16Scratch;
use super::runtime::CudaDevice;
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;

impl DeviceNf4 {
    /// Whether the fused dx kernel takes this weight.
    pub fn gemm_dx_supported(&self) -> bool {
        false
    }

    /// `dx[m, cols] (+)= dy[m, rows] · dequant(W)` (bf16 operands, f32 accumulation).
    pub fn gemm_dx(
        &self,
        _dev: &CudaDevice,
        _dx: &mut CudaSlice<f32>,
        _dy: &CudaSlice<f32>,
        _m: usize,
        _accumulate: bool,
    ) -> Result<()> {
        Err(Error::Backend("nf4 gemm dx: not written yet".into()))
    }
}

impl Bf16Scratch {
    /// Baseline: dequantize W to bf16, round dy to bf16, cuBLAS bf16 GEMM `dx (+)= dy · W`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_dx(
        &mut self,
        _dev: &CudaDevice,
        _blas: &CudaBlas,
        _w: &DeviceNf4,
        _dx: &mut CudaSlice<f32>,
        _dy: &CudaSlice<f32>,
        _m: usize,
        _accumulate: bool,
    ) -> Result<()> {
        Err(Error::Backend(
            "nf4 dequant + cuBLAS dx: not written yet".into(),
        ))
    }
}

impl DeviceHalf {
    /// `dx[m, cols] (+)= dy[m, rows] · W` for a 16-bit dense weight (cuBLAS, f32 accumulation).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_dx(
        &self,
        _dev: &CudaDevice,
        _blas: &CudaBlas,
        _scratch: &mut Bf16Scratch,
        _dx: &mut CudaSlice<f32>,
        _dy: &CudaSlice<f32>,
        _m: usize,
        _accumulate: bool,
    ) -> Result<()> {
        Err(Error::Backend("16-bit dense dx: not written yet".into()))
    }
}
