//! Launcher of `kernels/cross_entropy.cu` (CPU spec: `cross_entropy_fused` in
//! `src/backend/cpu/backward/cross_entropy.rs`): per row, the loss `logsumexp(z) − z[t]` and, in
//! place over the logits, the gradient `scale · (softmax(z) − onehot(t))`; rows whose target is
//! `−100` get a zero loss and a zero gradient row. One block of 512 threads per row.

use super::runtime::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// `CE_THREADS` in `kernels/cross_entropy.cu` (its `__launch_bounds__`).
const THREADS: u32 = 512;

/// The first target that is neither `−100` nor a token id below `vocab`.
fn bad_target(targets: &[i32], vocab: usize) -> Option<i32> {
    targets
        .iter()
        .copied()
        .find(|&t| t != -100 && (t < 0 || t as usize >= vocab))
}

/// Fused loss + gradient in place (see `TrainBackend::cross_entropy_fused`): `logits`
/// `[rows, vocab]` becomes `dlogits`, `losses[..rows]` the unscaled per-row losses, with
/// `rows = targets.len()` (0: nothing to do). The caller validates the targets; they are checked
/// again here because the kernel indexes the row with them.
pub fn cross_entropy_fused(
    dev: &CudaDevice,
    logits: &mut CudaSlice<f32>,
    losses: &mut CudaSlice<f32>,
    targets: &[i32],
    vocab: usize,
    scale: f32,
) -> Result<()> {
    let rows = targets.len();
    if logits.len() < rows * vocab || losses.len() < rows {
        return Err(Error::Backend(format!(
            "fused cross-entropy: buffers too small for [{rows}, {vocab}] (logits {}, losses {})",
            logits.len(),
            losses.len()
        )));
    }
    if let Some(t) = bad_target(targets, vocab) {
        return Err(Error::Backend(format!(
            "fused cross-entropy: target {t} is neither -100 nor below the vocabulary {vocab}"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let Ok(grid) = i32::try_from(rows) else {
        return Err(Error::Backend(format!(
            "fused cross-entropy: {rows} rows exceed the grid limit"
        )));
    };
    let td = dev.upload(targets)?;
    let f = dev.function("cross_entropy", "cross_entropy_fused_f32")?;
    let v64 = vocab as i64;
    let cfg = LaunchConfig {
        grid_dim: (grid as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream.launch_builder(&f);
    b.arg(logits).arg(losses).arg(&*td).arg(&v64).arg(&scale);
    // SAFETY: matches cross_entropy_fused_f32(float*, float*, const int32_t*, int64_t, float);
    // logits holds rows·vocab values and losses rows (checked above), the grid has one block per
    // row, every target is −100 or in [0, vocab) (checked above) and td holds rows of them; the
    // block size is the kernel's launch bound. `td` lives until after the launch is queued and
    // is freed in stream order.
    unsafe { b.launch(cfg) }
        .map_err(|e| Error::Backend(format!("cross_entropy_fused_f32: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_ignored_or_token_ids() {
        assert_eq!(bad_target(&[], 10), None);
        assert_eq!(bad_target(&[0, 9, -100, 3], 10), None);
        assert_eq!(bad_target(&[0, 10], 10), Some(10));
        assert_eq!(bad_target(&[-1], 10), Some(-1));
        assert_eq!(bad_target(&[-100, -101], 10), Some(-101));
        assert_eq!(bad_target(&[0], 0), Some(0));
    }
}
