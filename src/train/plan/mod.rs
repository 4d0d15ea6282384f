//! The device-memory plan of a training run (`qlora train --dry-run`): what the CUDA backend will
//! allocate, line by line, from `config.json`, the safetensors headers (or only the shard index:
//! shapes follow from the config, dtypes from `torch_dtype`) and the token counts of the data,
//! without reading a weight.
//!
//! # What the plan reproduces
//! Every buffer the CUDA backend allocates is metered (`DevBuf` of `backend/cuda/runtime.rs`,
//! and the paged optimizers' managed allocation through `meter_external`) at its requested size,
//! `len.max(1) · size_of::<T>()`; `CudaDevice::peak_bytes` is the high-water mark. The
//! **metered** subtotal of the plan is that figure: the persistent buffers are summed from their
//! shapes, and one training step is replayed allocation by allocation — each `zeros`, `stash`,
//! `unstash`, upload and drop of `model/train.rs` (`layer_forward_train`, `head_backward`,
//! `mlp_backward`, `layer_backward`, `forward_backward_packed`) and of the CUDA ops under them —
//! in the order the code performs them and with Rust's drop points, for every distinct
//! micro-batch of the run; the largest live total is the peak. The load of the model is
//! replayed the same way (`load.rs`); where it is higher than the step (a toy shape), its excess
//! is a line of its own. The lines are what is alive at the peak, by kind, so they add up to the
//! subtotal exactly. Below it come what the meter does not see: cuBLAS' workspace, the
//! allocator's slack, and (informational) the CUDA context and the load's peak.
//!
//! The figure is the peak of a steady-state step, from the second on, when every scratch
//! buffer has grown: the first step peaks lower, since its peak comes before its backward grows
//! the flash-attention Δ and parts of the LoRA scratch, and before its optimizer step uploads
//! the launch tables. Two parts are upper bounds (a few KiB): the sequence tables carried into a
//! step and the cached RoPE positions are taken as the largest of the run's batches, whichever
//! batch the data order puts before it.
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
//! - **Embedding**: the table is a dense `Backend::linear` like lm_head (`Llama::assemble`):
//!   16-bit, `2·V·C`, when its stored values are f16/bf16 (and `C % 8 == 0`), else f32. With
//!   tied embeddings lm_head is a separate copy of the same table (`CudaLinear` built from a
//!   clone), so tying saves no device memory.
//! - **Norms and RoPE table**: `2L + 1` f32 norm vectors of `C`, and `head_dim/2` f32 inverse
//!   frequencies.
//! - **LoRA parameters and gradients**: per adapted module `A [r, in]`, `B [out, r]` in f32, once
//!   for the master weights and once for the gradient accumulators (`LoraSet::zeros_like`).
//! - **Optimizer states**, per `--optim` (`TrainBackend::adamw_init`), over the `2·modules`
//!   tensors of `n_t` values:
//!   - `paged_adamw_32bit` and `adamw` (`DeviceAdamW`): `m` and `v` in one allocation of `2·P`
//!     f32, `P = Σ round_up(n_t, 64)` (each tensor's states start at a multiple of 64 values,
//!     `adamw.rs` `Layout`), at least 64 values: 8 bytes a parameter;
//!   - `paged_adamw_8bit` (`DeviceAdamW8`, `adamw8.rs` `Layout8`): one allocation of `8F + 8A +
//!     2P` bytes rounded up to 4, at least 256 — f32 `m`, `v` of the tensors under
//!     `optim8::MIN_8BIT_SIZE` = 4096 values (`F = Σ round_up(n_t, 64)`), then two f32 absmax
//!     per 256-value block of the others (`A = round_up(Σ ⌈n_t/256⌉, 64)`) and their u8 codes
//!     (`P = Σ round_up(n_t, 256)`): 2.03125 bytes a parameter
//!     ([`OptimKind::state_nbytes`](crate::train::OptimKind::state_nbytes) without the
//!     alignment); plus the signed and unsigned 256-entry f32 maps (2048 B) and the absmax
//!     pointers `2·8` B per tensor;
//!   - both: the launch table `6·8` B per tensor (uploaded by the first step), scalars `2·4` B
//!     and an f64 sum per tensor, and the 8-byte `{norm, clip}` output.
//!
//!   The paged kinds live in CUDA managed memory, metered all the same (it is device memory
//!   while resident, and it is prefetched to the device before every step). The plan also gives
//!   the line under every kind ([`MemoryPlan::optimizers`]), so a dry run shows what `--optim`
//!   changes.
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
//! - **Flash-attention Δ** (`flash_attention.rs` `FlashScratch.delta`, kept by `CudaBackend`):
//!   the backward's `rowsum(dout ⊙ out)`, `[T, H]` f32, grown to the largest micro-batch.
//!
//! # One step (replayed)
//! Forward (`forward_backward_packed`): the embedded input `x` (`[T, C]` f32), then per layer
//! `layer_forward_train`: `n₁ [T, C]`, `q [T, Q]`, `k, v [T, K]`, each adapted projection's
//! dropout mask `[T, in]` f32 (plus, when the batch holds several sequences, each sequence's mask
//! slice `[len, in]` built apart and copied in), its kept `xa [T, r]`, `att [T, Q]`, `lse [T, H]`,
//! `h [T, C]`, `gate, up [T, F]`, `m [T, F]`, `out [T, C]`; then `h, q, k, v, att, gate, up` are
//! stashed to bf16 one by one (each bf16 copy allocated before its f32 source is dropped), `n₁`
//! and `m` are dropped, and the layer input is stashed (`[T, C]` bf16). Attention runs over the
//! whole packed batch in one launch set (`flash_attention.rs` `forward_packed`: no per-sequence
//! copies); its only allocation is the batch's **sequence tables** (`FlashScratch.tables`, one
//! i32 buffer `[forward tiles | backward tiles | cu_seqlens]`, `4·Σ⌈len/64⌉ + n + 1` values for
//! `n` sequences), uploaded by layer 0's attention after the previous batch's are freed, and
//! kept while the lengths stay the same (every later layer, the backward, the next batch of the
//! same lengths).
//! [`Recompute::Selective`] keeps the stashes, `lse` (`[T, H]` f32, which the backward needs)
//! and every `xa` per layer; [`Recompute::Full`] keeps only the stashed inputs, and reruns
//! `layer_forward_train` per layer in the backward.
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
//! attention backward (allocating nothing: its `Δ` is the persistent one, its tables the
//! batch's), then `n₁, dn [T, C]`, the q/k/v masks `[T, C]`, `tmp [T, C]` (not in layer 0, whose
//! input gradient is not needed).
//!
//! The peak is, for Llama shapes with dropout on the down projection, in the last layer's
//! `mlp_backward` at the down projection's mask: every layer's kept activations are alive, and
//! `gate, up, m, dm` (`4·T·F` f32) plus the `[T, F]` mask and one sequence's `[S, F]` slice. With
//! `--recompute full` it is the same moment with one layer's activations instead of all.
//!
//! # Loading (replayed, `load.rs`)
//! `Llama::load` uploads the weights one tensor at a time; under `--quant nf4` from a 16- or
//! 32-bit checkpoint each decoder projection is quantized on the device
//! (`Backend::quantize_linear`, `nf4_quantize.rs`): its stored bytes, the packed codes, the f32
//! absmax and a flag are alive together for a moment. The load's peak (`load_bytes`, the
//! `load_peak` line and the `load` phase) is, for Llama shapes, its end: every weight, before
//! any adapter, gradient, optimizer state or scratch exists, so below the step's peak.
//!
//! Evaluation (when the run holds out data) runs between steps, when the step's buffers are
//! freed: `Llama::forward` of the longest held-out example with its bf16 KV cache (`2L · T_e·K`
//! values), the forward scratch (`2·T_e·C + 2·T_e·Q + 2·T_e·K + 3·T_e·F`; its `xn` also takes
//! the final norm) and the full logits `[T_e, V]`. Its peak counts when it exceeds the step's.
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

