//! The device-memory plan of a training run (`qlora train --dry-run`): what the CUDA backend will
//! allocate, line by line, from `config.json`, the safetensors headers (or only the shard index:
//! shapes follow from the config, dtypes from `torch_dtype`) and the token counts of the data,
//! without reading a weight.
//!
//! # What the plan reproduces
//! Every buffer the CUDA backend allocates is metered ([`DevBuf`], and the paged optimizer's
//! managed allocation through `meter_external`) at its requested size, `len.max(1) ·
//! size_of::<T>()`; `CudaDevice::peak_bytes` is the high-water mark. The **metered** subtotal of
//! the plan is that figure: the persistent buffers are summed from their shapes, and one training
//! step is replayed allocation by allocation — each `zeros`, `stash`, `unstash`, upload and drop
//! of `model/train.rs` (`layer_forward_train`, `head_backward`, `mlp_backward`,
//! `layer_backward`, `forward_backward_packed`) and of the CUDA ops under them — in the order the
//! code performs them and with Rust's drop points, for every distinct micro-batch of the run;
//! the largest live total is the peak. The lines are what is alive at that moment, by kind, so
//! they add up to the subtotal exactly. Below it come what the meter does not see: cuBLAS'
//! workspace, the allocator's slack, and (informational) the CUDA context.
//!
//! Notation: `L` layers, `C` hidden, `F` intermediate, `Q = heads·head_dim`, `K =
//! kv_heads·head_dim`, `H` heads, `V` vocab, `r` LoRA rank, `T` rows of a micro-batch (the sum of
//! its sequence lengths: the trainer packs a micro-batch along the token axis), `S` the longest of
//! its sequences, `B = min(CE_CHUNK, T)` rows of the head's chunk, `in`/`out` a projection's
//! features. f32 buffers take 4 bytes a value, bf16 stashes 2.
//!
//! # Persistent lines
//! - **NF4 projections** (`DeviceNf4::upload`, per `[out, in]` weight, `n = out·in`, block `b`):
//!   packed codes `⌈n/2⌉` B; with double quantization the 8-bit scale codes `⌈n/b⌉` B, the nested
//!   f32 absmax `4·⌈⌈n/b⌉/256⌉` B, the 256-entry f32 code table 1024 B and a 1-value f32 absmax
//!   placeholder 4 B; without it the f32 absmax `4·⌈n/b⌉` B and placeholders of 1 + 4 + 4 B.
//!   Llama-2-7B's `4096×4096` weight: 8,655,876 B; `11008×4096`: 23,260,932 B.
//! - **Dense projections** (`--quant none`) and **lm_head** (never quantized): `CudaLinear::Half`,
//!   `2·n` B, when the checkpoint stores them in f16/bf16 (`DeviceHalf::lossless`: the f32 widening
//!   narrows back exactly; also needs `in % 8 == 0`), else f32 `4·n` B. An f32 checkpoint is
//!   assumed not to hold exactly-16-bit values. A pre-quantized (bitsandbytes) checkpoint is
//!   assumed to use blocks of 64 (bitsandbytes' default; the block size lives in its
//!   `quant_state`, which a plan does not read).
//! - **Embedding**: the table is uploaded as f32, `4·V·C` (`Llama::assemble`). With tied
//!   embeddings lm_head is a separate copy of the same table (`CudaLinear` built from a clone), so
//!   tying saves no device memory.
//! - **Norms and RoPE table**: `2L + 1` f32 norm vectors of `C`, and `head_dim/2` f32 inverse
//!   frequencies.
//! - **LoRA parameters and gradients**: per adapted module `A [r, in]`, `B [out, r]` in f32, once
//!   for the master weights and once for the gradient accumulators (`LoraSet::zeros_like`).
//! - **AdamW states** (`DeviceAdamW`): `m` and `v` in one allocation of `2·P` f32, `P = Σ
//!   round_up(n_t, 64)` over the `2·modules` tensors (each tensor's states start at a multiple of
//!   64 values, `adamw.rs` `Layout`), at least 64 values; for `paged_adamw_32bit` it is CUDA
//!   managed memory, metered all the same (it is device memory while resident, and it is
//!   prefetched to the device before every step). Plus the per-tensor launch table `6·8` B and
//!   scalars `2·4 + 8` B per tensor, and the 8-byte norm output.
//! - **LoRA staging scratch** (`lora.rs` `LoraScratch`, grown on demand, never shrunk, so it holds
//!   the largest use of the run): bf16 `x̃ [m, in]`, `A [r, in]`, `B [out, r]`, `xa [m, r]`, `dy [m,
//!   out]`, `g [m, r]`, f32 `g [m, r]` and, with dropout, f32 `ga [m, in]`; each sized by the
//!   largest adapted module that uses it, `m = T` for decoder projections, `B` for lm_head, the
//!   longest held-out example for evaluation.
//! - **GEMM staging and RoPE positions**: `Bf16Scratch`'s 16-bit activation buffer used by 16-bit
//!   dense weights (lm_head's `dy·W` rounds `[B, V]` to 16 bits: 16.4 MB for Llama-2; its forward
//!   `[B, C]`; with `--quant none` every projection's `[T, in]` and `[T, out]`), the f32
//!   dequantization scratch an NF4 weight the fused kernels cannot take falls back to (`in % 16
//!   ≠ 0`: `[out, in]` f32), and the cached RoPE positions (`4·T` B).
//!
//! # One step (replayed)
//! Forward (`forward_backward_packed`): the embedded input `x` (`[T, C]` f32), then per layer
//! `layer_forward_train`: `n₁ [T, C]`, `q [T, Q]`, `k, v [T, K]`, each adapted projection's
//! dropout mask `[T, in]` f32 (plus, when the batch holds several sequences, each sequence's mask
//! slice `[len, in]` built apart and copied in), its kept `xa [T, r]`, `att [T, Q]`, `lse [T, H]`,
//! `h [T, C]`, `gate, up [T, F]`, `m [T, F]`, `out [T, C]`; then `h, q, k, v, att, gate, up` are
//! stashed to bf16 one by one (each bf16 copy allocated before its f32 source is dropped), `n₁`
//! and `m` are dropped, and the layer input is stashed (`[T, C]` bf16). Attention over several
//! sequences copies each sequence's `q, k, v` out and its `out, lse` back (the kernels take one
//! sequence): `2·S·Q + 2·S·K + S·H` f32 for the longest.
//! [`Recompute::Selective`] keeps the stashes, `lse` and every `xa` per layer; [`Recompute::Full`]
//! keeps only the stashed inputs, and reruns `layer_forward_train` per layer in the backward.
//!
//! Head (`head_backward`): the gradient `dx [T, C]`, then `n, dn [T, C]`, the chunk's `nc, dnc
//! [B, C]`, the logits/gradient chunk `z [B, V]`, the losses `[T]` and `[B]`; per chunk the
//! uploaded targets and, when lm_head is adapted, its mask and `xa`. After the head the final
//! layer output is dropped.
//!
//! Backward, per layer from the last: the layer input unstashed to f32 (its stash freed), the
//! layer's activations (kept, or recomputed: the recompute's output is dropped at once), then
//! `mlp_backward`: `gate, up` unstashed, `m`, `dm [T, F]`, the down projection's mask (`[T, F]`),
//! `m` dropped, `dg, du [T, F]`, `dm, gate, up` dropped, `h` unstashed, `n₂, dn [T, C]`, gate/up
//! masks `[T, C]`, `dg, du, n₂` dropped, `tmp [T, C]`; then the attention block: `att` unstashed,
//! `datt [T, Q]`, o_proj's mask `[T, Q]`, `dq [T, Q]`, `dk, dv [T, K]`, `q, k, v` unstashed, the
//! attention backward's `Δ [T, H]` (several sequences: each sequence's `q, k, v, dout, out, lse`
//! copied out, `dq, dk, dv` computed apart and copied back, plus `Δ`), then `n₁, dn [T, C]`, the
//! q/k/v masks `[T, C]`, `tmp [T, C]` (not in layer 0, whose input gradient is not needed).
//!
//! The peak is, for Llama shapes with dropout on the down projection, in the last layer's
//! `mlp_backward` at the down projection's mask: every layer's kept activations are alive, and
//! `gate, up, m, dm` (`4·T·F` f32) plus the `[T, F]` mask and one sequence's `[S, F]` slice. With
//! `--recompute full` it is the same moment with one layer's activations instead of all.
//!
//! Evaluation (when the run holds out data) runs between steps, when the step's buffers are
//! freed: `Llama::forward` of the longest held-out example with its KV cache (`2L · T_e·K`), the
//! forward scratch (`2·T_e·C + 2·T_e·Q + 2·T_e·K + 3·T_e·F`), the final norm and the full logits
//! `[T_e, V]`. Its peak counts when it exceeds the step's.
//!
//! # Not metered
//! - **cuBLAS workspace**: the handle (`CudaBlas::new`) is created without
//!   `cublasSetWorkspace`, so cuBLAS allocates its default workspace itself: 32 MiB on Hopper
//!   and newer, 4 MiB on older GPUs (cuBLAS documentation, `cublasSetWorkspace`). The plan counts
//!   [`CUBLAS_WORKSPACE`] = 32 MiB, the larger.
//! - **Allocator slack**: cudarc allocates through the stream-ordered pool (`cuMemAllocAsync`);
//!   each allocation is rounded up to the pool's granularity, and freed blocks sit in the pool until
//!   reused. The plan adds [`SLACK_PERCENT`] = 5% of the metered subtotal for it (a policy, to be
//!   calibrated against `nvidia-smi` on a device).
//! - **CUDA context** (informational, [`CUDA_CONTEXT`] = 512 MiB, an estimate): the driver's
//!   context, the loaded kernel modules and cuBLAS' own state. Free memory reported by a detected
//!   GPU already excludes it (the plan opens the device first); a `--gpu-memory` card size does
//!   not, so the fit check adds it there.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraTarget};
use crate::model::train::CE_CHUNK;
use crate::model::{BaseQuant, Recompute};
use crate::train::config::{Resume, TrainConfig};
use crate::train::data::{epoch_batches, BatchOptions, Example};
use crate::train::OptimKind;
use crate::weights::{DType, TensorPlan};
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// cuBLAS' default workspace on Hopper (4 MiB on older GPUs): not metered, counted in the total.
pub const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Allocator slack, in percent of the metered subtotal.
pub const SLACK_PERCENT: usize = 5;
/// Estimated CUDA context (driver context, kernel modules, cuBLAS state): informational.
pub const CUDA_CONTEXT: usize = 512 << 20;
/// Rows up to which an NF4 product runs the GEMV (no scratch): `backend::cuda::nf4::GEMV_MAX_M`.
const NF4_GEMV_MAX_M: usize = 8;
/// Rows up to which a 16-bit dense product runs the GEMV: `dense_half::HALF_GEMV_MAX_M`.
const HALF_GEMV_MAX_M: usize = 8;
/// Training epochs whose batches the plan looks at (the batches of later epochs are shuffles of
/// the same examples; a note says when a run is longer).
const MAX_PLANNED_EPOCHS: usize = 100;

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
    fn fused(self, cols: usize) -> bool {
        matches!(self, DeviceWeight::Nf4 { blocksize, .. } if cols % 16 == 0 && blocksize >= 16)
    }

    fn label(self) -> &'static str {
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
        for l in 0..cfg.num_hidden_layers {
            let mut row = [DeviceWeight::F32; 7];
            for (slot, t) in row.iter_mut().zip(LoraTarget::ALL_LINEAR) {
                let parent = t.parent().expect("decoder projection");
                let dtype = dtype_of(&format!("model.layers.{l}.{parent}.{}.weight", t.name()));
                stored.insert(dtype.to_string());
                let (_, cols) = t.shape(cfg);
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
        }
        let head_name = if cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let head_dtype = dtype_of(head_name);
        stored.insert(head_dtype.to_string());
        ModelShape {
            cfg: cfg.clone(),
            projections,
            lm_head: dense_form(head_dtype, cfg.hidden_size),
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

    fn dims(&self) -> Dims {
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

    fn format(&self, layer: Option<usize>, t: LoraTarget) -> DeviceWeight {
        match (layer, target_index(t)) {
            (Some(l), Some(i)) => self.projections[l][i],
            _ => self.lm_head,
        }
    }
}

fn target_index(t: LoraTarget) -> Option<usize> {
    LoraTarget::ALL_LINEAR.iter().position(|&x| x == t)
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    c: usize,
    f: usize,
    q: usize,
    k: usize,
    h: usize,
    v: usize,
    layers: usize,
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

    fn adapted(&self, t: LoraTarget) -> bool {
        self.targets.contains(&t)
    }

    /// Element counts of every trainable tensor (`A` then `B` per module), in the optimizer's order.
    fn tensor_sizes(&self, cfg: &ModelConfig) -> Vec<usize> {
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
    /// `paged_adamw_32bit` (managed memory; metered the same) or `adamw`.
    pub paged_optimizer: bool,
    /// The sequence lengths of each distinct micro-batch the run trains on.
    pub micro_batches: Vec<Vec<usize>>,
    /// Tokens of the longest held-out example, when the run evaluates.
    pub eval_len: Option<usize>,
    /// Rows per chunk of the fused head ([`CE_CHUNK`]).
    pub ce_chunk: usize,
    /// Count the CUDA backend's own buffers (weights, optimizer states, scratch, uploads,
    /// attention copies). `false` leaves only what the model code allocates through the backend
    /// trait (`zeros`, `upload`, `stash`, `unstash`): what a metering wrapper around the CPU
    /// backend sees, which is how the replay is tested.
    pub device_internals: bool,
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanLine {
    /// Stable identifier (`base_nf4`, `activations`, ...).
    pub key: &'static str,
    pub label: String,
    pub bytes: usize,
    /// Counted by the device meter (`CudaDevice::peak_bytes`).
    pub metered: bool,
    /// Part of `total_bytes` (everything but the CUDA context).
    pub counted: bool,
}

/// The metered peak of one phase of the planned micro-batch's step (or of evaluation).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhasePeak {
    pub phase: &'static str,
    pub bytes: usize,
}

/// The micro-batch the peak belongs to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MicroBatch {
    pub tokens: usize,
    pub sequences: usize,
    pub longest_sequence: usize,
}

/// A device-memory plan: lines, subtotal, total.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub lines: Vec<PlanLine>,
    /// What `CudaDevice::peak_bytes` should report.
    pub metered_bytes: usize,
    /// Metered + cuBLAS workspace + allocator slack (the CUDA context excluded).
    pub total_bytes: usize,
    /// The CUDA context estimate (informational).
    pub context_bytes: usize,
    /// Persistent bytes: weights, adapter, gradients, optimizer, scratch.
    pub persistent_bytes: usize,
    /// Where the peak occurs, e.g. `backward, layer 31: down_proj dropout mask`.
    pub peak_at: String,
    pub micro_batch: MicroBatch,
    /// Distinct micro-batches replayed.
    pub micro_batches: usize,
    /// Metered peak of each phase of the planned micro-batch (and of evaluation).
    pub phases: Vec<PhasePeak>,
}

impl MemoryPlan {
    /// The bytes of line `key` (0 when absent).
    pub fn line(&self, key: &str) -> usize {
        self.lines
            .iter()
            .find(|l| l.key == key)
            .map_or(0, |l| l.bytes)
    }

    /// What no knob changes: base weights, embedding, norms, LoRA parameters and gradients, and
    /// the optimizer states.
    pub fn fixed_bytes(&self) -> usize {
        const FIXED: [&str; 8] = [
            "base_nf4",
            "base_dense",
            "lm_head",
            "embedding",
            "norms",
            "lora_params",
            "lora_grads",
            "optimizer",
        ];
        FIXED.iter().map(|k| self.line(k)).sum()
    }

    /// The step's own bytes at the peak (everything metered that is not persistent).
    pub fn step_bytes(&self) -> usize {
        self.metered_bytes - self.persistent_bytes
    }

    /// The plan as text, one line per entry (zero lines left out), subtotal and total.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let width = self
            .lines
            .iter()
            .map(|l| l.label.chars().count())
            .max()
            .unwrap_or(0)
            .max(40);
        let row = |out: &mut String, label: &str, bytes: usize| {
            let pad = width.saturating_sub(label.chars().count());
            out.push_str(&format!(
                "  {label}{} {:>11}\n",
                " ".repeat(pad),
                fmt_mib(bytes)
            ));
        };
        for l in self.lines.iter().filter(|l| l.metered && l.bytes > 0) {
            row(&mut out, &l.label, l.bytes);
        }
        row(
            &mut out,
            "metered subtotal (CudaDevice::peak_bytes)",
            self.metered_bytes,
        );
        for l in self.lines.iter().filter(|l| !l.metered && l.counted) {
            row(&mut out, &l.label, l.bytes);
        }
        let label = "total";
        out.push_str(&format!(
            "  {label}{} {:>11}  ({})\n",
            " ".repeat(width - label.len()),
            fmt_mib(self.total_bytes),
            fmt_gib(self.total_bytes)
        ));
        for l in self.lines.iter().filter(|l| !l.counted) {
            row(&mut out, &l.label, l.bytes);
        }
        out
    }
}

