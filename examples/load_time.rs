//! Times loading a checkpoint onto a device the way `qlora train` / `eval` do, and says where
//! the time went (issue 11's target: the Llama-2-7B base from f16 safetensors onto the GPU,
//! NF4-quantized, in at most 15 s).
//!
//! ```text
//! cargo run --release --features cuda --example load_time -- --model DIR \
//!     [--device auto|cpu|cuda] [--quant nf4|none] [--blocksize 64] [--no-double-quant]
//! ```
//!
//! Prints one JSON object: the backend, `load_secs` (the whole load, ended by a device
//! synchronisation), `linear_secs` (reading, quantizing and placing the decoder projections),
//! `quantize_secs` (of which quantizing: the host quantizer, or on CUDA the upload of the stored
//! bytes plus the kernel and the host's nested absmax step), how many projections were quantized
//! on the device and on the host, the checkpoint's bytes, device peak and host peak RSS.
//!
//! A 7B-shaped random checkpoint comes from the `make_random_llama` example (13.5 GB of f16):
//! `make_random_llama --config tests/fixtures/llama-2-7b-chat-hf/config.json --out /dev/shm/7b`.
//! Right after writing it the file sits in the page cache (a warm load); drop the caches first
//! (`sync; echo 3 > /proc/sys/vm/drop_caches`, as root) to time a cold one from disk.

use qlora::backend::{select, AnyBackend, Backend, DeviceRequest};
use qlora::config::ModelConfig;
use qlora::model::{BaseQuant, Llama};
use qlora::weights::Checkpoint;
use std::path::PathBuf;
use std::time::Instant;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let usage = "usage: load_time --model DIR [--device auto|cpu|cuda] [--quant nf4|none] [--blocksize 64] [--no-double-quant]";
    let dir = PathBuf::from(arg("--model").ok_or_else(|| anyhow::anyhow!(usage))?);
    let device: DeviceRequest = arg("--device")
        .unwrap_or_else(|| "auto".into())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let blocksize: usize = arg("--blocksize").map_or(Ok(64), |s| s.parse())?;
    let double_quant = !std::env::args().any(|a| a == "--no-double-quant");
    let quant = match arg("--quant").as_deref() {
        None | Some("nf4") => BaseQuant::Nf4 {
            blocksize,
            double_quant,
        },
        Some("none") => BaseQuant::None,
        Some(q) => anyhow::bail!("unknown --quant {q}; {usage}"),
    };
    let cfg = qlora::loader::read_config(&dir)?;
    let ckpt = Checkpoint::open(&dir)?;
    match select(device)? {
        AnyBackend::Cpu(b) => report(b, &ckpt, &cfg, quant),
        #[cfg(feature = "cuda")]
        AnyBackend::Cuda(b) => report(*b, &ckpt, &cfg, quant),
    }
}

fn report<B: Backend>(
    backend: B,
    ckpt: &Checkpoint,
    cfg: &ModelConfig,
    quant: BaseQuant,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let (model, stats) = Llama::load_with_stats(backend, ckpt, cfg, quant, |_, _| {})?;
    // A download waits for every queued copy and kernel: the clock stops with the device idle.
    model.backend.download(&model.norm)?;
    let secs = t0.elapsed().as_secs_f64();
    let bytes: usize = ckpt
        .tensors()
        .map(|t| t.numel() * t.dtype.size_in_bytes().unwrap_or(0))
        .sum();
    let mib = |b: usize| (b as f64 / (1u64 << 20) as f64 * 10.0).round() / 10.0;
    let round = |s: f64| (s * 1000.0).round() / 1000.0;
    let out = serde_json::json!({
        "backend": model.backend.name(),
        "quant": format!("{quant:?}"),
        "layers": cfg.num_hidden_layers,
        "checkpoint_gb": (bytes as f64 / 1e9 * 100.0).round() / 100.0,
        "load_secs": round(secs),
        "linear_secs": round(stats.linear_secs),
        "quantize_secs": round(stats.quantize_secs),
        "quantized_on_device": stats.device_quantized,
        "quantized_on_host": stats.host_quantized,
        "linear_mib": mib(model.linear_bytes()),
        "peak_device_mib": model.backend.device_memory_peak().map(mib),
        "peak_rss_mib": (qlora::sys::peak_rss_mib() * 10.0).round() / 10.0,
    });
    println!("{out}");
    Ok(())
}
