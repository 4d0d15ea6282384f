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

use super::{AttnShape, Backend};
use crate::error::Result;

/// Dimensions of one LoRA-adapted projection: `rows` tokens through `W` `[out_features,
/// in_features]` with an adapter of rank `rank` (`A` `[rank, in]`, `B` `[out, rank]`).
pub use super::cpu::backward::LoraShape;

/// Backward ops for LoRA training (see the module docs for conventions).
pub trait TrainBackend: Backend {
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

    /// Causal GQA attention backward, softmax recomputed from `q`, `k`, `v`; writes `dq`, `dk`,
    /// `dv` (layouts of [`AttnShape`]; training uses `pos0 = 0`, `cache_cap = q_len`).
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
        shape: AttnShape,
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
    /// `1 / (1 − p)`, a pure function of `(seed, i)` (see `cpu/dropout.rs`), so a recompute or a
    /// resumed run regenerates the identical mask on any backend.
    fn dropout_mask(&self, keep: &mut Self::Buf, len: usize, p: f32, seed: u64) -> Result<()>;
}
