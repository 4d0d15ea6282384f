//! Launcher of `kernels/rmsnorm.cu` (CPU spec: `src/backend/cpu/rmsnorm.rs`):
//! `out[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) · weight`, one block per row.

use super::runtime::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

pub fn rmsnorm(
    dev: &CudaDevice,
    out: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    if x.len() < rows * dim || out.len() < rows * dim || weight.len() < dim {
        return Err(Error::Backend(format!(
            "rmsnorm: buffers too small for [{rows}, {dim}]"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = dev.function("rmsnorm", "rmsnorm_f32")?;
    let dim32 = dim as i32;
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream.launch_builder(&f);
    b.arg(out).arg(x).arg(weight).arg(&dim32).arg(&eps);
    // SAFETY: arguments match kernels/rmsnorm.cu's rmsnorm_f32; sizes checked above.
    unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("rmsnorm_f32: {e}")))?;
    Ok(())
}

/// RMSNorm backward with a frozen weight (CPU spec `cpu/backward/rmsnorm.rs`): writes `dx`.
/// PLACEHOLDER: to be written.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    _dev: &CudaDevice,
    _dx: &mut CudaSlice<f32>,
    _dy: &CudaSlice<f32>,
    _x: &CudaSlice<f32>,
    _weight: &CudaSlice<f32>,
    _rows: usize,
    _dim: usize,
    _eps: f32,
) -> Result<()> {
    Err(Error::Backend("rmsnorm backward: not written yet".into()))
}
