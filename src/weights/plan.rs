//! The tensor plan: what loading a checkpoint would do, without reading any weights.

use super::shard::Shard;
use super::{
    is_rotary_inv_freq, llama_tensor_names, DType, Index, PlannedTensor, Source, SINGLE_FILE,
};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The load plan of a checkpoint directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    /// `model.safetensors` or `model.safetensors.index.json`.
    pub source: PathBuf,
    /// The tensors the model needs, in [`llama_tensor_names`] order.
    pub tensors: Vec<PlannedTensor>,
    /// Tensors the checkpoint has but the model does not use (sorted): `*.rotary_emb.inv_freq`
    /// buffers, and anything else (each logged with a warning).
    pub ignored: Vec<String>,
}

/// The load plan of `dir` for a model with config `cfg`; see [`TensorPlan::new`].
pub fn tensor_plan(dir: &Path, cfg: &ModelConfig) -> Result<Vec<PlannedTensor>> {
    TensorPlan::new(dir, cfg).map(|p| p.tensors)
}

impl TensorPlan {
    /// Plans the load of `dir` from its index (or single-file header) without reading weights.
    ///
    /// Each tensor's shape is the one `cfg` implies. Where its shard is present the header is
    /// validated and gives the dtype, and the stored shape must match; where the shard is
    /// absent the dtype is the config's `torch_dtype`. A tensor the model needs that the index
    /// lacks is [`Error::MissingTensor`] naming the index.
    pub fn new(dir: &Path, cfg: &ModelConfig) -> Result<TensorPlan> {
        let (source, names, shards) = match Source::locate(dir)? {
            Source::Single(path) => {
                let shard = Shard::open(&path)?;
                let names: BTreeMap<String, String> = shard
                    .tensors
                    .keys()
                    .map(|n| (n.clone(), SINGLE_FILE.to_string()))
                    .collect();
                let shards = BTreeMap::from([(SINGLE_FILE.to_string(), Some(shard))]);
                (path, names, shards)
            }
            Source::Index(path) => {
                let index = Index::read(&path)?;
                let mut shards = BTreeMap::new();
                for shard_name in index.shards().into_keys() {
                    let shard_path = dir.join(shard_name);
                    let shard = if shard_path.exists() {
                        Some(Shard::open(&shard_path)?)
                    } else {
                        None
                    };
                    shards.insert(shard_name.to_string(), shard);
                }
                (path, index.weight_map, shards)
            }
        };

        let expected = llama_tensor_names(cfg);
        let mut tensors = Vec::with_capacity(expected.len());
        for (name, shape) in &expected {
            let shard_name = names.get(name).ok_or_else(|| Error::MissingTensor {
                path: source.clone(),
                name: name.clone(),
            })?;
            let dtype = match &shards[shard_name] {
                Some(shard) => stored_dtype(shard, name, shape)?,
                None => {
                    let torch = cfg.torch_dtype.as_deref();
                    torch.and_then(DType::from_torch_dtype).ok_or_else(|| {
                        Error::bad_file(
                            &source,
                            format!(
                                "shard `{shard_name}` is not present and the config's torch_dtype ({}) \
                                 is not float32/float16/bfloat16, so the dtype of `{name}` is unknown",
                                torch.unwrap_or("unset")
                            ),
                        )
                    })?
                }
            };
            tensors.push(PlannedTensor {
                name: name.clone(),
                shape: shape.clone(),
                dtype,
                shard: shard_name.clone(),
            });
        }

        let wanted: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let ignored: Vec<String> = names
            .into_keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .collect();
        for name in &ignored {
            if !is_rotary_inv_freq(name) {
                tracing::warn!(
                    "{}: ignoring tensor `{name}`, which LlamaForCausalLM does not use",
                    source.display()
                );
            }
        }
        Ok(TensorPlan {
            source,
            tensors,
            ignored,
        })
    }

    /// Total stored bytes of the planned tensors (tensors of [`DType::Other`] count as 0).
    pub fn total_bytes(&self) -> usize {
        self.tensors.iter().filter_map(PlannedTensor::nbytes).sum()
    }
}

/// The dtype of `name` in a present shard, checking it is there with the expected shape.
fn stored_dtype(shard: &Shard, name: &str, shape: &[usize]) -> Result<DType> {
    let bad = |msg: String| Error::BadTensor {
        path: shard.path.clone(),
        name: name.to_string(),
        msg,
    };
    let t = shard.tensors.get(name).ok_or_else(|| {
        bad(format!(
            "listed in {} but absent from this shard",
            super::INDEX_FILE
        ))
    })?;
    // A bitsandbytes 4-bit weight is stored packed, `[ceil(n/2), 1]` bytes, beside its quant_state;
    // the plan keeps its logical shape and reports dtype U8 (`quant::bnb` validates the rest).
    let prequantized = shard
        .tensors
        .contains_key(&format!("{name}.quant_state.bitsandbytes__nf4"));
    let n: usize = shape.iter().product();
    if prequantized && t.shape == [n.div_ceil(2), 1] && DType::from(t.dtype) == DType::U8 {
        return Ok(DType::U8);
    }
    if t.shape != shape {
        return Err(bad(format!("expected {shape:?}, found {:?}", t.shape)));
    }
    Ok(t.dtype.into())
}
