//! Launcher of `kernels/dropout.cu`. PLACEHOLDER: to be written.

use super::runtime::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::CudaSlice;

/// `keep[i]` = element `offset + i` of the mask `(seed, p)` (see `cpu/dropout.rs`).
pub fn dropout_mask(
    _dev: &CudaDevice,
    _keep: &mut CudaSlice<f32>,
    _len: usize,
    _p: f32,
    _seed: u64,
    _offset: u64,
) -> Result<()> {
    Err(Error::Backend("dropout mask: not written yet".into()))
}
