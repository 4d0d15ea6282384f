//! Check of the CUDA nf4_dx op(s) against the CPU specification. PLACEHOLDER: to be written.

use super::CheckRow;
use crate::backend::cuda::backend::CudaBackend;
use crate::error::Result;

/// Runs the checks; each row compares the device against the CPU spec.
pub fn run(_be: &CudaBackend) -> Result<Vec<CheckRow>> {
    Ok(Vec::new())
}
