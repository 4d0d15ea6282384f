//! CUDA backend (feature `cuda`).
//!
//! Built so far: the device runtime (`runtime.rs`: driver check, capability check, embedded
//! kernel modules, allocations with out-of-memory messages) and the first kernels with their
//! launchers (`nf4.rs`: dequantize + fused GEMV; `rmsnorm.rs`), tested against the CPU spec in
//! `tests/cuda_ops.rs` when a GPU is present. The `Backend` implementation is not complete yet,
//! so `--device cuda` still answers with a clear error instead of silently falling back.

use crate::error::Error;

#[cfg(feature = "cuda")]
pub mod nf4;
#[cfg(feature = "cuda")]
pub mod rmsnorm;
#[cfg(feature = "cuda")]
pub mod runtime;

/// Why the CUDA backend cannot be used by this binary.
pub fn unavailable() -> Error {
    if cfg!(feature = "cuda") {
        Error::Backend(
            "the CUDA backend is incomplete in this version (runtime and first kernels only); use --device cpu".into(),
        )
    } else {
        Error::Backend(
            "this qlora was built without CUDA support; rebuild with `cargo build --release --features cuda`, or use --device cpu"
                .into(),
        )
    }
}

/// The fatbins build.rs compiled from `kernels/*.cu`: (module name, bytes).
#[cfg(feature = "cuda")]
pub fn kernel_modules() -> &'static [(&'static str, &'static [u8])] {
    mod embedded {
        include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
    }
    embedded::KERNELS
}

/// Whether the CUDA driver library can be loaded on this machine (never panics).
pub fn driver_present() -> bool {
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only attempts to dlopen libcuda and reports whether that worked; it touches no
        // driver state. cudarc panics on first use when libcuda is absent, so this check must
        // come before any other cudarc call.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    #[test]
    fn every_kernel_is_embedded() {
        let names: Vec<&str> = super::kernel_modules().iter().map(|(n, _)| *n).collect();
        for m in ["elementwise", "nf4", "rmsnorm"] {
            assert!(names.contains(&m), "{names:?}");
        }
        assert!(super::kernel_modules().iter().all(|(_, b)| b.len() > 1000));
    }
}
