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
        assert!(names.contains(&"elementwise"), "{names:?}");
        assert!(super::kernel_modules().iter().all(|(_, b)| b.len() > 1000));
    }
}