/// `39976960` → `39,976,960`.
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `1234567` → `1.2 MiB`.
pub fn fmt_mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// `1234567890` → `1.15 GiB`.
pub fn fmt_gib(bytes: usize) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Parses a memory size: a byte count, or a number with a unit — `KB`, `MB`, `GB`, `TB`
/// (powers of 1000) or `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` (powers of 1024), any case.
pub fn parse_bytes(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a memory size (e.g. 24GiB, 24GB, 16000MiB)"))?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use B, MB, GB, MiB, GiB)"
            ))
        }
    };
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("`{s}` is not a positive memory size"));
    }
    Ok(bytes as usize)
}

// ---------------------------------------------------------------------------------------------
// The replay.

/// Kinds of step buffers (the plan's step lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Kept for the backward: bf16 stashes, `lse`, `xa`, stashed layer inputs.
    Activations,
    /// The residual stream `x` / layer outputs / unstashed layer inputs, and its gradient `dx`.
    Residual,
    /// One layer's f32 temporaries: norms, projections' outputs, unstashed copies, gradients,
    /// attention's per-sequence copies, small uploads.
    WorkingSet,
    /// Dropout masks and their per-sequence slices.
    Masks,
    /// The head: final norm and its gradient, the chunk buffers, the logits chunk, losses.
    Head,
    /// Evaluation forward: KV cache, forward scratch, logits.
    Eval,
}

