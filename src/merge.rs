//! `qlora merge`: fold a LoRA adapter into its base model and write a plain model folder.
//!
//! For every adapted module (PEFT's `merge_and_unload`):
//! ```text
//! W' = W + s · B·A        W [out, in], B [out, r], A [r, in], s = α/r (or α/√r with rsLoRA)
//! ```
//! computed in f32 from the base weight widened to f32 and rounded once to the output dtype.
//! A bitsandbytes 4-bit base is dequantized first (as PEFT does when merging a QLoRA adapter),
//! so the output is always dense. Every other tensor is converted to the output dtype.
//! If `lm_head` is adapted while the embeddings are tied, the head is untied: `lm_head.weight`
//! is written (`embed + s·B·A`) and `tie_word_embeddings` set to false, since changing the shared
//! matrix would change the embeddings too.
//!
//! The output (config.json without `quantization_config` and with the new dtype, safetensors,
//! tokenizer files) is written streaming, one merged tensor in memory at a time, into a temporary
//! folder renamed into place at the end.

use crate::error::{Error, Result};
use crate::lora::{load_adapter, LoraConfig, LoraModule, LoraPair, LoraTarget};
use crate::quant::bnb::{is_prequantized, load_prequantized};
use crate::weights::write::{check_output, write_model_folder, Data, OutTensor};
use crate::weights::{llama_tensor_names, Checkpoint, DType};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// transformers' default shard size for `save_pretrained` (5 GB).
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// What `qlora merge` was asked to do.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub adapter: PathBuf,
    /// Base model; default: the adapter's `base_model_name_or_path`.
    pub model: Option<String>,
    pub output: PathBuf,
    /// F16, BF16 or F32; default: the base's float dtype (F16 for a 4-bit base).
    pub dtype: Option<DType>,
    pub overwrite: bool,
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    pub base: PathBuf,
    pub dtype: DType,
    pub merged_modules: usize,
    pub bytes_out: u64,
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

