//! Launchers of `kernels/flash_attention.cu`: causal GQA attention forward (saving the per-row
//! log-sum-exp) and backward for training. PLACEHOLDER: to be written.

use super::runtime::CudaDevice;
use crate::backend::AttnShape;
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// Forward: writes `out` `[B, T, H, D]` and `lse` `[B, T, H]` (see `TrainBackend::attention_train`).
pub fn forward(
    _dev: &CudaDevice,
    _out: &mut CudaSlice<f32>,
    _lse: &mut CudaSlice<f32>,
    _q: &CudaSlice<f32>,
    _k: &CudaSlice<f32>,
    _v: &CudaSlice<f32>,
    _s: AttnShape,
) -> Result<()> {
    Err(Error::Backend(
        "flash attention forward: not written yet".into(),
    ))
}

/// Backward: writes `dq`, `dk`, `dv` from `dout`, the inputs and the forward's `out`, `lse`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    _dev: &CudaDevice,
    _dq: &mut CudaSlice<f32>,
    _dk: &mut CudaSlice<f32>,
    _dv: &mut CudaSlice<f32>,
    _dout: &CudaSlice<f32>,
    _q: &CudaSlice<f32>,
    _k: &CudaSlice<f32>,
    _v: &CudaSlice<f32>,
    _out: &CudaSlice<f32>,
    _lse: &CudaSlice<f32>,
    _s: AttnShape,
) -> Result<()> {
    Err(Error::Backend(
        "flash attention backward: not written yet".into(),
    ))
}