const KINDS: usize = 6;

/// A live allocation of the replay (freed by [`Sim::free`]; deliberately not `Copy`).
#[must_use]
struct Alloc {
    kind: Kind,
    bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct Where {
    phase: &'static str,
    layer: Option<usize>,
    op: &'static str,
}

impl std::fmt::Display for Where {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.layer {
            Some(l) => write!(f, "{}, layer {l}: {}", self.phase, self.op),
            None => write!(f, "{}: {}", self.phase, self.op),
        }
    }
}

/// Live bytes by kind, their peak, and where it happened.
struct Sim {
    live: [usize; KINDS],
    total: usize,
    peak: usize,
    at_peak: [usize; KINDS],
    here: Where,
    peak_at: Where,
    phases: Vec<PhasePeak>,
}

impl Sim {
    fn new() -> Self {
        let w = Where {
            phase: "forward",
            layer: None,
            op: "embedding",
        };
        Sim {
            live: [0; KINDS],
            total: 0,
            peak: 0,
            at_peak: [0; KINDS],
            here: w,
            peak_at: w,
            phases: Vec::new(),
        }
    }

    fn at(&mut self, phase: &'static str, layer: Option<usize>, op: &'static str) {
        self.here = Where { phase, layer, op };
    }

    fn alloc(&mut self, kind: Kind, bytes: usize) -> Alloc {
        self.live[kind as usize] += bytes;
        self.total += bytes;
        if self.total > self.peak {
            self.peak = self.total;
            self.at_peak = self.live;
            self.peak_at = self.here;
        }
        let phase = self.here.phase;
        match self.phases.iter_mut().find(|p| p.phase == phase) {
            Some(p) => p.bytes = p.bytes.max(self.total),
            None => self.phases.push(PhasePeak {
                phase,
                bytes: self.total,
            }),
        }
        Alloc { kind, bytes }
    }

    fn free(&mut self, a: Alloc) {
        self.live[a.kind as usize] -= a.bytes;
        self.total -= a.bytes;
    }

    fn free_all(&mut self, v: impl IntoIterator<Item = Alloc>) {
        for a in v {
            self.free(a);
        }
    }
}

/// What `layer_forward_train` returns for the backward.
struct Acts(Vec<Alloc>);

/// The replay of one micro-batch (or one evaluation example).
struct Walk<'a> {
    run: &'a RunShape,
    d: Dims,
    lens: &'a [usize],
    t: usize,
    sim: Sim,
}

impl<'a> Walk<'a> {
    fn new(run: &'a RunShape, lens: &'a [usize]) -> Self {
        Walk {
            run,
            d: run.model.dims(),
            lens,
            t: lens.iter().sum(),
            sim: Sim::new(),
        }
    }

    fn f32(&mut self, kind: Kind, n: usize) -> Alloc {
        self.sim.alloc(kind, 4 * n.max(1))
    }

    /// A CUDA-internal f32 allocation (`None` when internals are not counted).
    fn internal(&mut self, kind: Kind, n: usize) -> Option<Alloc> {
        self.run
            .device_internals
            .then(|| self.sim.alloc(kind, 4 * n.max(1)))
    }

    fn free_opt(&mut self, a: Option<Alloc>) {
        if let Some(a) = a {
            self.sim.free(a);
        }
    }

