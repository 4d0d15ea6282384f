//! Quantizes the linear layers of a safetensors checkpoint to NF4 tensor by tensor, keeping only
//! the `Nf4Tensor`s, and reports time, NF4 bytes and peak RSS: the scale test of
//! `scripts/scale_7b.sh` (a stand-in until `qlora quantize` exists).
//!
//! ```text
//! cargo run --release --example quantize_stream -- --model DIR [--blocksize 64] [--no-double-quant]
//!     [--mode release|checkpoint]
//! ```
//!
//! What is quantized: every 2-D `*_proj.weight` (q, k, v, o, gate, up, down), as QLoRA does;
//! embeddings, norms and `lm_head` stay 16-bit and are only counted.
//!
//! Memory: the shards are memory-mapped, and file-backed pages a process has touched count toward
//! its RSS until unmapped or dropped. `--mode checkpoint` reads through [`Checkpoint::load_f32`],
//! whose maps are private to it, so RSS climbs to roughly the size of the shards read (the page
//! cache would free them under pressure, but RSS and cgroup accounting see them). `--mode release`
//! (the default) maps the shards itself and, after each tensor, `madvise(MADV_DONTNEED)`s its byte
//! range, so peak RSS is the NF4 output plus the tensors in flight.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use memmap2::{Mmap, UncheckedAdvice};
use qlora::quant::{quantize_nf4, Nf4Tensor};
use qlora::weights::{Checkpoint, DType};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

const PROJ: [&str; 7] = [
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
];

struct Args {
    model: PathBuf,
    blocksize: usize,
    double_quant: bool,
    release: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let usage =
        "usage: --model DIR [--blocksize 64] [--no-double-quant] [--mode release|checkpoint]";
    let mut a = Args {
        model: PathBuf::new(),
        blocksize: 64,
        double_quant: true,
        release: true,
    };
    let mut model = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{arg} needs a value"))
        };
        match arg.as_str() {
            "--model" => model = Some(PathBuf::from(val()?)),
            "--blocksize" => a.blocksize = val()?.parse()?,
            "--no-double-quant" => a.double_quant = false,
            "--mode" => {
                a.release = match val()?.as_str() {
                    "release" => true,
                    "checkpoint" => false,
                    m => anyhow::bail!("unknown mode {m}; {usage}"),
                }
            }
            _ => anyhow::bail!("unknown argument {arg}; {usage}"),
        }
    }
    a.model = model.ok_or_else(|| anyhow::anyhow!("{usage}"))?;
    Ok(a)
}

/// A line of /proc/self/status in kB (VmHWM = peak RSS, VmRSS, RssFile, RssAnon).
fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Little-endian F16 / BF16 / F32 bytes to f32 (aligned fast path, unaligned fallback).
fn widen(dtype: DType, bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    Ok(match dtype {
        DType::F16 | DType::BF16 => {
            let mut out = vec![0f32; bytes.len() / 2];
            let owned;
            let halves: &[u16] = match bytemuck::try_cast_slice(bytes) {
                Ok(h) => h,
                Err(_) => {
                    owned = bytes
                        .chunks_exact(2)
                        .map(|b| u16::from_le_bytes([b[0], b[1]]))
                        .collect::<Vec<u16>>();
                    &owned
                }
            };
            if dtype == DType::F16 {
                bytemuck::cast_slice::<u16, f16>(halves).convert_to_f32_slice(&mut out);
            } else {
                bytemuck::cast_slice::<u16, bf16>(halves).convert_to_f32_slice(&mut out);
            }
            out
        }
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        d => anyhow::bail!("dtype {d:?} is not a float type"),
    })
}

/// The shards mapped by us: per file, the map and each tensor's absolute byte range.
struct OwnMaps {
    maps: BTreeMap<PathBuf, (Mmap, BTreeMap<String, Range<usize>>)>,
}

