//! The backward op set of a LoRA training step: [`TrainBackend`].
//!
//! A backend that trains implements these on top of [`Backend`]. The CPU backend's versions are
//! the readable specification (`cpu/backward/`, one file per op, derivations in their headers);
//! the model's per-layer backward (`crate::model::train`) is written once against this trait.
//!
//! Conventions, as in `cpu/backward`: `d<name>` is the gradient of the scalar loss with respect to
//! buffer `<name>`. Activation gradients are **written** unless the op says it accumulates; LoRA
//! parameter gradients (`dA`, `dB`) are **accumulated** (micro-batches sum into them, the trainer
//! zeroes them after each optimizer step). No base-weight gradient exists anywhere: base
//! projections, norms and embeddings are frozen.
//!
//! Precision: the CPU backend computes everything in f32 (it is the specification). A device
//! backend may store saved activations in 16 bits ([`TrainBackend::stash`]) and multiply in bf16
//! with f32 accumulation; the README's "Mixed precision" section states the CUDA policy.

use super::{Backend, Packed};
use crate::error::Result;
use crate::train::{AdamParamState, AdamW, OptimKind};

/// Dimensions of one LoRA-adapted projection: `rows` tokens through `W` `[out_features,
/// in_features]` with an adapter of rank `rank` (`A` `[rank, in]`, `B` `[out, rank]`).
pub use super::cpu::backward::LoraShape;

/// Backward ops for LoRA training (see the module docs for conventions).
pub trait TrainBackend: Backend {
    /// An activation kept from the forward for the backward ([`TrainBackend::stash`]).
    type Saved: Send + Sync;
    /// AdamW moments of every LoRA tensor, resident where the backend computes.
    type OptState: Send;

    /// Keeps the first `len` values of `buf` for the backward, in the backend's storage format
    /// (CPU: the f32 buffer itself; CUDA: bf16, half the memory).
    fn stash(&self, buf: Self::Buf, len: usize) -> Result<Self::Saved>;

    /// The `len` values of a stashed activation as a working f32 buffer.
    fn unstash(&self, saved: &Self::Saved, len: usize) -> Result<Self::Buf>;

    /// `dx[rows, in] = dy[rows, out] · W` (`accumulate = false`) or `dx += dy · W`; `W` is the
    /// frozen base weight `[out, in]` (NF4 weights are dequantized inside the product).
    fn matmul_dx(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        w: &Self::Linear,
        rows: usize,
        accumulate: bool,
    ) -> Result<()>;

    /// RMSNorm backward with a frozen weight: writes `dx[rows, dim]` from `dy` and the forward
    /// input `x` (derivation in `cpu/backward/rmsnorm.rs`).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        weight: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()>;

    /// RoPE backward, in place on the gradient `dx` `[rows, heads, head_dim]`: the rotation's
    /// transpose (rotation by `−θ`), same conventions as [`Backend::rope`].
    fn rope_backward(
        &self,
        dx: &mut Self::Buf,
        positions: &[u32],
        inv_freq: &Self::Buf,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Causal GQA attention for training over a packed batch ([`Packed`]: sequences
    /// concatenated along the rows, each attending within itself): writes `out` as
    /// [`Backend::attention`] does per sequence, and the log-sum-exp of every query row's scaled
    /// scores, `lse[r, h] = ln Σ_j exp(q·k_j / √D)` (`[rows, heads]`), the only statistic the
    /// backward needs.
    fn attention_train(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        p: Packed,
    ) -> Result<()>;

    /// Causal GQA attention backward from the forward's `out` and `lse`: probabilities are
    /// recomputed tile by tile (`P = exp(s − lse)`), `Δ = rowsum(dout ⊙ out)`; writes `dq`,
    /// `dk`, `dv` (derivation in `cpu/backward/attention.rs`).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        p: Packed,
    ) -> Result<()>;

    /// SwiGLU backward over `len` values: writes `dgate`, `dup` from `dh` and the forward inputs.
    fn swiglu_backward(
        &self,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dh: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        len: usize,
    ) -> Result<()>;

    /// Fused cross-entropy: writes the unscaled per-row losses (0 for target `-100`) and
    /// overwrites `logits` `[rows, vocab]` with `scale · (softmax − onehot(target))`
    /// (`rows = targets.len()`).
    fn cross_entropy_fused(
        &self,
        logits: &mut Self::Buf,
        losses: &mut Self::Buf,
        targets: &[i32],
        vocab: usize,
        scale: f32,
    ) -> Result<()>;

    /// LoRA backward: accumulates `dA`, `dB` and the adapter's share of `dx` (derivation in
    /// `cpu/backward/lora.rs`). `x`, `keep`, `xa` are what [`Backend::lora_forward_add`] saw/wrote.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        dx: &mut Self::Buf,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        keep: Option<&Self::Buf>,
        xa: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        scale: f32,
        shape: LoraShape,
    ) -> Result<()>;

    /// Inverted-dropout mask for `len` values: `keep[i] = 0` with probability `p`, else
    /// `1 / (1 − p)`, a pure function of `(seed, offset + i)` (see `cpu/dropout.rs`), so a
    /// recompute, a resumed run or a chunk of a larger mask regenerates the identical values on
    /// any backend.
    fn dropout_mask(
        &self,
        keep: &mut Self::Buf,
        len: usize,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()>;

    /// Fresh AdamW states (zero moments, step 0) for tensors of the given sizes, or the given
    /// host states (a resumed run), kept as `kind` says (`PagedAdamW32bit`: memory the driver
    /// may page to the host under pressure; the CPU backend keeps host vectors either way).
    fn adamw_init(
        &self,
        sizes: &[usize],
        host: Option<Vec<AdamParamState>>,
        kind: OptimKind,
    ) -> Result<Self::OptState>;

    /// The states as host vectors (for checkpoints: one format on every device).
    fn adamw_download(&self, state: &Self::OptState) -> Result<Vec<AdamParamState>>;

    /// One optimizer step over every LoRA tensor: the global gradient 2-norm, clipping to
    /// `max_norm` (0: none) and the AdamW update at learning rate `lr`, with the semantics of
    /// [`crate::train::clip_grad_norm`] and [`AdamW::update`]. `params[i]`, `grads[i]` and state
    /// `i` have the sizes given to [`TrainBackend::adamw_init`]. Returns the norm before
    /// clipping; when it is not finite nothing is updated. `grads` may be left scaled.
    fn adamw_step(
        &self,
        state: &mut Self::OptState,
        params: &mut [&mut Self::Buf],
        grads: &mut [&mut Self::Buf],
        hyper: &AdamW,
        lr: f64,
        max_norm: f32,
    ) -> Result<f32>;

    /// Zeroes the first `len` values of `buf` (gradient accumulators between steps).
    fn zero(&self, buf: &mut Self::Buf, len: usize) -> Result<()>;
}