    /// `stash`: the bf16 copy is allocated, then the f32 source dropped.
    fn stash(&mut self, f: Alloc, len: usize) -> Alloc {
        let s = self.sim.alloc(Kind::Activations, 2 * len.max(1));
        self.sim.free(f);
        s
    }

    fn io(&self, t: LoraTarget) -> (usize, usize) {
        t.shape(&self.run.model.cfg)
    }

    fn adapted(&self, t: LoraTarget) -> bool {
        self.run.adapter.adapted(t)
    }

    /// `Llama::dropout_keep` for `rows` rows from `row0` (training: dropout seeds are set
    /// exactly when dropout > 0).
    fn dropout_keep(&mut self, t: LoraTarget, rows: usize, row0: usize) -> Option<Alloc> {
        if self.run.adapter.dropout <= 0.0 {
            return None;
        }
        let width = self.io(t).1;
        let keep = self.f32(Kind::Masks, rows * width);
        let (lo, hi) = (row0, row0 + rows);
        let mut start = 0;
        for &len in self.lens {
            let (a, e) = (start.max(lo), (start + len).min(hi));
            start += len;
            if a >= e || (a == lo && e == hi) {
                continue;
            }
            let part = self.f32(Kind::Masks, (e - a) * width);
            self.sim.free(part);
        }
        Some(keep)
    }

    /// `project_train`: the base product allocates nothing (its scratch is persistent); an
    /// adapted module's mask lives across the LoRA forward, `xa` is returned.
    fn project_train(
        &mut self,
        t: LoraTarget,
        rows: usize,
        row0: usize,
        xa_kind: Kind,
    ) -> Option<Alloc> {
        if !self.adapted(t) {
            return None;
        }
        let keep = self.dropout_keep(t, rows, row0);
        let xa = self.f32(xa_kind, rows * self.run.adapter.rank);
        self.free_opt(keep);
        Some(xa)
    }

    /// The adapter share of `project_backward` / `lora_share`: the mask, recomputed.
    fn lora_share(&mut self, t: LoraTarget, rows: usize, row0: usize) {
        if self.adapted(t) {
            let keep = self.dropout_keep(t, rows, row0);
            self.free_opt(keep);
        }
    }

    /// `layer_forward_train`: returns the kept activations and the layer output.
    fn layer_forward(&mut self, l: usize, phase: &'static str) -> (Acts, Alloc) {
        let (d, t) = (self.d, self.t);
        use Kind::*;
        use LoraTarget::*;
        self.sim.at(phase, Some(l), "attention projections");
        let n = self.f32(WorkingSet, t * d.c);
        let q = self.f32(WorkingSet, t * d.q);
        let k = self.f32(WorkingSet, t * d.k);
        let v = self.f32(WorkingSet, t * d.k);
        let mut xa = Vec::new();
        for target in [QProj, KProj, VProj] {
            xa.extend(self.project_train(target, t, 0, Activations));
        }
        self.sim.at(phase, Some(l), "attention");
        let att = self.f32(WorkingSet, t * d.q);
        let lse = self.f32(Activations, t * d.h);
        if self.lens.len() > 1 && self.run.device_internals {
            for i in 0..self.lens.len() {
                let s = self.lens[i];
                let parts = [s * d.q, s * d.k, s * d.k, s * d.q, s * d.h];
                let parts: Vec<Alloc> = parts.iter().map(|&n| self.f32(WorkingSet, n)).collect();
                self.sim.free_all(parts);
            }
        }
        self.sim.at(phase, Some(l), "o_proj");
        let h = self.f32(WorkingSet, t * d.c);
        xa.extend(self.project_train(OProj, t, 0, Activations));
        self.sim.at(phase, Some(l), "gate_proj, up_proj");
        let gate = self.f32(WorkingSet, t * d.f);
        let up = self.f32(WorkingSet, t * d.f);
        for target in [GateProj, UpProj] {
            xa.extend(self.project_train(target, t, 0, Activations));
        }
        self.sim.at(phase, Some(l), "down_proj");
        let m = self.f32(WorkingSet, t * d.f);
        let out = self.f32(Residual, t * d.c);
        xa.extend(self.project_train(DownProj, t, 0, Activations));
        self.sim.at(phase, Some(l), "stashing activations");
        let mut kept = vec![
            self.stash(h, t * d.c),
            self.stash(q, t * d.q),
            self.stash(k, t * d.k),
            self.stash(v, t * d.k),
            self.stash(att, t * d.q),
            self.stash(gate, t * d.f),
            self.stash(up, t * d.f),
            lse,
        ];
        kept.extend(xa);
        self.sim.free(m);
        self.sim.free(n);
        (Acts(kept), out)
    }

    /// `head_backward` (called with `x` and `dx` alive).
    fn head(&mut self) {
        let (d, t) = (self.d, self.t);
        use Kind::Head;
        self.sim.at("head", None, "final norm");
        let n = self.f32(Head, t * d.c);
        let dn = self.f32(Head, t * d.c);
        let chunk = self.run.ce_chunk.clamp(1, t);
        let nc = self.f32(Head, chunk * d.c);
        let dnc = self.f32(Head, chunk * d.c);
        self.sim.at("head", None, "logits chunk");
        let z = self.f32(Head, chunk * d.v);
        let losses = self.f32(Head, t);
        let lc = self.f32(Head, chunk);
        for r0 in (0..t).step_by(chunk) {
            let rows = chunk.min(t - r0);
            self.sim.at("head", None, "lm_head chunk");
            let xa = self.project_train(LoraTarget::LmHead, rows, r0, Head);
            let targets = self.internal(Head, rows);
            self.free_opt(targets);
            self.lora_share(LoraTarget::LmHead, rows, r0);
            self.free_opt(xa);
        }
        self.sim.free_all([z, nc, dnc, n]);
        self.sim.free_all([dn, losses, lc]);
    }

    /// `mlp_backward` (with `x_l`, `dx` and the activations alive).
    fn mlp_backward(&mut self, l: usize) {
        let (d, t) = (self.d, self.t);
        use Kind::WorkingSet as W;
        use LoraTarget::*;
        self.sim.at("backward", Some(l), "unstash gate, up");
        let gate = self.f32(W, t * d.f);
        let up = self.f32(W, t * d.f);
        let m = self.f32(W, t * d.f);
        let dm = self.f32(W, t * d.f);
        self.sim.at("backward", Some(l), "down_proj dropout mask");
        self.lora_share(DownProj, t, 0);
        self.sim.free(m);
        self.sim.at("backward", Some(l), "SwiGLU backward");
        let dg = self.f32(W, t * d.f);
        let du = self.f32(W, t * d.f);
        self.sim.free_all([dm, gate, up]);
        self.sim
            .at("backward", Some(l), "gate_proj, up_proj backward");
        let h = self.f32(W, t * d.c);
        let n = self.f32(W, t * d.c);
        let dn = self.f32(W, t * d.c);
        self.lora_share(GateProj, t, 0);
        self.lora_share(UpProj, t, 0);
        self.sim.free_all([dg, du, n]);
        let tmp = self.f32(W, t * d.c);
        self.sim.free_all([tmp, dn, h]);
    }

