//! Where the CUDA libraries come from at run time. The binary embeds its kernels and needs only
//! two NVIDIA libraries, both loaded dynamically by cudarc: the driver (`libcuda.so.1`, installed
//! with the GPU driver) and cuBLAS for CUDA 13 (`libcublas.so.13`, which pulls `libcublasLt`).
//!
//! cuBLAS is looked for, in order, in the folders of `$QLORA_CUDA_LIB_DIR` (`:`-separated), in
//! `~/.cache/qlora/cublas-13.0/nvidia/cu13/lib` (where `scripts/setup.sh` installs NVIDIA's
//! `nvidia-cublas` wheel on a machine with a GPU) and the nvcc folder beside it
//! (`~/.cache/qlora/cuda-13.0/nvidia/cu13/lib`), and then wherever the system loader looks
//! (`LD_LIBRARY_PATH`, ldconfig: a CUDA toolkit, or torch's bundled copy). A copy found in one of
//! our folders is opened by absolute path with `RTLD_GLOBAL` and kept loaded, so cudarc's own
//! `dlopen("libcublas.so.13")` resolves to it by soname. cudarc panics when a library it needs
//! is missing; [`ensure_cublas`] turns that into an error that says what to install.

use crate::error::{Error, Result};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The cuBLAS library file (CUDA 13).
pub const CUBLAS_SONAME: &str = "libcublas.so.13";

/// The pinned wheel `scripts/setup.sh` installs.
pub const CUBLAS_WHEEL: &str = "nvidia-cublas==13.0.0.19";

/// Folders searched for [`CUBLAS_SONAME`] before the system loader path, in order.
pub fn cublas_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("QLORA_CUDA_LIB_DIR")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        let cache = PathBuf::from(home).join(".cache/qlora");
        for d in ["cublas-13.0", "cuda-13.0"] {
            dirs.push(cache.join(d).join("nvidia/cu13/lib"));
        }
    }
    dirs
}

/// Opens the first `libcublas.so.13` found in [`cublas_dirs`] globally and keeps it loaded.
/// Returns its path, or `None` when none of the folders holds one.
fn preload_cublas() -> Option<PathBuf> {
    static LOADED: OnceLock<Option<(PathBuf, libloading::os::unix::Library)>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            cublas_dirs().into_iter().find_map(|d| {
                let p = d.join(CUBLAS_SONAME);
                if !p.is_file() {
                    return None;
                }
                let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
                // SAFETY: loading cuBLAS runs only its (NVIDIA's) library initialisers, which
                // have no preconditions; the library stays loaded for the process' lifetime.
                match unsafe { libloading::os::unix::Library::open(Some(&p), flags) } {
                    Ok(lib) => Some((p, lib)),
                    Err(e) => {
                        tracing::warn!("{}: cannot be loaded ({e})", p.display());
                        None
                    }
                }
            })
        })
        .as_ref()
        .map(|(p, _)| p.clone())
}

/// Makes cuBLAS loadable (see the module docs) or says what to install. Never panics.
pub fn ensure_cublas() -> Result<()> {
    if let Some(p) = preload_cublas() {
        tracing::debug!("cuBLAS: {}", p.display());
    }
    // SAFETY: only attempts to dlopen the library names cudarc uses; touches no CUDA state.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Ok(());
    }
    let looked: Vec<String> = cublas_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    Err(Error::Backend(format!(
        "a CUDA driver is present but cuBLAS for CUDA 13 ({CUBLAS_SONAME}) was not found \
         (looked in {} and the system library path). Install it with `bash scripts/setup.sh` \
         (NVIDIA's {CUBLAS_WHEEL} wheel into ~/.cache/qlora/cublas-13.0), or `pip install \
         {CUBLAS_WHEEL}` and set QLORA_CUDA_LIB_DIR to its nvidia/cu13/lib folder, or add a CUDA 13 \
         toolkit's lib64 to LD_LIBRARY_PATH; --device cpu runs without it",
        looked.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_order_puts_the_environment_first() {
        // Only reads the environment; the variable is set for this process alone.
        std::env::set_var("QLORA_CUDA_LIB_DIR", "/a:/b");
        let d = cublas_dirs();
        assert_eq!(d[0], PathBuf::from("/a"));
        assert_eq!(d[1], PathBuf::from("/b"));
        assert!(d
            .iter()
            .any(|p| p.ends_with("qlora/cublas-13.0/nvidia/cu13/lib")));
        std::env::remove_var("QLORA_CUDA_LIB_DIR");
    }
}
