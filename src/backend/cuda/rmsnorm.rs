//! Launchers of `kernels/rmsnorm.cu`, one block per row: the forward (CPU spec
//! `src/backend/cpu/rmsnorm.rs`) `out[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) · weight`,
//! and its backward with a frozen weight (CPU spec `src/backend/cpu/backward/rmsnorm.rs`).

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

/// RMSNorm backward with a frozen weight (CPU spec `cpu/backward/rmsnorm.rs`): writes
/// `dx[r, k] = w[k]·dy[r, k]/rms_r − x[r, k]·(Σ_j w[j]·dy[r, j]·x[r, j]) / (dim·rms_r³)`, one block
/// of 256 threads per row (`rmsnorm_backward_f32`). `dx` is written, not accumulated.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dev: &CudaDevice,
    dx: &mut CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    x: &CudaSlice<f32>,
    weight: &CudaSlice<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    let n = rows * dim;
    if dx.len() < n || dy.len() < n || x.len() < n || weight.len() < dim {
        return Err(Error::Backend(format!(
            "rmsnorm backward: buffers too small for [{rows}, {dim}] (dx {}, dy {}, x {}, weight {})",
            dx.len(),
            dy.len(),
            x.len(),
            weight.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let (Ok(grid), Ok(dim32)) = (i32::try_from(rows), i32::try_from(dim)) else {
        return Err(Error::Backend(format!(
            "rmsnorm backward: [{rows}, {dim}] exceeds the launch limits"
        )));
    };
    let f = dev.function("rmsnorm", "rmsnorm_backward_f32")?;
    let cfg = LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (256, 1, 1), // RMS_BWD_THREADS
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream.launch_builder(&f);
    b.arg(dx).arg(dy).arg(x).arg(weight).arg(&dim32).arg(&eps);
    // SAFETY: arguments match kernels/rmsnorm.cu's rmsnorm_backward_f32(float*, const float*×3,
    // int, float); every buffer holds at least rows·dim (weight: dim) values, checked above, and
    // the grid has one block per row. dx is a distinct &mut, so it aliases neither dy nor x.
    unsafe { b.launch(cfg) }.map_err(|e| Error::Backend(format!("rmsnorm_backward_f32: {e}")))?;
    Ok(())
}
