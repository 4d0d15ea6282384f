//! CUDA backend (feature `cuda`).
//!
//! - `runtime.rs`: driver check (before any cudarc call), device and capability checks, the
//!   embedded kernel modules, metered allocations ([`runtime::DevBuf`]) with out-of-memory
//!   messages that give the amount;
//! - `nf4.rs` (dequantize to f32/bf16, decode GEMV), `nf4_gemm.rs` (fused tensor-core GEMM and
//!   the dequantize + cuBLAS bf16 baseline), `nf4_quantize.rs` (NF4 quantization while loading), `dense_half.rs` (16-bit dense weights),
//!   `rmsnorm.rs`, `ops.rs` (elementwise, RoPE, embedding, attention, cross-entropy, sgemm),
//!   `sample.rs` (greedy / top-k / top-p sampling of the next token on the device):
//!   launchers of `kernels/*.cu`, each tested against its CPU spec in `tests/cuda_ops.rs`;
//! - `backend.rs`: [`crate::backend::Backend`] on top of them (`eval`, `generate`, the forward);
//! - `train.rs`: [`crate::backend::TrainBackend`] (the training step's backward ops, bf16
//!   activation stash, the device optimizer) over `flash_attention.rs`, `nf4_gemm_dx.rs`,
//!   `lora.rs`, `cross_entropy.rs`, `dropout.rs`, `adamw.rs` (paged AdamW); `blas.rs` wraps cuBLAS
//!   for row-major products; `libs.rs` finds cuBLAS at run time.
//!
//! None of this has run on a GPU yet: no GPU was lent to the work that wrote it (see
//! benches/RESULTS.md); `qlora check` and `tests/cuda_ops.rs` verify it on the first one.

use crate::error::Error;

#[cfg(feature = "cuda")]
pub mod adamw;
#[cfg(feature = "cuda")]
pub mod adamw8;
#[cfg(feature = "cuda")]
pub mod backend;
#[cfg(feature = "cuda")]
pub mod blas;
#[cfg(feature = "cuda")]
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub mod decode_attention;
#[cfg(feature = "cuda")]
pub mod dense_half;
#[cfg(feature = "cuda")]
pub mod dropout;
#[cfg(feature = "cuda")]
pub mod flash_attention;
#[cfg(feature = "cuda")]
pub mod libs;
#[cfg(feature = "cuda")]
pub mod lora;
#[cfg(feature = "cuda")]
pub mod lora_decode;
#[cfg(feature = "cuda")]
pub mod managed;
#[cfg(feature = "cuda")]
pub mod nf4;
#[cfg(feature = "cuda")]
pub mod nf4_gemm;
#[cfg(feature = "cuda")]
pub mod nf4_gemm_dx;
#[cfg(feature = "cuda")]
pub mod nf4_quantize;
#[cfg(feature = "cuda")]
pub mod ops;
#[cfg(feature = "cuda")]
pub mod rmsnorm;
#[cfg(feature = "cuda")]
pub mod runtime;
#[cfg(feature = "cuda")]
pub mod sample;
#[cfg(feature = "cuda")]
pub mod step;
#[cfg(feature = "cuda")]
pub mod train;

/// Why the CUDA backend cannot be used by this binary.
pub fn unavailable() -> Error {
    if cfg!(feature = "cuda") {
        Error::Backend("no usable CUDA device; use --device cpu".into())
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
        for m in [
            "adamw",
            "attention",
            "cross_entropy",
            "decode_attention",
            "dense_half",
            "dropout",
            "elementwise",
            "lora",
            "nf4",
            "nf4_gemm",
            "nf4_gemm_dx",
            "nf4_quantize",
            "rmsnorm",
            "rope",
            "sample",
        ] {
            assert!(names.contains(&m), "{names:?}");
        }
        assert!(super::kernel_modules().iter().all(|(_, b)| b.len() > 1000));
    }
}
