//! `qlora export`: a model (optionally with a LoRA adapter folded in) as one GGUF file that
//! llama.cpp, Ollama and LM Studio load.
//!
//! The merge is `qlora merge`'s ([`crate::merge::add_lora`]: `W' = W + s·B·A` in f32 over the
//! base widened to f32; a bitsandbytes 4-bit base is dequantized first). Each tensor is then
//! renamed to llama.cpp's name, q/k rows permuted to llama.cpp's RoPE layout
//! ([`llama::permute_rows`]) and encoded: 1-D tensors (norms, RoPE factors) stay F32 as in
//! llama.cpp's converter; matrices take the requested type, except that Q8_0 falls back to F16
//! for a matrix whose rows are not a multiple of 32 long (as the converter does).
//! Metadata: `general.*`, the `llama.*` hyper-parameters ([`llama::add_hparams`]) and the
//! tokenizer ([`vocab::add_tokenizer`]).
//!
//! With tied embeddings and no adapted `lm_head`, no `output.weight` is written (llama.cpp then
//! reuses `token_embd.weight`); an adapted `lm_head` on tied embeddings is written untied.
//! Streaming: one tensor in memory at a time, written to a temporary file renamed at the end.
//! With `lora_only`, the adapter alone is written as a GGUF LoRA instead ([`lora`]).

pub mod encode;
pub mod gguf;
pub mod llama;
pub mod lora;
pub mod pre;
pub mod vocab;

