//! Checkpoint loading: memory-mapped, optionally sharded safetensors, and the tensor plan.
//!
//! # Layout of a checkpoint directory
//!
//! A Hugging Face checkpoint stores its weights either in one file, `model.safetensors`, or in
//! several shards described by `model.safetensors.index.json`, whose `weight_map` maps each
//! tensor name to the shard file holding it. When both exist the single file wins (transformers
//! looks for it first). PyTorch `.bin` pickles are not supported; the error says so.
//!
//! # The safetensors format
//!
//! A safetensors file is an 8-byte little-endian header length `n`, then `n` bytes of JSON
//! (`{"name": {"dtype": "F16", "shape": [..], "data_offsets": [start, end]}, "__metadata__": ..}`),
//! then the data section. Offsets are relative to the data section; tensors are little-endian,
//! row-major, tightly packed, and must tile the data section exactly.
//!
//! [`Checkpoint::open`] maps every shard once with `memmap2` and validates its header with the
//! `safetensors` crate ([`safetensors::SafeTensors::read_metadata`]), after cheap checks of our
//! own so that the common corruptions get a precise message: a file shorter than 8 bytes, an
//! absurd header length, a header longer than the file, data running past the end of the file
//! (truncation) or trailing bytes, offsets that overlap or leave gaps, and byte ranges that do
//! not match `dtype × shape`. Every tensor the index lists must be present in its shard.
//!
//! The memory maps live inside the [`Checkpoint`]; each tensor is recorded as (shard, byte
//! range) and sliced on demand, so no self-referential borrowing is needed. Tensor data is not
//! touched until asked for. Offsets need not be aligned for the element type (old writers did
//! not pad the header), so [`Checkpoint::load_f32`] casts in place only when the data happens to
//! be aligned and otherwise decodes the little-endian bytes; large tensors are widened to f32 in
//! parallel chunks.
//!
//! # The tensor plan
//!
//! [`tensor_plan`] describes what loading *would* do — every tensor the model needs, its shape,
//! dtype and shard — from `config.json` and the index alone, so that `inspect` works on a
//! checkpoint whose shards have not been downloaded. Where a shard is present its header is
//! validated and supplies the dtype; otherwise the dtype is the config's `torch_dtype`.
//! `*.rotary_emb.inv_freq` buffers (saved by old conversions) are ignored as transformers does;
//! other tensors the model does not use are ignored with a warning.

mod checkpoint;
mod convert;
mod plan;
mod shard;
pub mod write;

pub use checkpoint::Checkpoint;
pub use plan::{tensor_plan, TensorPlan};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Element type of a stored tensor, as named in safetensors headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    /// Any other safetensors dtype (unsigned 16/32/64-bit, fp8, fp4, ...).
    Other,
}

impl DType {
    /// Bytes per element; `None` for [`DType::Other`], whose width we do not track.
    pub fn size_in_bytes(self) -> Option<usize> {
        match self {
            DType::F64 | DType::I64 => Some(8),
            DType::F32 | DType::I32 => Some(4),
            DType::F16 | DType::BF16 | DType::I16 => Some(2),
            DType::I8 | DType::U8 | DType::Bool => Some(1),
            DType::Other => None,
        }
    }

    /// Whether [`Checkpoint::load_f32`] can widen this dtype (F32, F16, BF16).
    pub fn is_loadable_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The dtype a config's `torch_dtype` names (`float16`, `bfloat16`, `float32`, with or
    /// without a `torch.` prefix); `None` for anything else.
    pub fn from_torch_dtype(s: &str) -> Option<DType> {
        match s.strip_prefix("torch.").unwrap_or(s) {
            "float32" | "float" => Some(DType::F32),
            "float16" | "half" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }
}

impl From<safetensors::Dtype> for DType {
    fn from(d: safetensors::Dtype) -> Self {
        use safetensors::Dtype as S;
        match d {
            S::F32 => DType::F32,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F64 => DType::F64,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::I16 => DType::I16,
            S::I8 => DType::I8,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            _ => DType::Other,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
            DType::Other => "OTHER",
        })
    }
}

/// One tensor of an opened [`Checkpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The shard file holding the tensor (full path).
    pub file: PathBuf,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One tensor of a [`tensor_plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// The shard file name, relative to the checkpoint directory.
    pub shard: String,
}

impl PlannedTensor {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Stored size in bytes; `None` when the dtype is [`DType::Other`].
    pub fn nbytes(&self) -> Option<usize> {
        self.dtype.size_in_bytes().map(|s| s * self.numel())
    }
}

/// The tensors a `LlamaForCausalLM` with this config expects, with their shapes, in a stable
/// order: the embedding; per layer the input norm, q/k/v/o projections, post-attention norm,
/// gate/up/down projections; the final norm; `lm_head` unless the embeddings are tied.
/// Linear weights are PyTorch's `[out, in]`.
pub fn llama_tensor_names(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
    let mut out = Vec::with_capacity(3 + 9 * cfg.num_hidden_layers);
    out.push(("model.embed_tokens.weight".to_string(), vec![v, h]));
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![f, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![f, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, f]),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Whether a tensor is a RoPE `inv_freq` buffer, which old checkpoints saved and transformers
/// ignores on load (it recomputes the frequencies from the config).
pub fn is_rotary_inv_freq(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Where a checkpoint's weights are.
pub(crate) enum Source {
    /// `model.safetensors`
    Single(PathBuf),
    /// `model.safetensors.index.json`
    Index(PathBuf),
}

impl Source {
    /// Finds the weights of `dir`, or explains what the directory holds instead.
    pub(crate) fn locate(dir: &Path) -> Result<Source> {
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Ok(Source::Single(single));
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Ok(Source::Index(index));
        }
        Err(no_weights_error(dir))
    }
}

fn no_weights_error(dir: &Path) -> Error {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => return Error::io(dir, e),
    };
    names.sort();
    const SHOWN: usize = 20;
    let listing = if names.is_empty() {
        "the directory is empty".to_string()
    } else {
        let mut s = names
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if names.len() > SHOWN {
            s.push_str(&format!(", ... and {} more", names.len() - SHOWN));
        }
        format!("it contains: {s}")
    };
    let bin = if names.iter().any(|n| n.ends_with(".bin")) {
        "; pytorch .bin checkpoints are not supported, convert to safetensors"
    } else {
        ""
    };
    Error::NotFound(format!(
        "{}: no {SINGLE_FILE} or {INDEX_FILE} ({listing}){bin}",
        dir.display()
    ))
}

/// A parsed `model.safetensors.index.json`.
pub(crate) struct Index {
    /// Tensor name → shard file name (relative to the checkpoint directory).
    pub weight_map: BTreeMap<String, String>,
}

impl Index {
    pub(crate) fn read(path: &Path) -> Result<Index> {
        #[derive(Deserialize)]
        struct Raw {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: Raw = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("malformed index JSON: {e}")))?;
        if raw.weight_map.is_empty() {
            return Err(Error::bad_file(path, "weight_map is empty"));
        }
        for (name, shard) in &raw.weight_map {
            let plain = !shard.is_empty()
                && Path::new(shard)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
            if !plain {
                return Err(Error::bad_file(
                    path,
                    format!("tensor `{name}` maps to {shard:?}, which is not a relative file name inside the checkpoint directory"),
                ));
            }
        }
        Ok(Index {
            weight_map: raw.weight_map,
        })
    }

    /// Distinct shard names with the tensors mapped to each, sorted.
    pub(crate) fn shards(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, shard) in &self.weight_map {
            out.entry(shard.as_str()).or_default().push(name.as_str());
        }
        out
    }
}
