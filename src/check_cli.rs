//! `qlora check`: the CUDA backend against its CPU specification on this machine's GPU (see
//! `qlora::check`), printed as a table; the exit code is non-zero when any check fails or no GPU
//! can be used.

use anyhow::{bail, Result};
use clap::Args;
use qlora::backend::DeviceRequest;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The GPU to check: cuda or cuda:N.
    #[arg(long, default_value = "cuda", value_parser = parse_gpu)]
    pub device: DeviceRequest,
}

fn parse_gpu(s: &str) -> std::result::Result<DeviceRequest, String> {
    match s.parse()? {
        DeviceRequest::Cpu | DeviceRequest::Auto => {
            Err(format!("{s}: check tests a GPU; use cuda or cuda:N"))
        }
        d => Ok(d),
    }
}

/// Runs every check and prints the table.
pub fn run(a: &CheckArgs) -> Result<()> {
    let DeviceRequest::Cuda(ordinal) = a.device else {
        bail!("check tests a GPU; use --device cuda or cuda:N");
    };
    run_on(ordinal)
}

#[cfg(not(feature = "cuda"))]
fn run_on(_ordinal: usize) -> Result<()> {
    bail!(
        "this qlora was built without CUDA support, so there is no GPU backend to check; rebuild with `cargo build --release --features cuda`"
    )
}

#[cfg(feature = "cuda")]
fn run_on(ordinal: usize) -> Result<()> {
    use anyhow::Context;
    let t0 = std::time::Instant::now();
    let be = qlora::backend::cuda::backend::CudaBackend::new(ordinal)
        .context("no usable CUDA device, nothing to check")?;
    let info = qlora::check::device_info(&be)?;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!(
        "qlora check on {}: CUDA driver {}.{}, {:.1} GiB ({:.1} GiB free)",
        info.name,
        info.driver_cuda.0,
        info.driver_cuda.1,
        gib(info.total_bytes),
        gib(info.free_bytes)
    );
    let rows = qlora::check::run_all(&be);
    let width = rows.iter().map(|r| r.op.len()).max().unwrap_or(2).max(2);
    println!("{:<width$}  {:>10}  {:>10}  ok", "op", "max error", "bound");
    for r in &rows {
        println!(
            "{:<width$}  {:>10.3e}  {:>10.3e}  {}",
            r.op,
            r.max_err,
            r.bound,
            if r.ok { "ok" } else { "FAIL" }
        );
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    println!(
        "{} checks, {failed} failed, {:.1} s",
        rows.len(),
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} of {} checks failed on {}", rows.len(), info.name);
    }
    Ok(())
}