fn encode(v: &[f32], d: DType) -> Vec<u8> {
    match d {
        DType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// `w += s · B·A` (`w` `[out, in]` row-major).
pub fn add_lora(w: &mut [f32], pair: &LoraPair, scale: f32) {
    let (n, k, r) = (pair.out_features, pair.in_features, pair.rank());
    assert_eq!(w.len(), n * k, "merge: weight and adapter shapes differ");
    for o in 0..n {
        let row = &mut w[o * k..(o + 1) * k];
        for q in 0..r {
            let c = scale * pair.b[o * r + q];
            if c != 0.0 {
                for (x, &a) in row.iter_mut().zip(&pair.a[q * k..(q + 1) * k]) {
                    *x += c * a;
                }
            }
        }
    }
}

/// The module a base tensor name belongs to, if LoRA can adapt it.
pub fn module_of(name: &str) -> Option<LoraModule> {
    if name == "lm_head.weight" {
        return Some(LoraModule::lm_head());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let target = rest.strip_suffix(".weight")?.rsplit('.').next()?;
    LoraTarget::from_name(target)
        .filter(|t| *t != LoraTarget::LmHead)
        .map(|t| LoraModule::layer(layer, t))
}

/// Merges as `opts` says; see the module docs.
pub fn merge(opts: &MergeOptions) -> Result<MergeReport> {
    check_dtype(opts.dtype)?;
    let cfg_path = opts.adapter.join(crate::lora::CONFIG_FILE);
    let lcfg = LoraConfig::from_file(&cfg_path)?;
    let spec = base_spec(opts, &lcfg, &cfg_path)?;
    let base = crate::hub::resolve_model(&spec)?;
    let model_cfg = crate::loader::read_config(&base)?;
    let (lcfg, weights) = load_adapter(&opts.adapter, &model_cfg)?;
    let scale = lcfg.scaling();
    check_output(&opts.output, opts.overwrite)?;
    let ckpt = Checkpoint::open(&base)?;

    let config_path = base.join("config.json");
    let mut config = read_config_json(&config_path)?;
    let four_bit = !matches!(config.get("quantization_config"), None | Some(Value::Null));
    let names = llama_tensor_names(&model_cfg);
    let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&ckpt, four_bit));
    let untie = model_cfg.tie_word_embeddings && weights.get(&LoraModule::lm_head()).is_some();
    let out_names = output_names(&names, untie);
    // (output name → (source name, shape)), one group per tensor.
    let sources: BTreeMap<String, (String, Vec<usize>)> = out_names
        .iter()
        .map(|(o, s, sh)| (o.clone(), (s.clone(), sh.clone())))
        .collect();
    let groups = output_groups(&out_names, dtype);
    let mut merged = 0usize;
    let mut produce = |t: &OutTensor| -> Result<Vec<u8>> {
        let (src, shape) = &sources[&t.name];
        let pair = module_of(&t.name).and_then(|m| weights.get(&m));
        let w = merged_weight(&ckpt, src, shape, pair, scale)?;
        merged += usize::from(pair.is_some());
        Ok(encode(&w, dtype))
    };

    rewrite_config(&mut config, &config_path, dtype, untie)?;
    let bytes_out = write_model_folder(
        &base,
        &opts.output,
        groups,
        &config,
        MAX_SHARD_BYTES,
        &ckpt,
        &mut produce,
    )?;
    Ok(MergeReport {
        base,
        dtype,
        merged_modules: merged,
        bytes_out,
    })
}

/// `Ok` when the requested output dtype (if any) is a float type we write.
fn check_dtype(dtype: Option<DType>) -> Result<()> {
    if let Some(d) = dtype {
        if !matches!(d, DType::F16 | DType::BF16 | DType::F32) {
            return Err(Error::InvalidArg(format!(
                "--dtype {d}: use f16, bf16 or f32"
            )));
        }
    }
    Ok(())
}

/// The base model to merge into: `--model`, else the adapter's `base_model_name_or_path`.
fn base_spec(opts: &MergeOptions, lcfg: &LoraConfig, cfg_path: &Path) -> Result<String> {
    let spec = match (&opts.model, &lcfg.base_model_name_or_path) {
        (Some(m), _) => m.clone(),
        (None, Some(b)) => b.clone(),
        (None, None) => {
            return Err(Error::bad_file(
                cfg_path,
                "no base_model_name_or_path; pass --model",
            ))
        }
    };
    Ok(spec)
}

/// The base model's config.json as JSON.
fn read_config_json(config_path: &Path) -> Result<Value> {
    serde_json::from_str(
        &std::fs::read_to_string(config_path).map_err(|e| Error::io(config_path, e))?,
    )
    .map_err(|e| Error::bad_file(config_path, e.to_string()))
}

/// The output dtype without `--dtype`: the stored embedding's float dtype, else (or 4-bit) f16.
fn default_dtype(ckpt: &Checkpoint, four_bit: bool) -> DType {
    let stored = ckpt.get("model.embed_tokens.weight").map(|i| i.dtype);
    match stored {
        Some(d @ (DType::F16 | DType::BF16 | DType::F32)) if !four_bit => d,
        _ => DType::F16,
    }
}

/// (output name, source name, shape) of every output tensor; an untied head reads the embedding.
fn output_names(names: &[(String, Vec<usize>)], untie: bool) -> Vec<(String, String, Vec<usize>)> {
    let mut out_names: Vec<(String, String, Vec<usize>)> = names
        .iter()
        .map(|(n, s)| (n.clone(), n.clone(), s.clone()))
        .collect();
    if untie {
        let (_, shape) = names
            .iter()
            .find(|(n, _)| n == "model.embed_tokens.weight")
            .expect("embedding is in every plan");
        out_names.push((
            "lm_head.weight".into(),
            "model.embed_tokens.weight".into(),
            shape.clone(),
        ));
    }
    out_names
}

/// One single-tensor output group per output tensor, each produced on demand in `dtype`.
fn output_groups(out_names: &[(String, String, Vec<usize>)], dtype: DType) -> Vec<Vec<OutTensor>> {
    let st_dtype = crate::weights::write::to_safetensors_dtype(dtype).expect("float dtype");
    out_names
        .iter()
        .map(|(name, _, shape)| {
            vec![OutTensor {
                name: name.clone(),
                dtype: st_dtype,
                shape: shape.clone(),
                len: shape.iter().product::<usize>() * dtype.size_in_bytes().expect("float"),
                data: Data::Produce,
            }]
        })
        .collect()
}

/// The f32 base tensor `src` (dequantized if 4-bit) plus `scale · B·A` when `pair` is given.
fn merged_weight(
    ckpt: &Checkpoint,
    src: &str,
    shape: &[usize],
    pair: Option<&LoraPair>,
    scale: f32,
) -> Result<Vec<f32>> {
    let mut w = if is_prequantized(ckpt, src) {
        crate::quant::dequantize_nf4(&load_prequantized(ckpt, src, shape)?)
    } else {
        ckpt.load_f32(src, shape)?
    };
    ckpt.release(src);
    if let Some(pair) = pair {
        add_lora(&mut w, pair, scale);
    }
    Ok(w)
}

/// `Ok` once config.json is rewritten: no quantization_config, the output dtype, maybe untied.
fn rewrite_config(config: &mut Value, config_path: &Path, dtype: DType, untie: bool) -> Result<()> {
    let obj = config
        .as_object_mut()
        .ok_or_else(|| Error::bad_file(config_path, "config.json is not an object"))?;
    obj.remove("quantization_config");
    for key in ["torch_dtype", "dtype"] {
        if obj.contains_key(key) || key == "torch_dtype" {
            obj.insert(key.into(), Value::from(dtype_name(dtype)));
        }
    }
    if untie {
        obj.insert("tie_word_embeddings".into(), Value::Bool(false));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(
            module_of("model.layers.3.self_attn.q_proj.weight"),
            Some(LoraModule::layer(3, LoraTarget::QProj))
        );
        assert_eq!(
            module_of("model.layers.0.mlp.down_proj.weight"),
            Some(LoraModule::layer(0, LoraTarget::DownProj))
        );
        assert_eq!(module_of("lm_head.weight"), Some(LoraModule::lm_head()));
        assert_eq!(module_of("model.layers.0.input_layernorm.weight"), None);
        assert_eq!(module_of("model.embed_tokens.weight"), None);
    }

    #[test]
    fn add_lora_is_w_plus_s_ba() {
        let pair = LoraPair {
            a: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], // [2, 3]
            b: vec![1.0, 0.0, 0.5, -1.0],          // [2, 2]
            in_features: 3,
            out_features: 2,
        };
        let mut w = vec![0.0f32; 6];
        add_lora(&mut w, &pair, 2.0);
        // B·A = [[1,2,3],[0.5-4, 1-5, 1.5-6]]
        assert_eq!(w, vec![2.0, 4.0, 6.0, -7.0, -8.0, -9.0]);
    }
}
