//! The shapes a plan is computed from: the model's dimensions and how each weight is held on
//! the device ([`ModelShape`], [`DeviceWeight`]), the adapter ([`AdapterShape`]) and the run
//! ([`RunShape`]).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraTarget};
use crate::model::{BaseQuant, Recompute};
use crate::train::OptimKind;
use crate::weights::{DType, TensorPlan};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;

/// Rows up to which an NF4 product runs the GEMV (no scratch): `backend::cuda::nf4::GEMV_MAX_M`.
pub(super) const NF4_GEMV_MAX_M: usize = 8;
/// Rows up to which a 16-bit dense product runs the GEMV: `dense_half::HALF_GEMV_MAX_M`.
pub(super) const HALF_GEMV_MAX_M: usize = 8;

/// How one projection weight is held on the CUDA device (`CudaLinear`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DeviceWeight {
    /// `CudaLinear::Nf4`.
    Nf4 {
        blocksize: usize,
        double_quant: bool,
    },
    /// `CudaLinear::Half`: bf16 or f16 values.
    Half,
    /// `CudaLinear::Dense`: f32.
    F32,
}

impl DeviceWeight {
    /// Metered device bytes of a `[rows, cols]` weight in this form (see the module docs).
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        let n = rows * cols;
        match self {
            DeviceWeight::Nf4 {
                blocksize,
                double_quant,
            } => {
                let blocks = n.div_ceil(blocksize);
                let packed = n.div_ceil(2);
                if double_quant {
                    packed + 4 + blocks + 4 * blocks.div_ceil(256) + 4 * 256
                } else {
                    packed + 4 * blocks + 1 + 4 + 4
                }
            }
            DeviceWeight::Half => 2 * n,
            DeviceWeight::F32 => 4 * n,
        }
    }

    /// Whether the fused NF4 kernels take a weight of `cols` input features (the forward GEMM
    /// and the `dy·W` kernel have the same condition for our quantizer's nested block of 256).
    pub(super) fn fused(self, cols: usize) -> bool {
        matches!(self, DeviceWeight::Nf4 { blocksize, .. } if cols % 16 == 0 && blocksize >= 16)
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            DeviceWeight::Nf4 { .. } => "NF4",
            DeviceWeight::Half => "16-bit",
            DeviceWeight::F32 => "f32",
        }
    }
}

/// A dense tensor stored as `dtype` with `cols` input features, as `Backend::linear` keeps it.
fn dense_form(dtype: DType, cols: usize) -> DeviceWeight {
    match dtype {
        DType::F16 | DType::BF16 if cols % 8 == 0 => DeviceWeight::Half,
        _ => DeviceWeight::F32,
    }
}

/// The shapes and device formats of a model, as the plan needs them.
#[derive(Debug, Clone)]
pub struct ModelShape {
    pub cfg: ModelConfig,
    /// Format of each decoder projection: `[layer][index in LoraTarget::ALL_LINEAR]`.
    pub projections: Vec<[DeviceWeight; 7]>,
    pub lm_head: DeviceWeight,
    /// The embedding table (`Backend::linear` of its stored values, like lm_head).
    pub embed: DeviceWeight,
    /// Bytes per stored value of each decoder projection the CUDA loader quantizes on the
    /// device (`Backend::quantize_linear`: the stored f16/bf16/f32 bytes are uploaded as they
    /// are), 0 for one it does not (`--quant none`, a pre-quantized checkpoint); indexed as
    /// `projections`.
    pub raw_width: Vec<[usize; 7]>,
    /// The stored dtypes, e.g. `F16`, for display.
    pub stored: String,
}