// Where the pieces live: `shape.rs` the model, adapter and run shapes and the weights' device
// formats; `persistent.rs` the persistent lines and scratch; `sim.rs` the replay's ledger (live
// bytes by kind, the peak); `replay/` the step walked allocation by allocation (`forward.rs`,
// `backward.rs`, the step and evaluation in `mod.rs`); `dry_run.rs` the data, the fit check and
// the knob search; `format.rs` byte formatting and parsing. This file: the plan's types and
// `plan()`.
mod dry_run;
mod format;
mod load;
mod persistent;
mod replay;
mod shape;
mod sim;

pub use dry_run::{Alternative, Budget, DataShape, DryRun, Fit, Verdict};
pub use format::{fmt_gib, fmt_mib, parse_bytes};
pub use shape::{AdapterShape, DeviceWeight, ModelShape, RunShape};

use crate::error::{Error, Result};
use crate::model::Recompute;
use persistent::{optimizer_options, persistent_lines};
use replay::{table_bytes, Walk};
use serde::Serialize;
use sim::{Kind, Sim};

/// cuBLAS' default workspace on Hopper (4 MiB on older GPUs): not metered, counted in the total.
pub const CUBLAS_WORKSPACE: usize = 32 << 20;
/// Allocator slack, in percent of the metered subtotal.
pub const SLACK_PERCENT: usize = 5;
/// Estimated CUDA context (driver context, kernel modules, cuBLAS state): informational.
pub const CUDA_CONTEXT: usize = 512 << 20;

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

