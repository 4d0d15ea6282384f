//! Launchers of `kernels/adamw.cu`: paged AdamW on the device. PLACEHOLDER: to be written.

use super::runtime::CudaDevice;
use crate::error::{Error, Result};
use crate::train::{AdamParamState, AdamW};
use cudarc::driver::CudaSlice;

/// AdamW states of a list of tensors on the device.
pub struct DeviceAdamW {
    sizes: Vec<usize>,
    paged: bool,
}

impl DeviceAdamW {
    /// Zero moments, step 0, for tensors of `sizes`; managed (pageable) memory when `paged`.
    pub fn new(_dev: &CudaDevice, sizes: &[usize], paged: bool) -> Result<Self> {
        let _ = DeviceAdamW {
            sizes: sizes.to_vec(),
            paged,
        };
        Err(Error::Backend("device AdamW: not written yet".into()))
    }

    /// Replaces the states with host ones (same sizes, in order).
    pub fn upload_state(&mut self, _dev: &CudaDevice, _states: &[AdamParamState]) -> Result<()> {
        Err(Error::Backend("device AdamW: not written yet".into()))
    }

    /// The states as host vectors, in order.
    pub fn download_state(&self, _dev: &CudaDevice) -> Result<Vec<AdamParamState>> {
        Err(Error::Backend("device AdamW: not written yet".into()))
    }

    /// Global norm, clip, update (see `TrainBackend::adamw_step`); returns the norm.
    pub fn step(
        &mut self,
        _dev: &CudaDevice,
        _params: &mut [&mut CudaSlice<f32>],
        _grads: &[&CudaSlice<f32>],
        _hyper: &AdamW,
        _lr: f64,
        _max_norm: f32,
    ) -> Result<f32> {
        Err(Error::Backend("device AdamW: not written yet".into()))
    }

    /// Device bytes of the states.
    pub fn nbytes(&self) -> usize {
        8 * self.sizes.iter().sum::<usize>()
    }

    /// Whether the states live in managed (pageable) memory.
    pub fn paged(&self) -> bool {
        self.paged
    }
}