impl ModelShape {
    /// Formats from each tensor's stored dtype (`dtype_of(name)`) under `quant`; a decoder
    /// projection stored as U8 is a pre-quantized bitsandbytes weight (`prequant_double_quant`
    /// says whether its scales are double-quantized).
    pub fn new(
        cfg: &ModelConfig,
        quant: BaseQuant,
        dtype_of: impl Fn(&str) -> DType,
        prequant_double_quant: bool,
    ) -> Self {
        let mut stored = BTreeSet::new();
        let mut projections = Vec::with_capacity(cfg.num_hidden_layers);
        let mut raw_width = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut row = [DeviceWeight::F32; 7];
            let mut widths = [0; 7];
            for ((slot, width), t) in row
                .iter_mut()
                .zip(widths.iter_mut())
                .zip(LoraTarget::ALL_LINEAR)
            {
                let parent = t.parent().expect("decoder projection");
                let dtype = dtype_of(&format!("model.layers.{l}.{parent}.{}.weight", t.name()));
                stored.insert(dtype.to_string());
                let (_, cols) = t.shape(cfg);
                // `TensorSource::backend_linear`: NF4 from stored f16/bf16/f32 values.
                *width = match (dtype, quant) {
                    (DType::F16 | DType::BF16, BaseQuant::Nf4 { .. }) => 2,
                    (DType::F32, BaseQuant::Nf4 { .. }) => 4,
                    _ => 0,
                };
                *slot = match (dtype, quant) {
                    (DType::U8, BaseQuant::Nf4 { .. }) => DeviceWeight::Nf4 {
                        blocksize: 64,
                        double_quant: prequant_double_quant,
                    },
                    // Dequantized NF4 values are not 16-bit exact in general.
                    (DType::U8, BaseQuant::None) => DeviceWeight::F32,
                    (
                        _,
                        BaseQuant::Nf4 {
                            blocksize,
                            double_quant,
                        },
                    ) => DeviceWeight::Nf4 {
                        blocksize,
                        double_quant,
                    },
                    (d, BaseQuant::None) => dense_form(d, cols),
                };
            }
            projections.push(row);
            raw_width.push(widths);
        }
        let head_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let head_dtype = dtype_of(head_name);
        stored.insert(head_dtype.to_string());
        let embed_dtype = dtype_of("model.embed_tokens.weight");
        stored.insert(embed_dtype.to_string());
        ModelShape {
            cfg: cfg.clone(),
            projections,
            lm_head: dense_form(head_dtype, cfg.hidden_size),
            embed: dense_form(embed_dtype, cfg.hidden_size),
            raw_width,
            stored: stored.into_iter().collect::<Vec<_>>().join("+"),
        }
    }

    /// Reads the dtypes from the checkpoint in `dir` (safetensors headers, or the shard index and
    /// the config's `torch_dtype` where shards are absent) without reading any weight.
    pub fn from_dir(dir: &Path, cfg: &ModelConfig, quant: BaseQuant) -> Result<Self> {
        let plan = TensorPlan::new(dir, cfg)?;
        let dtypes: std::collections::HashMap<&str, DType> = plan
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dtype))
            .collect();
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&config_path, e.to_string()))?;
        let dq = crate::quant::bnb::parse_quantization_config(&raw, &config_path)?
            .is_none_or(|q| q.double_quant);
        Ok(Self::new(
            cfg,
            quant,
            |name| dtypes.get(name).copied().unwrap_or(DType::F32),
            dq,
        ))
    }

    pub(super) fn dims(&self) -> Dims {
        let c = &self.cfg;
        Dims {
            c: c.hidden_size,
            f: c.intermediate_size,
            q: c.q_dim(),
            k: c.kv_dim(),
            h: c.num_attention_heads,
            v: c.vocab_size,
            layers: c.num_hidden_layers,
        }
    }

    /// The format of projection `t` of `layer` (`None`: lm_head).
    pub(super) fn format(&self, layer: Option<usize>, t: LoraTarget) -> DeviceWeight {
        match (layer, target_index(t)) {
            (Some(l), Some(i)) => self.projections[l][i],
            _ => self.lm_head,
        }
    }
}

fn target_index(t: LoraTarget) -> Option<usize> {
    LoraTarget::ALL_LINEAR.iter().position(|&x| x == t)
}

