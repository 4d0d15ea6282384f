//! Build script. Without the `cuda` feature it does nothing. With it, every `kernels/*.cu` is
//! compiled by nvcc into a fatbin (SASS for sm_80/86/89/90 plus PTX for the newest, so newer GPUs
//! JIT it) in OUT_DIR, and `OUT_DIR/kernels.rs` embeds them all:
//! `pub const KERNELS: &[(&str, &[u8])]` (module name = file stem). ptxas' register / spill
//! report for every kernel is written to `OUT_DIR/ptxas.txt` (CI prints it).
//!
//! nvcc is found through `NVCC`, `CUDA_HOME` / `CUDA_PATH`, `PATH`, or the copy that
//! `scripts/setup.sh` installs under `~/.cache/qlora/cuda-13.0`.

use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: &[&str] = &["80", "86", "89", "90"];

/// Kernel files compiled without `--use_fast_math`: their results are specified bit for bit
/// (NF4 decoding must equal the CPU's f32 arithmetic, subnormal scales included, which
/// fast math's flush-to-zero would break; NF4 quantization must equal the CPU quantizer, whose
/// clamp 1e-38 is itself subnormal). Every other file gets fast math (flush-to-zero,
/// approximate division, square root and `expf`); kernels there that need exact rounding use the
/// `__f*_rn` intrinsics, which no flag changes.
const EXACT_MATH: &[&str] = &["nf4", "nf4_gemm", "nf4_gemm_dx", "nf4_quantize"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc().unwrap_or_else(|| {
        fail(
            "the `cuda` feature needs nvcc (CUDA 13.0) to compile kernels/*.cu, and none was found.\n\
             Looked at $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, $PATH and ~/.cache/qlora/cuda-13.0.\n\
             Install it with `bash scripts/setup.sh` (pip wheels nvidia-cuda-nvcc==13.0.88 and friends),\n\
             or set CUDA_HOME to a CUDA 13.0 toolkit, or build without `--features cuda`.",
        )
    });
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    for p in std::fs::read_dir("kernels").into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", p.path().display());
    }
    // Compile all kernels in parallel: nvcc is slow and single-threaded per file.
    let results: Vec<(PathBuf, PathBuf, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| {
                let nvcc = nvcc.clone();
                let out_dir = out_dir.clone();
                s.spawn(move || compile(&nvcc, src, &out_dir))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("nvcc thread panicked"))
            .collect()
    });
    let mut table = String::from("/// Fatbins compiled from kernels/*.cu by build.rs: (module name, bytes).\npub const KERNELS: &[(&str, &[u8])] = &[\n");
    let mut report = String::new();
    for (src, fatbin, ptxas) in &results {
        let stem = src.file_stem().unwrap().to_string_lossy();
        table.push_str(&format!(
            "    ({stem:?}, include_bytes!({:?})),\n",
            fatbin.display().to_string()
        ));
        report.push_str(&format!("== {} ==\n{ptxas}\n", src.display()));
    }
    table.push_str("];\n");
    std::fs::write(out_dir.join("kernels.rs"), table).expect("write kernels.rs");
    std::fs::write(out_dir.join("ptxas.txt"), report).expect("write ptxas.txt");
}

fn compile(nvcc: &Path, src: &Path, out_dir: &Path) -> (PathBuf, PathBuf, String) {
    let stem = src.file_stem().unwrap().to_string_lossy().to_string();
    let fatbin = out_dir.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.args([
        "--fatbin",
        "-O3",
        "-std=c++17",
        "-lineinfo",
        "-Xptxas",
        "-v",
        "-Ikernels",
    ]);
    if !EXACT_MATH.contains(&stem.as_str()) {
        cmd.arg("--use_fast_math");
    }
    for a in ARCHS {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    let newest = ARCHS.last().unwrap();
    cmd.arg(format!(
        "-gencode=arch=compute_{newest},code=compute_{newest}"
    ));
    cmd.arg("-o").arg(&fatbin).arg(src);
    let out = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", nvcc.display())));
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        fail(&format!(
            "nvcc failed on {}:\n{log}{}",
            src.display(),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    (src.to_path_buf(), fatbin, log)
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = std::env::var_os("NVCC").map(PathBuf::from).and_then(exe) {
        return Some(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var)
            .map(|h| PathBuf::from(h).join("bin/nvcc"))
            .and_then(exe)
        {
            return Some(p);
        }
    }
    if let Some(p) = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    }) {
        return Some(p);
    }
    let home = std::env::var_os("HOME")?;
    exe(PathBuf::from(home).join(".cache/qlora/cuda-13.0/nvidia/cu13/bin/nvcc"))
}

fn fail(msg: &str) -> ! {
    eprintln!("\nerror: {msg}\n");
    std::process::exit(1)
}