use crate::error::{Error, Result};
use crate::lora::{load_adapter, LoraConfig, LoraModule, LoraWeights};
use crate::merge::{add_lora, module_of};
use crate::quant::bnb::{is_prequantized, load_prequantized};
use crate::weights::{llama_tensor_names, Checkpoint};
use encode::GgmlType;
use gguf::{GgufWriter, TensorInfo, Value};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Storage type of the exported matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl ExportDtype {
    pub fn ggml(self) -> GgmlType {
        match self {
            ExportDtype::F32 => GgmlType::F32,
            ExportDtype::F16 => GgmlType::F16,
            ExportDtype::Bf16 => GgmlType::BF16,
            ExportDtype::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LlamaFileType`).
    pub fn file_type(self) -> u32 {
        match self {
            ExportDtype::F32 => 0,
            ExportDtype::F16 => 1,
            ExportDtype::Q8_0 => 7,
            ExportDtype::Bf16 => 32,
        }
    }
}

impl FromStr for ExportDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => ExportDtype::F32,
            "f16" => ExportDtype::F16,
            "bf16" => ExportDtype::Bf16,
            "q8_0" => ExportDtype::Q8_0,
            _ => {
                return Err(Error::InvalidArg(format!(
                    "GGUF dtype {s:?}: use f32, f16, bf16 or q8_0"
                )))
            }
        })
    }
}

/// What `qlora export` was asked to do.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Base model; default: the adapter's `base_model_name_or_path`.
    pub model: Option<String>,
    pub adapter: Option<PathBuf>,
    pub output: PathBuf,
    pub dtype: ExportDtype,
    pub overwrite: bool,
    /// Write the adapter alone as a GGUF LoRA ([`lora`]) instead of the merged model.
    pub lora_only: bool,
}

/// What an export did.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    pub base: PathBuf,
    pub tensors: usize,
    pub merged_modules: usize,
    /// `tokenizer.ggml.model`: `llama` or `gpt2` (`none` for a LoRA file).
    pub tokenizer: &'static str,
    pub bytes_out: u64,
}

/// One tensor to write: where its values come from and how it is stored.
struct Planned {
    info: TensorInfo,
    /// Hugging Face source tensor, or `None` for the RoPE factors.
    source: Option<String>,
    /// LoRA module folded in.
    module: Option<LoraModule>,
    permute: Option<usize>,
}

fn check_output(out: &Path, overwrite: bool) -> Result<()> {
    if out.is_dir() {
        return Err(Error::InvalidArg(format!(
            "output {} is a folder; give a file name such as model.gguf",
            out.display()
        )));
    }
    if out.exists() && !overwrite {
        return Err(Error::InvalidArg(format!(
            "output {} exists; pass --overwrite to replace it",
            out.display()
        )));
    }
    Ok(())
}

fn resolve_base(opts: &ExportOptions) -> Result<String> {
    if let Some(m) = &opts.model {
        return Ok(m.clone());
    }
    let dir = opts
        .adapter
        .as_ref()
        .ok_or_else(|| Error::InvalidArg("export needs --model, --adapter or both".into()))?;
    let path = dir.join(crate::lora::CONFIG_FILE);
    LoraConfig::from_file(&path)?
        .base_model_name_or_path
        .ok_or_else(|| Error::bad_file(&path, "no base_model_name_or_path; pass --model"))
}

fn plan(
    cfg: &crate::config::ModelConfig,
    weights: Option<&LoraWeights>,
    dtype: ExportDtype,
) -> Vec<Planned> {
    let mut names = llama_tensor_names(cfg);
    let untie =
        cfg.tie_word_embeddings && weights.is_some_and(|w| w.get(&LoraModule::lm_head()).is_some());
    if untie {
        names.push((
            "lm_head.weight".into(),
            vec![cfg.vocab_size, cfg.hidden_size],
        ));
    }
    let mut out: Vec<Planned> = Vec::with_capacity(names.len() + 1);
    if let Some(f) = llama::llama3_rope_factors(cfg) {
        out.push(Planned {
            info: TensorInfo {
                name: "rope_freqs.weight".into(),
                shape: vec![f.len()],
                ty: GgmlType::F32,
            },
            source: None,
            module: None,
            permute: None,
        });
    }
    for (hf, shape) in names {
        let name = llama::gguf_name(&hf).expect("every planned Llama tensor has a GGUF name");
        let mut ty = if shape.len() == 1 {
            GgmlType::F32
        } else {
            dtype.ggml()
        };
        if !ty.fits(&shape) {
            tracing::warn!(tensor = %name, ?shape, "rows not a multiple of 32: F16 instead of Q8_0");
            ty = GgmlType::F16;
        }
        let module = module_of(&hf).filter(|m| weights.is_some_and(|w| w.get(m).is_some()));
        let source = if hf == "lm_head.weight" && untie {
            "model.embed_tokens.weight".to_string()
        } else {
            hf.clone()
        };
        out.push(Planned {
            info: TensorInfo { name, shape, ty },
            permute: llama::permute_heads(&hf, cfg),
            source: Some(source),
            module,
        });
    }
    out
}

/// Exports as `opts` says; see the module docs.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    let spec = resolve_base(opts)?;
    let base = crate::hub::resolve_model(&spec)?;
    let cfg = crate::loader::read_config(&base)?;
    if opts.lora_only {
        return lora::export_lora(opts, base, &cfg);
    }
    let adapter = match &opts.adapter {
        Some(dir) => Some(load_adapter(dir, &cfg)?),
        None => None,
    };
    check_output(&opts.output, opts.overwrite)?;
    let ckpt = Checkpoint::open(&base)?;

    let mut g = GgufWriter::new();
    g.add("general.architecture", Value::Str(llama::ARCH.into()));
    g.add("general.type", Value::Str("model".into()));
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    g.add("general.name", Value::Str(name));
    g.add(
        "general.alignment",
        Value::U32(gguf::DEFAULT_ALIGNMENT as u32),
    );
    g.add("general.file_type", Value::U32(opts.dtype.file_type()));
    if opts.dtype == ExportDtype::Q8_0 {
        g.add("general.quantization_version", Value::U32(2));
    }
    llama::add_hparams(&mut g, &cfg);
    let tokenizer = vocab::add_tokenizer(&mut g, &base, &cfg)?;

    let planned = plan(&cfg, adapter.as_ref().map(|(_, w)| w), opts.dtype);
    for p in &planned {
        g.add_tensor(p.info.clone())?;
    }
    let mut merged = 0usize;
    let bytes_out = g.write(&opts.output, |i, info| {
        let p = &planned[i];
        let Some(src) = &p.source else {
            let f = llama::llama3_rope_factors(&cfg).expect("planned only with llama3 scaling");
            return Ok(info.ty.encode(&f));
        };
        let mut w = if is_prequantized(&ckpt, src) {
            crate::quant::dequantize_nf4(&load_prequantized(&ckpt, src, &info.shape)?)
        } else {
            ckpt.load_f32(src, &info.shape)?
        };
        ckpt.release(src);
        if let (Some(m), Some((lcfg, weights))) = (&p.module, &adapter) {
            add_lora(
                &mut w,
                weights.get(m).expect("planned module"),
                lcfg.scaling(),
            );
            merged += 1;
        }
        if let Some(heads) = p.permute {
            w = llama::permute_rows(&w, heads, info.shape[1]);
        }
        Ok(info.ty.encode(&w))
    })?;
    Ok(ExportReport {
        base,
        tensors: planned.len(),
        merged_modules: merged,
        tokenizer,
        bytes_out,
    })
}
