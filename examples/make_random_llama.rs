//! Writes a random f16 Llama checkpoint with exactly the tensor names and shapes of a
//! `config.json`, sharded like a Hugging Face checkpoint, for scale tests (e.g. quantizing a
//! Llama-2-7B-shaped model without downloading one).
//!
//! ```text
//! cargo run --release --example make_random_llama -- \
//!     --config tests/fixtures/llama-2-7b-chat-hf/config.json --out /tmp/qlora-7b [--shards 2] [--seed 0]
//! ```
//!
//! Output: `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` (or one
//! `model.safetensors` with `--shards 1`), plus `config.json` and whatever tokenizer /
//! generation files sit next to the config. If the config's directory has a shard index with the
//! same number of shards, its `weight_map` decides which shard holds each tensor (so the layout
//! matches the real checkpoint); otherwise tensors are split into shards of about equal size, in
//! `llama_tensor_names` order.
//!
//! Streaming: each tensor is generated in 16 Mi-element slabs (rayon-parallel, xorshift64* per
//! 1 Mi-element chunk), converted to f16 and written, so memory stays at a few tens of MB whatever
//! the model size. Norm weights are 1.0; everything else is roughly N(0, 0.02) (sum of four
//! uniforms, scaled).

use half::f16;
use half::slice::HalfFloatSliceExt;
use qlora::config::ModelConfig;
use qlora::weights::llama_tensor_names;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

const SLAB: usize = 16 << 20;
const CHUNK: usize = 1 << 20;
const STD: f32 = 0.02;

struct Args {
    config: PathBuf,
    out: PathBuf,
    shards: usize,
    seed: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut config = None;
    let mut out = None;
    let mut shards = 2usize;
    let mut seed = 0u64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--config" => config = Some(PathBuf::from(val()?)),
            "--out" => out = Some(PathBuf::from(val()?)),
            "--shards" => shards = val()?.parse()?,
            "--seed" => seed = val()?.parse()?,
            _ => anyhow::bail!(
                "unknown argument {a}; usage: --config CONFIG.json --out DIR [--shards N] [--seed S]"
            ),
        }
    }
    let (Some(config), Some(out)) = (config, out) else {
        anyhow::bail!("usage: --config CONFIG.json --out DIR [--shards N] [--seed S]");
    };
    anyhow::ensure!(shards >= 1, "--shards must be at least 1");
    Ok(Args {
        config,
        out,
        shards,
        seed,
    })
}

/// xorshift64* — fast, and plenty random for weights nobody will read.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, never zero
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    #[inline]
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Roughly N(0, std): the sum of four 16-bit uniforms (Irwin–Hall), centred and scaled.
    #[inline]
    fn normalish(&mut self, std: f32) -> f32 {
        let r = self.next();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        // each uniform has variance 65536² / 12, the sum 4× that
        const MEAN: f32 = 2.0 * 65535.0;
        const SD: f32 = 37837.23; // sqrt(4 * 65536² / 12)
        (s as f32 - MEAN) * (std / SD)
    }
}

/// Which shard (0-based) holds each tensor.
fn assign_shards(
    config: &Path,
    tensors: &[(String, Vec<usize>)],
    shards: usize,
) -> anyhow::Result<Vec<usize>> {
    if shards > 1 {
        let index = config.with_file_name("model.safetensors.index.json");
        if let Ok(text) = std::fs::read_to_string(&index) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let map = v["weight_map"].as_object();
            let suffix = format!("-of-{shards:05}.safetensors");
            let parse = |name: &str| -> Option<usize> {
                let file = map?.get(name)?.as_str()?;
                let k: usize = file
                    .strip_prefix("model-")?
                    .strip_suffix(&suffix)?
                    .parse()
                    .ok()?;
                (1..=shards).contains(&k).then_some(k - 1)
            };
            if let Some(a) = tensors
                .iter()
                .map(|(n, _)| parse(n))
                .collect::<Option<Vec<_>>>()
            {
                eprintln!("shard layout from {}", index.display());
                return Ok(a);
            }
        }
    }
    let sizes: Vec<usize> = tensors
        .iter()
        .map(|(_, s)| 2 * s.iter().product::<usize>())
        .collect();
    let total: usize = sizes.iter().sum();
    let mut acc = 0;
    Ok(sizes
        .iter()
        .map(|&b| {
            let k = (acc * shards / total.max(1)).min(shards - 1);
            acc += b;
            k
        })
        .collect())
}