impl PlanLine {
    /// A metered line, counted in the total.
    fn metered(key: &'static str, label: String, bytes: usize) -> Self {
        PlanLine {
            key,
            label,
            bytes,
            metered: true,
            counted: true,
        }
    }
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

/// The optimizer line under one `--optim` kind ([`MemoryPlan::optimizers`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimizerStates {
    /// The `--optim` name, e.g. `paged_adamw_8bit`.
    pub optim: &'static str,
    /// The optimizer line's bytes under this kind.
    pub bytes: usize,
    /// In managed (pageable) memory.
    pub paged: bool,
    /// The run's own `--optim`.
    pub selected: bool,
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
    /// Metered peak of each phase: loading the model, then the planned micro-batch's step (and
    /// evaluation).
    pub phases: Vec<PhasePeak>,
    /// The metered high-water mark while the model loads (`Llama::load`: the weights so far plus
    /// one projection's stored bytes and quantization buffers); part of `metered_bytes` only
    /// where it exceeds the step's peak (line `load_excess`).
    pub load_bytes: usize,
    /// The optimizer line under each `--optim` kind (the run's own is the `optimizer` line):
    /// `paged_adamw_32bit`, `paged_adamw_8bit`, `adamw`.
    pub optimizers: Vec<OptimizerStates>,
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

    /// The step's own bytes at the peak (everything metered that is not persistent; the load's
    /// excess too, in the rare plan where loading is the peak).
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
        out.push_str(&self.render_optimizers());
        out
    }

    /// One line comparing the optimizer states under each `--optim` kind, e.g.
    /// `optimizer states by --optim: paged_adamw_32bit 305.03 MiB (this run), ...`.
    fn render_optimizers(&self) -> String {
        if self.optimizers.iter().all(|o| o.bytes == 0) {
            return String::new();
        }
        let each: Vec<String> = self
            .optimizers
            .iter()
            .map(|o| {
                let this = if o.selected { " (this run)" } else { "" };
                format!("{} {}{this}", o.optim, fmt_mib(o.bytes))
            })
            .collect();
        format!("  optimizer states by --optim: {}\n", each.join(", "))
    }
}

/// Replays the run and returns its plan (see the module docs).
pub fn plan(run: &RunShape) -> Result<MemoryPlan> {
    let batches = planned_batches(run)?;
    let t_max = batches
        .iter()
        .map(|b| b.iter().sum::<usize>())
        .max()
        .unwrap_or(0);
    let persistent = persistent_lines(run, t_max);
    let persistent_bytes: usize = persistent.iter().map(|l| l.2).sum();
    let (sim, lens) = replay_peak(run, batches);
    let load = load::replay(run);
    let step_metered = persistent_bytes + sim.peak;
    let metered = step_metered.max(load.peak);
    let peak_at = if load.peak > step_metered {
        load.peak_at.to_string()
    } else {
        sim.peak_at.to_string()
    };
    let slack = (metered * SLACK_PERCENT).div_ceil(100);
    let mut lines: Vec<PlanLine> = persistent
        .into_iter()
        .map(|(key, label, bytes)| PlanLine::metered(key, label, bytes))
        .collect();
    lines.extend(step_lines(run, &sim));
    lines.push(PlanLine::metered(
        "load_excess",
        "loading: NF4 quantization above the step's peak".to_string(),
        metered - step_metered,
    ));
    lines.extend(unmetered_lines(slack, load.peak));
    debug_assert_eq!(
        lines
            .iter()
            .filter(|l| l.metered)
            .map(|l| l.bytes)
            .sum::<usize>(),
        metered
    );
    let mut phases: Vec<PhasePeak> = load.phases;
    phases.extend(sim.phases.into_iter().map(|p| PhasePeak {
        phase: p.phase,
        bytes: p.bytes + persistent_bytes,
    }));
    Ok(MemoryPlan {
        lines,
        metered_bytes: metered,
        total_bytes: metered + CUBLAS_WORKSPACE + slack,
        context_bytes: CUDA_CONTEXT,
        persistent_bytes,
        peak_at,
        micro_batch: MicroBatch {
            tokens: lens.iter().sum(),
            sequences: lens.len(),
            longest_sequence: lens.iter().copied().max().unwrap_or(0),
        },
        micro_batches: run.micro_batches.len(),
        phases,
        load_bytes: load.peak,
        optimizers: optimizer_options(run),
    })
}