impl OwnMaps {
    fn open(files: impl Iterator<Item = PathBuf>) -> anyhow::Result<OwnMaps> {
        let mut maps = BTreeMap::new();
        for path in files {
            // SAFETY: the file is opened read-only and nothing in this process writes it; the
            // checkpoint must not be modified while quantizing (as for any mmap-based loader).
            let map = unsafe { Mmap::map(&File::open(&path)?)? };
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map[..])?;
            let base = 8 + n;
            let ranges = meta
                .tensors()
                .into_iter()
                .map(|(name, info)| {
                    let (s, e) = info.data_offsets;
                    (name, base + s..base + e)
                })
                .collect();
            maps.insert(path, (map, ranges));
        }
        Ok(OwnMaps { maps })
    }

    /// The bytes of `name` in `file`, and a guard that drops their pages from RSS when done.
    fn bytes(&self, file: &PathBuf, name: &str) -> anyhow::Result<(&[u8], impl FnOnce() + '_)> {
        let (map, ranges) = &self.maps[file];
        let r = ranges
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("{name} not in {}", file.display()))?
            .clone();
        let release = move || {
            // SAFETY: MADV_DONTNEED on a read-only file mapping only drops this process's page
            // table entries; a later access refaults the same file contents, so no Rust
            // reference into the map observes a change. (The range is widened down to a page
            // boundary by memmap2; the neighbouring tensor's first bytes are refaulted if needed.)
            if let Err(e) =
                unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, r.start, r.len()) }
            {
                eprintln!("madvise(DONTNEED) failed: {e}");
            }
        };
        Ok((&map[ranges[name].clone()], release))
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(&args.model)?;
    let mut todo = Vec::new();
    let mut kept_bytes = 0usize;
    let mut src_bytes = 0usize;
    for t in ckpt.tensors() {
        let bytes = t.numel() * t.dtype.size_in_bytes().unwrap_or(0);
        src_bytes += bytes;
        if t.shape.len() == 2 && PROJ.iter().any(|p| t.name.ends_with(p)) {
            todo.push(t.clone());
        } else {
            kept_bytes += bytes;
        }
    }
    let own = if args.release {
        let files: std::collections::BTreeSet<PathBuf> =
            todo.iter().map(|t| t.file.clone()).collect();
        Some(OwnMaps::open(files.into_iter())?)
    } else {
        None
    };
    eprintln!(
        "{} tensors ({:.2} GB), quantizing {} linear weights (blocksize {}, double quant {}), mode {}",
        ckpt.len(),
        src_bytes as f64 / 1e9,
        todo.len(),
        args.blocksize,
        args.double_quant,
        if args.release { "release" } else { "checkpoint" }
    );

    let quantized: Vec<Nf4Tensor> = todo
        .par_iter()
        .map(|t| -> anyhow::Result<Nf4Tensor> {
            let w = match &own {
                Some(own) => {
                    let (bytes, release) = own.bytes(&t.file, &t.name)?;
                    let w = widen(t.dtype, bytes)?;
                    release();
                    w
                }
                None => ckpt.load_f32(&t.name, &t.shape)?,
            };
            let q = quantize_nf4(&w, &t.shape, args.blocksize, args.double_quant)?;
            Ok(q)
        })
        .collect::<anyhow::Result<_>>()?;
    let secs = t0.elapsed().as_secs_f64();

    let params: usize = quantized.iter().map(|q| q.numel()).sum();
    let nf4_bytes: usize = quantized.iter().map(|q| q.nbytes()).sum();
    let gb = |b: usize| b as f64 / 1e9;
    let kb_gb = |k: Option<u64>| k.map_or(f64::NAN, |k| k as f64 * 1024.0 / 1e9);
    println!(
        "quantized {} tensors, {params} params in {secs:.1} s ({:.1} M params/s)",
        quantized.len(),
        params as f64 / secs / 1e6
    );
    println!(
        "NF4 bytes {nf4_bytes} ({:.3} GB, {:.3} bits/param), kept 16-bit {kept_bytes} ({:.3} GB), total {:.3} GB vs {:.3} GB source",
        gb(nf4_bytes),
        nf4_bytes as f64 * 8.0 / params as f64,
        gb(kept_bytes),
        gb(nf4_bytes + kept_bytes),
        gb(src_bytes)
    );
    println!(
        "peak RSS (VmHWM) {:.2} GB; now RSS {:.2} GB (file {:.2} GB, shmem {:.2} GB, anon {:.2} GB)",
        kb_gb(status_kb("VmHWM:")),
        kb_gb(status_kb("VmRSS:")),
        kb_gb(status_kb("RssFile:")),
        kb_gb(status_kb("RssShmem:")),
        kb_gb(status_kb("RssAnon:"))
    );
    Ok(())
}