    /// `layer_backward`.
    fn layer_backward(&mut self, l: usize) {
        let (d, t) = (self.d, self.t);
        use Kind::WorkingSet as W;
        use LoraTarget::*;
        self.mlp_backward(l);
        self.sim.at("backward", Some(l), "o_proj backward");
        let att = self.f32(W, t * d.q);
        let datt = self.f32(W, t * d.q);
        self.lora_share(OProj, t, 0);
        self.sim.at("backward", Some(l), "attention backward");
        let dq = self.f32(W, t * d.q);
        let dk = self.f32(W, t * d.k);
        let dv = self.f32(W, t * d.k);
        let q = self.f32(W, t * d.q);
        let k = self.f32(W, t * d.k);
        let v = self.f32(W, t * d.k);
        if self.run.device_internals {
            if self.lens.len() == 1 {
                let delta = self.f32(W, t * d.h);
                self.sim.free(delta);
            } else {
                for i in 0..self.lens.len() {
                    let s = self.lens[i];
                    let (sq, sk, sh) = (s * d.q, s * d.k, s * d.h);
                    // q, k, v, dout, out, lse copied out; dq, dk, dv apart; then Δ.
                    let sizes = [sq, sk, sk, sq, sq, sh, sq, sk, sk, sh];
                    let parts: Vec<Alloc> = sizes.iter().map(|&n| self.f32(W, n)).collect();
                    self.sim.free_all(parts);
                }
            }
        }
        self.sim.free_all([q, k, v, datt, att]);
        self.sim.at("backward", Some(l), "q/k/v backward");
        let n = self.f32(W, t * d.c);
        let dn = self.f32(W, t * d.c);
        for target in [QProj, KProj, VProj] {
            self.lora_share(target, t, 0);
        }
        if l > 0 {
            let tmp = self.f32(W, t * d.c);
            self.sim.free(tmp);
        }
        self.sim.free_all([n, dn, dq, dk, dv]);
    }

    /// `forward_backward_packed` of this micro-batch.
    fn step(mut self) -> Sim {
        let (d, t) = (self.d, self.t);
        let full = self.run.recompute == Recompute::Full;
        let mut x = self.f32(Kind::Residual, t * d.c);
        let ids = self.internal(Kind::WorkingSet, t);
        self.free_opt(ids);
        let mut inputs = Vec::with_capacity(d.layers);
        let mut saved = Vec::with_capacity(d.layers);
        for l in 0..d.layers {
            let (acts, out) = self.layer_forward(l, "forward");
            self.sim.at("forward", Some(l), "stashing the layer input");
            let input = self.stash(std::mem::replace(&mut x, out), t * d.c);
            inputs.push(input);
            if full {
                self.sim.free_all(acts.0);
            } else {
                saved.push(acts);
            }
        }
        self.sim.at("head", None, "dx");
        let dx = self.f32(Kind::Residual, t * d.c);
        self.head();
        self.sim.free(x);
        for l in (0..d.layers).rev() {
            self.sim.at("backward", Some(l), "unstash the layer input");
            let x_l = self.f32(Kind::Residual, t * d.c);
            let stashed = inputs.pop().expect("one input per layer");
            self.sim.free(stashed);
            let acts = if full {
                let (acts, out) = self.layer_forward(l, "backward (recompute)");
                self.sim.free(out);
                acts
            } else {
                saved.pop().expect("one activation set per layer")
            };
            self.layer_backward(l);
            self.sim.free_all(acts.0);
            self.sim.free(x_l);
        }
        self.sim.free(dx);
        self.sim
    }

    /// `example_loss` of an example of `self.t` tokens: `Llama::forward` with `Logits::All`, then
    /// the loss.
    fn eval(mut self) -> Sim {
        let (d, t) = (self.d, self.t);
        let r = self.run.adapter.rank;
        use Kind::Eval as E;
        use LoraTarget::*;
        self.sim.at("eval", None, "KV cache and forward scratch");
        let mut held: Vec<Alloc> = (0..2 * d.layers).map(|_| self.f32(E, t * d.k)).collect();
        let mut scratch = Vec::new();
        for n in [d.c, d.c, d.q, d.k, d.k, d.q, d.f, d.f, d.f] {
            scratch.push(self.f32(E, t * n));
        }
        let ids = self.internal(E, t);
        self.free_opt(ids);
        for l in 0..d.layers {
            self.sim.at("eval", Some(l), "projections");
            for target in LoraTarget::ALL_LINEAR {
                let add = matches!(target, OProj | DownProj);
                if add && self.matmul_add_needs_temp(Some(l), target, t) {
                    let tmp = self.internal(E, t * self.io(target).0);
                    self.free_opt(tmp);
                }
                if self.adapted(target) {
                    let xa = self.f32(E, t * r);
                    self.sim.free(xa);
                }
            }
        }
        self.sim.at("eval", None, "logits");
        let xn = self.f32(E, t * d.c);
        let logits = self.f32(E, t * d.v);
        if self.adapted(LmHead) {
            let xa = self.f32(E, t * r);
            self.sim.free(xa);
        }
        self.sim.free(xn);
        self.sim.free_all(scratch);
        let losses = self.f32(E, t);
        let targets = self.internal(E, t);
        self.free_opt(targets);
        held.extend([logits, losses]);
        self.sim.free_all(held);
        self.sim
    }

    /// Whether `CudaBackend::product(.., add = true)` goes through `matmul_then_add` (a
    /// `[rows, out]` temporary): every path but sgemm (beta) and the NF4 GEMV / fused GEMM.
    fn matmul_add_needs_temp(&self, layer: Option<usize>, t: LoraTarget, rows: usize) -> bool {
        let w = self.run.model.format(layer, t);
        let cols = self.io(t).1;
        !(matches!(w, DeviceWeight::F32)
            || (matches!(w, DeviceWeight::Nf4 { .. }) && (rows <= NF4_GEMV_MAX_M || w.fused(cols))))
    }
}

/// The persistent lines, in plan order: `(key, label, bytes)`.
fn persistent_lines(run: &RunShape, t_max: usize) -> Vec<(&'static str, String, usize)> {
    let m = &run.model;
    let cfg = &m.cfg;
    let d = m.dims();
    let internal = |b: usize| if run.device_internals { b } else { 0 };
    let (mut nf4, mut dense) = (0, 0);
    let mut nf4_label = String::new();
    let mut dense_label = "";
    for row in &m.projections {
        for (w, t) in row.iter().zip(LoraTarget::ALL_LINEAR) {
            let (out, inp) = t.shape(cfg);
            let b = w.bytes(out, inp);
            match w {
                DeviceWeight::Nf4 {
                    blocksize,
                    double_quant,
                } => {
                    nf4 += b;
                    nf4_label = format!(
                        "base: NF4 decoder projections (block {blocksize}{})",
                        if *double_quant { ", double quant" } else { "" }
                    );
                }
                _ => {
                    dense += b;
                    dense_label = w.label();
                }
            }
        }
    }
    let head = m.lm_head.bytes(d.v, d.c);
    let embed = 4 * d.v * d.c;
    let norms = 4 * (2 * d.layers + 1) * d.c + 4 * (cfg.head_dim / 2).max(1);
    let sizes = run.adapter.tensor_sizes(cfg);
    let lora: usize = sizes.iter().map(|&n| 4 * n.max(1)).sum();
    let padded: usize = sizes.iter().map(|&n| n.next_multiple_of(64)).sum();
    let nt = sizes.len();
    let opt = 4 * (2 * padded).max(64) + 48 * nt + 16 * nt.max(1) + 8;
    let (lora_scratch, staging) = scratch_bytes(run, t_max);
    let tied = if cfg.tie_word_embeddings {
        " (tied: a separate copy of the embedding)"
    } else {
        ""
    };
    vec![
        ("base_nf4", nf4_label, internal(nf4)),
        (
            "base_dense",
            format!("base: {dense_label} decoder projections"),
            internal(dense),
        ),
        (
            "lm_head",
            format!("base: lm_head, {}{tied}", m.lm_head.label()),
            internal(head),
        ),
        ("embedding", "base: embedding table, f32".into(), embed),
        ("norms", "base: norms and RoPE table, f32".into(), norms),
        (
            "lora_params",
            format!(
                "LoRA parameters, f32 ({} values)",
                grouped(sizes.iter().sum::<usize>())
            ),
            lora,
        ),
        ("lora_grads", "LoRA gradients, f32".into(), lora),
        (
            "optimizer",
            format!(
                "AdamW states, 2 × f32{}",
                if run.paged_optimizer {
                    " (paged: managed memory)"
                } else {
                    ""
                }
            ),
            internal(opt),
        ),
        (
            "lora_scratch",
            "LoRA bf16 staging scratch".into(),
            internal(lora_scratch),
        ),
        (
            "staging",
            "GEMM staging scratch, RoPE positions".into(),
            internal(staging),
        ),
    ]
}