/// The model's dimensions in the notation of the module docs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub c: usize,
    pub f: usize,
    pub q: usize,
    pub k: usize,
    pub h: usize,
    pub v: usize,
    pub layers: usize,
}

/// The adapter of a run: rank, adapted targets (in every layer; `LmHead` for the head), dropout.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterShape {
    pub rank: usize,
    pub targets: Vec<LoraTarget>,
    pub dropout: f32,
}

impl AdapterShape {
    pub fn from_config(cfg: &LoraConfig) -> Self {
        AdapterShape {
            rank: cfg.r,
            targets: cfg.targets(),
            dropout: cfg.lora_dropout,
        }
    }

    pub(super) fn adapted(&self, t: LoraTarget) -> bool {
        self.targets.contains(&t)
    }

    /// Element counts of every trainable tensor (`A` then `B` per module), in the optimizer's order.
    pub(super) fn tensor_sizes(&self, cfg: &ModelConfig) -> Vec<usize> {
        let r = self.rank;
        let mut layer_targets: Vec<LoraTarget> = self
            .targets
            .iter()
            .copied()
            .filter(|&t| t != LoraTarget::LmHead)
            .collect();
        layer_targets.sort();
        let mut sizes = Vec::new();
        for _ in 0..cfg.num_hidden_layers {
            for &t in &layer_targets {
                let (out, inp) = t.shape(cfg);
                sizes.extend([r * inp, out * r]);
            }
        }
        if self.adapted(LoraTarget::LmHead) {
            let (out, inp) = LoraTarget::LmHead.shape(cfg);
            sizes.extend([r * inp, out * r]);
        }
        sizes
    }
}

/// Everything a plan depends on.
#[derive(Debug, Clone)]
pub struct RunShape {
    pub model: ModelShape,
    pub adapter: AdapterShape,
    pub recompute: Recompute,
    /// `--optim`: the states' form (32-bit or 8-bit) and memory (managed for the paged kinds:
    /// metered the same).
    pub optim: OptimKind,
    /// The sequence lengths of each distinct micro-batch the run trains on.
    pub micro_batches: Vec<Vec<usize>>,
    /// Tokens of the longest held-out example, when the run evaluates.
    pub eval_len: Option<usize>,
    /// Rows per chunk of the fused head ([`CE_CHUNK`](crate::model::train::CE_CHUNK)).
    pub ce_chunk: usize,
    /// Count the CUDA backend's own buffers (weights, optimizer states, scratch, uploads,
    /// flash-attention tables and Δ, the loader's quantization buffers). `false` leaves only
    /// what the model code allocates through the backend trait (`zeros`, `upload`, `stash`,
    /// `unstash`): what a metering wrapper around the CPU backend sees, which is how the replay
    /// is tested.
    pub device_internals: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NF4 line equals what `quantize_nf4` produces plus the device's placeholders and code
    /// table (`DeviceNf4::upload`), for both scale formats.
    #[test]
    fn nf4_device_bytes_follow_the_host_tensor() {
        for &(r, c) in &[(7usize, 13usize), (300, 64), (64, 4096), (33, 100)] {
            let w: Vec<f32> = (0..r * c)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            for dq in [false, true] {
                let t = crate::quant::quantize_nf4(&w, &[r, c], 64, dq).unwrap();
                let host = match &t.absmax {
                    crate::quant::Absmax::F32(v) => t.packed.len() + 4 * v.len() + 1 + 4 + 4,
                    crate::quant::Absmax::Double {
                        q,
                        nested_absmax,
                        nested_code,
                        ..
                    } => {
                        t.packed.len()
                            + 4
                            + q.len()
                            + 4 * nested_absmax.len()
                            + 4 * nested_code.len()
                    }
                };
                let fmt = DeviceWeight::Nf4 {
                    blocksize: 64,
                    double_quant: dq,
                };
                assert_eq!(fmt.bytes(r, c), host, "{r}x{c} dq {dq}");
            }
        }
    }
}