fn write_shard(
    path: &Path,
    tensors: &[(usize, &(String, Vec<usize>))],
    seed: u64,
) -> anyhow::Result<u64> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), meta.into());
    let mut off = 0usize;
    for (_, (name, shape)) in tensors {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [off, off + bytes]}),
        );
        off += bytes;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = BufWriter::with_capacity(8 << 20, File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;

    let mut vals = vec![0f32; SLAB];
    let mut halves = vec![f16::ZERO; SLAB];
    for &(ti, (name, shape)) in tensors {
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let mut done = 0;
        while done < n {
            let len = SLAB.min(n - done);
            if is_norm {
                halves[..len].fill(f16::ONE);
            } else {
                let base = done / CHUNK;
                vals[..len]
                    .par_chunks_mut(CHUNK)
                    .enumerate()
                    .for_each(|(c, v)| {
                        let mut rng = Rng::new(seed ^ ((ti as u64) << 40) ^ (base + c) as u64);
                        for x in v {
                            *x = rng.normalish(STD);
                        }
                    });
                halves[..len].convert_from_f32_slice(&vals[..len]);
            }
            f.write_all(bytemuck::cast_slice(&halves[..len]))?;
            done += len;
        }
    }
    f.flush()?;
    Ok((8 + h.len() + off) as u64)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let cfg = ModelConfig::from_file(&args.config)?;
    let tensors = llama_tensor_names(&cfg);
    let shard_of = assign_shards(&args.config, &tensors, args.shards)?;
    std::fs::create_dir_all(&args.out)?;
    let t0 = Instant::now();

    let file_name = |k: usize| {
        if args.shards == 1 {
            qlora::weights::SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, args.shards)
        }
    };
    let mut weight_map = BTreeMap::new();
    let mut total_data = 0usize;
    let mut total_file = 0u64;
    for k in 0..args.shards {
        let mine: Vec<(usize, &(String, Vec<usize>))> = tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| shard_of[*i] == k)
            .collect();
        for (_, (name, shape)) in &mine {
            weight_map.insert(name.clone(), file_name(k));
            total_data += 2 * shape.iter().product::<usize>();
        }
        let path = args.out.join(file_name(k));
        let t = Instant::now();
        let bytes = write_shard(&path, &mine, args.seed)?;
        total_file += bytes;
        eprintln!(
            "{}: {} tensors, {:.2} GB in {:.1} s",
            path.display(),
            mine.len(),
            bytes as f64 / 1e9,
            t.elapsed().as_secs_f64()
        );
    }
    if args.shards > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": total_data},
            "weight_map": weight_map,
        });
        std::fs::write(
            args.out.join(qlora::weights::INDEX_FILE),
            serde_json::to_vec_pretty(&index)?,
        )?;
    }
    let src = args.config.parent().unwrap_or(Path::new("."));
    std::fs::copy(&args.config, args.out.join("config.json"))?;
    for extra in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "tokenizer.model",
    ] {
        if src.join(extra).is_file() {
            std::fs::copy(src.join(extra), args.out.join(extra))?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "wrote {} tensors, {} bytes of f16 data ({:.2} GB in files) to {} in {:.1} s ({:.2} GB/s)",
        tensors.len(),
        total_data,
        total_file as f64 / 1e9,
        args.out.display(),
        secs,
        total_file as f64 / 1e9 / secs
    );
    Ok(())
}