/// `(LoraScratch, Bf16Scratch + f32 dequant scratch + RoPE positions)` bytes, each buffer grown to
/// its largest use over the run (see the module docs).
fn scratch_bytes(run: &RunShape, t_max: usize) -> (usize, usize) {
    let m = &run.model;
    let cfg = &m.cfg;
    let d = m.dims();
    let r = run.adapter.rank;
    let chunk = run.ce_chunk.clamp(1, t_max.max(1));
    let te = run.eval_len.unwrap_or(0);
    let dropout = run.adapter.dropout > 0.0;
    // LoraScratch: the largest size each buffer is grown to (0: never used).
    let (mut x, mut a, mut b, mut xa, mut dy, mut g, mut ga) = (0, 0, 0, 0, 0, 0, 0);
    for &t in &run.adapter.targets {
        let (out, inp) = t.shape(cfg);
        let rows = if t == LoraTarget::LmHead {
            chunk
        } else {
            t_max
        };
        // Training forward and backward.
        x = x.max(rows * inp);
        a = a.max(r * inp);
        b = b.max(out * r);
        xa = xa.max(rows * r);
        dy = dy.max(rows * out);
        g = g.max(rows * r);
        if dropout {
            ga = ga.max(rows * inp);
        }
        // Evaluation forward (no mask), `te` rows for the head too (all logits).
        if te > 0 {
            x = x.max(te * inp);
            xa = xa.max(te * r);
        }
    }
    let used = |n: usize| if n > 0 { n.max(1) } else { 0 };
    let lora = 2 * (used(x) + used(a) + used(b) + used(xa) + used(dy) + used(g))
        + 4 * (used(g) + used(ga));
    // Bf16Scratch.x: 16-bit dense weights' activation staging.
    let mut half = 0;
    let mut f32_scratch = 0;
    let mut uses =
        |w: DeviceWeight, out: usize, inp: usize, rows_fwd: &[usize], rows_dx: usize| match w {
            DeviceWeight::Half => {
                for &rows in rows_fwd {
                    if rows > HALF_GEMV_MAX_M {
                        half = half.max(rows * inp);
                    }
                }
                if rows_dx > 0 {
                    half = half.max(rows_dx * out);
                }
            }
            DeviceWeight::Nf4 { .. } if !w.fused(inp) => {
                let fwd = rows_fwd.iter().any(|&r| r > NF4_GEMV_MAX_M);
                if fwd || rows_dx > 0 {
                    f32_scratch = f32_scratch.max(out * inp);
                }
            }
            _ => {}
        };
    for (l, row) in m.projections.iter().enumerate() {
        for (&w, t) in row.iter().zip(LoraTarget::ALL_LINEAR) {
            let (out, inp) = t.shape(cfg);
            let qkv = matches!(t, LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj);
            let rows_dx = if qkv && l == 0 { 0 } else { t_max };
            uses(w, out, inp, &[t_max, te], rows_dx);
        }
    }
    uses(m.lm_head, d.v, d.c, &[chunk, te], chunk);
    let positions = 4 * t_max.max(te);
    (lora, 2 * used(half) + 4 * used(f32_scratch) + positions)
}

