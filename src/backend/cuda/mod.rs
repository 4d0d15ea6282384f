//! CUDA backend (feature `cuda`).
//!
//! The kernels and their launchers arrive with the CUDA issues; until then both builds answer a
//! request for the GPU with a clear error instead of silently falling back.

use crate::error::Error;

/// Why the CUDA backend cannot be used by this binary.
pub fn unavailable() -> Error {
    if cfg!(feature = "cuda") {
        Error::Backend(
            "the CUDA backend's kernels are not part of this version yet; use --device cpu".into(),
        )
    } else {
        Error::Backend(
            "this qlora was built without CUDA support; rebuild with `cargo build --release --features cuda`, or use --device cpu"
                .into(),
        )
    }
}
