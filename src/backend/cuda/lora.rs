//! LoRA adapter term and its backward on the device. PLACEHOLDER: to be written.

use super::runtime::CudaDevice;
use crate::backend::LoraShape;
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;

/// bf16 staging buffers of the LoRA products, grown on demand and reused.
#[derive(Default)]
pub struct LoraScratch {}

/// `xa = (x ⊙ keep)·Aᵀ` (written), `y += scale · xa·Bᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_add(
    _dev: &CudaDevice,
    _blas: &CudaBlas,
    _scratch: &mut LoraScratch,
    _y: &mut CudaSlice<f32>,
    _xa: &mut CudaSlice<f32>,
    _x: &CudaSlice<f32>,
    _keep: Option<&CudaSlice<f32>>,
    _a: &CudaSlice<f32>,
    _b: &CudaSlice<f32>,
    _scale: f32,
    _sh: LoraShape,
) -> Result<()> {
    Err(Error::Backend("LoRA forward: not written yet".into()))
}

/// Accumulates `dA`, `dB` and the adapter's share of `dx` (see `cpu/backward/lora.rs`).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    _dev: &CudaDevice,
    _blas: &CudaBlas,
    _scratch: &mut LoraScratch,
    _dx: &mut CudaSlice<f32>,
    _da: &mut CudaSlice<f32>,
    _db: &mut CudaSlice<f32>,
    _dy: &CudaSlice<f32>,
    _x: &CudaSlice<f32>,
    _keep: Option<&CudaSlice<f32>>,
    _xa: &CudaSlice<f32>,
    _a: &CudaSlice<f32>,
    _b: &CudaSlice<f32>,
    _scale: f32,
    _sh: LoraShape,
) -> Result<()> {
    Err(Error::Backend("LoRA backward: not written yet".into()))
}