/// Replays the run and returns its plan (see the module docs).
pub fn plan(run: &RunShape) -> Result<MemoryPlan> {
    let batches: Vec<&Vec<usize>> = run
        .micro_batches
        .iter()
        .filter(|b| !b.is_empty() && b.iter().all(|&n| n > 0))
        .collect();
    if batches.is_empty() {
        return Err(Error::InvalidArg(
            "memory plan: the run has no micro-batch to plan".into(),
        ));
    }
    let t_max = batches
        .iter()
        .map(|b| b.iter().sum::<usize>())
        .max()
        .unwrap_or(0);
    let persistent = persistent_lines(run, t_max);
    let persistent_bytes: usize = persistent.iter().map(|l| l.2).sum();
    let mut best: Option<(Sim, &Vec<usize>)> = None;
    for b in batches {
        let sim = Walk::new(run, b).step();
        if best.as_ref().is_none_or(|(s, _)| sim.peak > s.peak) {
            best = Some((sim, b));
        }
    }
    let (mut sim, lens) = best.expect("at least one micro-batch");
    if let Some(te) = run.eval_len.filter(|&n| n > 0) {
        let lens = [te];
        let e = Walk::new(run, &lens).eval();
        if e.peak > sim.peak {
            sim.peak = e.peak;
            sim.at_peak = e.at_peak;
            sim.peak_at = e.peak_at;
        }
        sim.phases.extend(e.phases);
    }
    let at = |k: Kind| sim.at_peak[k as usize];
    let mut lines: Vec<PlanLine> = persistent
        .into_iter()
        .map(|(key, label, bytes)| PlanLine {
            key,
            label,
            bytes,
            metered: true,
            counted: true,
        })
        .collect();
    let mode = match run.recompute {
        Recompute::Selective => "selective",
        Recompute::Full => "full",
    };
    let step_lines = [
        (
            "activations",
            format!("activations kept for the backward ({mode})"),
            at(Kind::Activations),
        ),
        (
            "residual",
            "residual stream and its gradient, f32".to_string(),
            at(Kind::Residual),
        ),
        (
            "working_set",
            "layer working set, f32".to_string(),
            at(Kind::WorkingSet),
        ),
        (
            "dropout_masks",
            "dropout masks, f32".to_string(),
            at(Kind::Masks),
        ),
        (
            "cross_entropy",
            "head: cross-entropy chunk and norms".to_string(),
            at(Kind::Head),
        ),
        (
            "eval",
            "evaluation forward (KV cache, logits)".to_string(),
            at(Kind::Eval),
        ),
    ];
    for (key, label, bytes) in step_lines {
        lines.push(PlanLine {
            key,
            label,
            bytes,
            metered: true,
            counted: true,
        });
    }
    let metered = persistent_bytes + sim.peak;
    let slack = (metered * SLACK_PERCENT).div_ceil(100);
    let extra = |key, label: &str, bytes, counted| PlanLine {
        key,
        label: label.to_string(),
        bytes,
        metered: false,
        counted,
    };
    lines.push(extra(
        "cublas_workspace",
        "cuBLAS workspace (default, Hopper)",
        CUBLAS_WORKSPACE,
        true,
    ));
    lines.push(extra(
        "allocator_slack",
        &format!("allocator slack ({SLACK_PERCENT}% of metered)"),
        slack,
        true,
    ));
    lines.push(extra(
        "cuda_context",
        "CUDA context (estimate; not in the total)",
        CUDA_CONTEXT,
        false,
    ));
    debug_assert_eq!(
        lines
            .iter()
            .filter(|l| l.metered)
            .map(|l| l.bytes)
            .sum::<usize>(),
        metered
    );
    Ok(MemoryPlan {
        lines,
        metered_bytes: metered,
        total_bytes: metered + CUBLAS_WORKSPACE + slack,
        context_bytes: CUDA_CONTEXT,
        persistent_bytes,
        peak_at: sim.peak_at.to_string(),
        micro_batch: MicroBatch {
            tokens: lens.iter().sum(),
            sequences: lens.len(),
            longest_sequence: lens.iter().copied().max().unwrap_or(0),
        },
        micro_batches: run.micro_batches.len(),
        phases: sim
            .phases
            .into_iter()
            .map(|p| PhasePeak {
                phase: p.phase,
                bytes: p.bytes + persistent_bytes,
            })
            .collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// From a run's settings: the data, the batches, the fit check and the knobs.

/// The token counts of a run's data and how they are batched.
#[derive(Debug, Clone)]
pub struct DataShape {
    /// Tokens of each training example (after truncation to `--max-seq-len`).
    pub lengths: Vec<usize>,
    /// Tokens of each held-out example.
    pub eval_lengths: Vec<usize>,
    pub batch: BatchOptions,
    pub grad_accum: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
}

impl DataShape {
    /// The distinct micro-batches (sorted sequence lengths) of every step of the run, as
    /// `Run::step_batches` forms them, and whether the run is longer than the epochs looked at.
    pub fn micro_batches(&self) -> (Vec<Vec<usize>>, bool) {
        let per_epoch = epoch_batches(&self.lengths, &self.batch, 0).len();
        let ga = self.grad_accum.max(1);
        let steps_per_epoch = per_epoch.div_ceil(ga).max(1);
        let total_steps = self
            .max_steps
            .unwrap_or(self.epochs * steps_per_epoch)
            .max(1);
        let epochs = total_steps.div_ceil(steps_per_epoch);
        let mut set = BTreeSet::new();
        for e in 0..epochs.min(MAX_PLANNED_EPOCHS) {
            let steps = steps_per_epoch.min(total_steps - e * steps_per_epoch);
            let batches = epoch_batches(&self.lengths, &self.batch, e);
            for b in batches.iter().take(steps * ga) {
                let mut lens: Vec<usize> = b.iter().flatten().map(|&i| self.lengths[i]).collect();
                lens.sort_unstable();
                set.insert(lens);
            }
        }
        (set.into_iter().collect(), epochs > MAX_PLANNED_EPOCHS)
    }

    fn with_batch_size(&self, b: usize) -> Self {
        let mut d = self.clone();
        d.batch.batch_size = b;
        d
    }

    /// The data truncated to `n` tokens (examples keep their place; an example that would lose
    /// all its targets is still counted, a slight over-estimate).
    fn with_max_seq_len(&self, n: usize) -> Self {
        let mut d = self.clone();
        d.lengths.iter_mut().for_each(|l| *l = (*l).min(n));
        d.eval_lengths.iter_mut().for_each(|l| *l = (*l).min(n));
        d.batch.max_seq_len = n;
        d
    }
}

/// What `qlora train --dry-run` reads: the model's shapes, the adapter and the data.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub model_dir: PathBuf,
    /// The run's shapes, `micro_batches` filled from `data`.
    pub run: RunShape,
    pub data: DataShape,
    /// Remarks for the reader (long runs, resumed adapters, ...).
    pub notes: Vec<String>,
}

impl DryRun {
    /// Reads config, headers or index, the adapter settings and the data of `cfg`; writes nothing.
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let model_dir = crate::hub::resolve_model(&cfg.model)?;
        let model_cfg = crate::loader::read_config(&model_dir)?;
        let model = ModelShape::from_dir(&model_dir, &model_cfg, cfg.quant)?;
        let mut notes = Vec::new();
        let lora = adapter_config(cfg, &model_cfg, &mut notes)?;
        let tokenizer = crate::tokenizer::Tokenizer::from_dir(&model_dir)?;
        let data = super::trainer::load_data(cfg, &tokenizer)?;
        let mut batch = cfg.batch.clone();
        batch.max_seq_len = cfg.data.max_seq_len;
        let data = DataShape {
            lengths: data.train.iter().map(Example::len).collect(),
            eval_lengths: data.eval.iter().map(Example::len).collect(),
            batch,
            grad_accum: cfg.grad_accum,
            epochs: cfg.epochs,
            max_steps: cfg.max_steps,
        };
        let run = RunShape {
            model,
            adapter: AdapterShape::from_config(&lora),
            recompute: cfg.recompute,
            paged_optimizer: cfg.optim_kind == OptimKind::PagedAdamW32bit,
            micro_batches: Vec::new(),
            eval_len: None,
            ce_chunk: CE_CHUNK,
            device_internals: true,
        };
        let mut dr = DryRun {
            model_dir,
            run,
            data,
            notes,
        };
        let long = dr.refresh();
        if long {
            dr.notes.push(format!(
                "the run is longer than {MAX_PLANNED_EPOCHS} epochs: the batches of the first {MAX_PLANNED_EPOCHS} were planned"
            ));
        }
        Ok(dr)
    }

    /// Recomputes the micro-batches and the longest held-out example from `self.data`.
    fn refresh(&mut self) -> bool {
        let (mb, long) = self.data.micro_batches();
        self.run.micro_batches = mb;
        self.run.eval_len = self.data.eval_lengths.iter().copied().max();
        long
    }

    pub fn plan(&self) -> Result<MemoryPlan> {
        plan(&self.run)
    }

    fn variant(&self, recompute: Recompute, data: DataShape) -> DryRun {
        let mut v = self.clone();
        v.run.recompute = recompute;
        v.data = data;
        v.refresh();
        v
    }

    /// The total of the run with other knob settings, when it can be planned.
    fn total_with(&self, recompute: Recompute, data: DataShape) -> Option<usize> {
        self.variant(recompute, data)
            .plan()
            .ok()
            .map(|p| p.total_bytes)
    }

    /// Checks `plan` against `budget`; when it does not fit comfortably, works out which knobs
    /// (`--recompute full`, a smaller `--batch-size`, a smaller `--max-seq-len`) would.
    pub fn check(&self, plan: &MemoryPlan, budget: &Budget) -> Fit {
        let ctx = if budget.includes_context {
            plan.context_bytes
        } else {
            0
        };
        let needed = plan.total_bytes + ctx;
        let without_slack = plan.metered_bytes + CUBLAS_WORKSPACE + ctx;
        let verdict = if needed <= budget.bytes {
            Verdict::Fits
        } else if without_slack <= budget.bytes {
            Verdict::Tight
        } else {
            Verdict::DoesNotFit
        };
        let alternatives = if verdict == Verdict::Fits {
            Vec::new()
        } else {
            self.knobs(budget.bytes.saturating_sub(ctx))
        };
        Fit {
            verdict,
            needed,
            budget: budget.clone(),
            alternatives,
            fixed_bytes: plan.fixed_bytes() + CUBLAS_WORKSPACE + ctx,
        }
    }

    /// Settings of the three knobs (and their combinations with `--recompute full`) whose total
    /// fits `room` bytes: the first fitting batch size and sequence length searching down.
    fn knobs(&self, room: usize) -> Vec<Alternative> {
        let mut out = Vec::new();
        let selective = self.run.recompute == Recompute::Selective;
        let modes: Vec<(Recompute, &str)> = if selective {
            vec![
                (Recompute::Selective, ""),
                (Recompute::Full, "--recompute full "),
            ]
        } else {
            vec![(Recompute::Full, "")]
        };
        if selective {
            if let Some(total) = self.total_with(Recompute::Full, self.data.clone()) {
                out.push(Alternative {
                    flags: "--recompute full".into(),
                    total_bytes: total,
                    fits: total <= room,
                });
            }
        }
        for (mode, prefix) in modes {
            if out.iter().any(|a| a.fits && a.flags == "--recompute full") && !prefix.is_empty() {
                break; // full recompute alone fits: no need to combine it
            }
            let bs = self.data.batch.batch_size;
            for b in (1..bs).rev() {
                match self.total_with(mode, self.data.with_batch_size(b)) {
                    Some(total) if total <= room => {
                        out.push(Alternative {
                            flags: format!("{prefix}--batch-size {b}"),
                            total_bytes: total,
                            fits: true,
                        });
                        break;
                    }
                    _ => {}
                }
            }
            if let Some((n, total)) = self.largest_seq_len(mode, room) {
                out.push(Alternative {
                    flags: format!("{prefix}--max-seq-len {n}"),
                    total_bytes: total,
                    fits: true,
                });
            }
        }
        out
    }

    /// The largest `--max-seq-len` below the longest example whose plan fits `room` (rounded down
    /// to a multiple of 64 when that still leaves at least 64), by bisection.
    fn largest_seq_len(&self, mode: Recompute, room: usize) -> Option<(usize, usize)> {
        let longest = self.data.lengths.iter().copied().max()?;
        let fits = |n: usize| {
            self.total_with(mode, self.data.with_max_seq_len(n))
                .filter(|&t| t <= room)
        };
        let (mut lo, mut hi) = (2usize, longest.saturating_sub(1));
        if hi < lo || fits(lo).is_none() {
            return None;
        }
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid).is_some() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let round = lo / 64 * 64;
        let n = if round >= 64 { round } else { lo };
        fits(n).map(|t| (n, t))
    }
}