/// The run's micro-batches that hold tokens (an error when none does).
fn planned_batches(run: &RunShape) -> Result<Vec<&Vec<usize>>> {
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
    Ok(batches)
}

/// Replays a step of every micro-batch and keeps the one with the highest peak (the first of
/// equals); then the evaluation forward, whose peak counts when it is higher and whose phase
/// joins the step's. Each walk starts with the flash-attention tables of the batch trained
/// before it alive: which one that is depends on the data order, so the plan takes the largest
/// of the run's (a step replaces them at its first attention, before its peak; evaluation keeps
/// them).
fn replay_peak<'a>(run: &'a RunShape, batches: Vec<&'a Vec<usize>>) -> (Sim, &'a Vec<usize>) {
    let carried = batches.iter().map(|b| table_bytes(b)).max().unwrap_or(0);
    let mut best: Option<(Sim, &Vec<usize>)> = None;
    for b in batches {
        let sim = Walk::new(run, b, carried).step();
        if best.as_ref().is_none_or(|(s, _)| sim.peak > s.peak) {
            best = Some((sim, b));
        }
    }
    let (mut sim, lens) = best.expect("at least one micro-batch");
    if let Some(te) = run.eval_len.filter(|&n| n > 0) {
        let lens = [te];
        let e = Walk::new(run, &lens, carried).eval();
        if e.peak > sim.peak {
            sim.peak = e.peak;
            sim.at_peak = e.at_peak;
            sim.peak_at = e.peak_at;
        }
        sim.phases.extend(e.phases);
    }
    (sim, lens)
}

/// The step's lines: what is alive at the peak, by kind.
fn step_lines(run: &RunShape, sim: &Sim) -> [PlanLine; 7] {
    let at = |k: Kind| sim.at_peak[k as usize];
    let mode = match run.recompute {
        Recompute::Selective => "selective",
        Recompute::Full => "full",
    };
    [
        PlanLine::metered(
            "activations",
            format!("activations kept for the backward ({mode})"),
            at(Kind::Activations),
        ),
        PlanLine::metered(
            "residual",
            "residual stream and its gradient, f32".to_string(),
            at(Kind::Residual),
        ),
        PlanLine::metered(
            "working_set",
            "layer working set, f32".to_string(),
            at(Kind::WorkingSet),
        ),
        PlanLine::metered(
            "dropout_masks",
            "dropout masks, f32".to_string(),
            at(Kind::Masks),
        ),
        PlanLine::metered(
            "cross_entropy",
            "head: cross-entropy chunk and norms".to_string(),
            at(Kind::Head),
        ),
        PlanLine::metered(
            "eval",
            "evaluation forward (KV cache, logits)".to_string(),
            at(Kind::Eval),
        ),
        PlanLine::metered(
            "attention_tables",
            "flash-attention sequence tables, i32".to_string(),
            at(Kind::Tables),
        ),
    ]
}

/// What the meter does not see: cuBLAS' workspace and the allocator's `slack` (counted), the
/// CUDA context (not counted); and, for information, the load's metered peak `load` (in the
/// subtotal through `load_excess` where it is the peak).
fn unmetered_lines(slack: usize, load: usize) -> [PlanLine; 4] {
    let extra = |key, label: &str, bytes, counted| PlanLine {
        key,
        label: label.to_string(),
        bytes,
        metered: false,
        counted,
    };
    [
        extra(
            "cublas_workspace",
            "cuBLAS workspace (default, Hopper)",
            CUBLAS_WORKSPACE,
            true,
        ),
        extra(
            "allocator_slack",
            &format!("allocator slack ({SLACK_PERCENT}% of metered)"),
            slack,
            true,
        ),
        extra(
            "cuda_context",
            "CUDA context (estimate; not in the total)",
            CUDA_CONTEXT,
            false,
        ),
        extra(
            "load_peak",
            "peak while loading the model (informational)",
            load,
            false,
        ),
    ]
}