/// The adapter the run trains: from the checkpoint it resumes, an initial adapter, or the flags.
fn adapter_config(
    cfg: &TrainConfig,
    model: &ModelConfig,
    notes: &mut Vec<String>,
) -> Result<LoraConfig> {
    let from_file = |dir: &Path| -> Result<LoraConfig> {
        let c = LoraConfig::from_file(&dir.join("adapter_config.json"))?;
        c.validate_for(model)?;
        Ok(c)
    };
    if let Some(resume) = &cfg.resume {
        let dir = match resume {
            Resume::Path(p) => p.clone(),
            Resume::Latest => {
                let steps = super::checkpoint::list_checkpoints(&cfg.output)?;
                let last = steps.last().ok_or_else(|| {
                    Error::NotFound(format!(
                        "{}: no checkpoint-N folder to resume from",
                        cfg.output.display()
                    ))
                })?;
                super::checkpoint::checkpoint_dir(&cfg.output, *last)
            }
        };
        notes.push(format!("adapter of {} (resumed)", dir.display()));
        return from_file(&dir);
    }
    let mut c = match &cfg.init_adapter {
        Some(dir) => {
            notes.push(format!("adapter of {}", dir.display()));
            from_file(dir)?
        }
        None => {
            let targets: Vec<&str> = cfg.lora.targets.iter().map(String::as_str).collect();
            let c = LoraConfig::new(cfg.lora.r, cfg.lora.alpha, &targets)?;
            c.validate_for(model)?;
            c
        }
    };
    c.lora_dropout = cfg.lora.dropout;
    Ok(c)
}

/// Device memory to check a plan against.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Budget {
    pub bytes: usize,
    /// E.g. `--gpu-memory 24.00 GiB` or `cuda:0 (NVIDIA H100): 79.10 GiB free`.
    pub source: String,
    /// A card size (`--gpu-memory`): the CUDA context must fit in it too. Free memory measured
    /// on an opened device already excludes the context.
    pub includes_context: bool,
}

/// Whether a plan fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Fits,
    /// Fits only if the allocator slack is not needed.
    Tight,
    DoesNotFit,
}

/// A knob setting and the plan's total with it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alternative {
    pub flags: String,
    pub total_bytes: usize,
    pub fits: bool,
}

/// The outcome of [`DryRun::check`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fit {
    pub verdict: Verdict,
    /// The plan's total, plus the CUDA context when the budget is a card size.
    pub needed: usize,
    pub budget: Budget,
    /// Knob settings tried, when the plan does not fit comfortably (those that fit, and
    /// `--recompute full` either way).
    pub alternatives: Vec<Alternative>,
    /// What no knob changes: weights, adapter, gradients, optimizer, scratch, cuBLAS workspace
    /// (and the context for a card size).
    pub fixed_bytes: usize,
}

impl Fit {
    /// One line for `fits` / `tight`; for `does not fit`, the advice (used as the error).
    pub fn render(&self) -> String {
        let ctx = if self.budget.includes_context {
            " with the CUDA context"
        } else {
            ""
        };
        let head = format!(
            "needs {}{ctx}; {} available ({})",
            fmt_gib(self.needed),
            fmt_gib(self.budget.bytes),
            self.budget.source
        );
        match self.verdict {
            Verdict::Fits => format!(
                "fits: {head}, {} to spare",
                fmt_gib(self.budget.bytes - self.needed)
            ),
            Verdict::Tight => format!(
                "tight: {head}; it fits only if the allocator needs less than the {SLACK_PERCENT}% slack planned{}",
                self.advice()
            ),
            Verdict::DoesNotFit => format!("does not fit: {head}{}", self.advice()),
        }
    }

    fn advice(&self) -> String {
        let fitting: Vec<&Alternative> = self.alternatives.iter().filter(|a| a.fits).collect();
        if !fitting.is_empty() {
            let mut s = String::from(". These settings fit:");
            for a in fitting {
                s.push_str(&format!(
                    "\n  {:<38} total {}",
                    a.flags,
                    fmt_gib(a.total_bytes)
                ));
            }
            return s;
        }
        let full = self
            .alternatives
            .iter()
            .find(|a| a.flags == "--recompute full")
            .map_or(String::new(), |a| {
                format!(" (--recompute full: {})", fmt_gib(a.total_bytes))
            });
        format!(
            ". No setting of --recompute{full}, --batch-size or --max-seq-len fits: the weights, \
             adapter, gradients and optimizer states alone take {}; use a GPU with more memory, \
             fewer --target-modules or a smaller --lora-r",
            fmt_gib(self.fixed_bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(39_976_960), "39,976,960");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("24 gib"), Ok(24 << 30));
        assert_eq!(parse_bytes("24G"), Ok(24 << 30));
        assert_eq!(parse_bytes("24GB"), Ok(24_000_000_000));
        assert_eq!(parse_bytes("1.5MiB"), Ok(3 << 19));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert!(parse_bytes("0").is_err());
    }

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
