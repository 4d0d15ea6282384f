//! LoRA training step of a Llama: forward with saved activations, then a hand-written backward
//! through every layer, producing gradients for the LoRA matrices only.
//!
//! # Packed micro-batches
//! A step runs a whole micro-batch at once: its sequences are concatenated along the token axis
//! (`T = Σ T_i` rows, no padding), so every projection is one product over all rows and every
//! norm and elementwise op one pass; RoPE positions restart at 0 per sequence and attention stays
//! within each sequence ([`Packed`], FlashAttention's varlen layout); each sequence keeps its own
//! dropout masks (seeded per sequence, sliced per row range). The result equals running the
//! sequences one at a time. Below, `T` rows and "positions" are those of the packed batch.
//!
//! # Forward
//! ```text
//! x₀ = embed[ids]
//! layer l:  n₁ = rms(x)·w₁           q, k, v = P_q(n₁), P_k(n₁), P_v(n₁);  q, k ← rope(q), rope(k)
//!           a  = attn(q, k, v)       h = x + P_o(a)
//!           n₂ = rms(h)·w₂           g, u = P_g(n₂), P_u(n₂);  m = silu(g) ⊙ u
//!           x' = h + P_d(m)
//! head:     n = rms(x_L)·w_f         z = P_head(n)        L = scale · Σ_t CE(z_t, y_t)
//! ```
//! where every projection is `P(x) = x·Wᵀ + s·(x ⊙ keep)·Aᵀ·Bᵀ` (frozen `W`, LoRA `A`, `B` on the
//! adapted modules only; `keep` the dropout mask, `1` without dropout).
//!
//! # Backward (chain rule, each step's derivation in the op's file under `backend/cpu/backward`)
//! ```text
//! dz = scale·(softmax(z) − onehot(y))                          cross_entropy.rs
//! dn = dz·W_head (+ LoRA share);   dx_L = rms_bwd(dn; x_L)     linear.rs, lora.rs, rmsnorm.rs
//! layer l, given dx' (gradient of the layer output):
//!   dh  = dx'                      (residual)    dm  = dx'·W_d (+ LoRA)
//!   dg, du = swiglu_bwd(dm; g, u)                dn₂ = dg·W_g + du·W_u (+ LoRA)
//!   dh += rms_bwd(dn₂; h)
//!   da  = dh·W_o (+ LoRA)          dq, dk, dv = attn_bwd(da; q, k, v)
//!   dq, dk ← rope_bwd(dq), rope_bwd(dk)          dn₁ = dq·W_q + dk·W_k + dv·W_v (+ LoRA)
//!   dx  = dh + rms_bwd(dn₁; x)
//! ```
//! Every LoRA share also accumulates that module's `dA`, `dB` (`lora.rs`). No base-weight
//! gradient is ever formed; layer 0's input gradient is not needed and is skipped.
//!
//! # Activation memory
//! [`Recompute::Selective`] (default) keeps per layer what backward cannot get cheaply: the
//! layer input `x`, `h`, the post-RoPE `q`, `k`, `v`, `g`, `u` and each adapter's `x·Aᵀ`
//! (`[T, r]`); the norms `n₁`, `n₂`, the SwiGLU product `m`, the dropout masks and the attention
//! output with its log-sum-exp are recomputed — the attention forward again from the stashed
//! `q`, `k`, `v` (FlashAttention's own backward recomputes the probabilities anyway): at 4 × 512
//! tokens it is about 1% of a 7B layer's forward GEMM FLOPs, and it saves `T·q_dim` stashed values per
//! layer (537 MB at 7B). That is `T·(2C + q_dim + 2·kv_dim + 2F)` values per layer, kept through [`TrainBackend::stash`]
//! (f32 on the CPU, bf16 on CUDA). [`Recompute::Full`] keeps only each layer's input (`T·C`
//! values) and reruns the layer's forward during backward: about a third more compute for the
//! smallest footprint.
//!
//! The head never builds the `[T, vocab]` logits: [`CE_CHUNK`] tokens at a time it computes
//! `z = P_head(n)`, the fused cross-entropy turns `z` into `dz` in place, and `dz·W_head` (plus
//! the adapter's share) lands in that chunk's rows of `dn`. Chunks are independent (row-wise
//! loss, row-wise dropout mask slices), so the result equals the unchunked computation.

use super::lora::{LoraLinear, LoraSet};
use super::Llama;
use crate::backend::cpu::dropout::splitmix64;
use crate::backend::{Packed, TrainBackend};
use crate::error::{Error, Result};
use crate::lora::LoraTarget;

/// Tokens per chunk of the fused head + cross-entropy (a `[CE_CHUNK, vocab]` f32 buffer: 32 MB
/// for Llama-2's 32,000-token vocabulary).
pub const CE_CHUNK: usize = 256;

/// How much of the forward the backward recomputes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// Keep the expensive activations, recompute norms, SwiGLU and dropout masks.
    #[default]
    Selective,
    /// Keep only each layer's input; rerun the layer forward in backward.
    Full,
}

/// Result of one sequence's forward + backward.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepStats {
    /// `Σ_t CE(z_t, y_t)` over the non-ignored targets (unscaled).
    pub loss_sum: f64,
    /// Number of non-ignored targets.
    pub targets: usize,
}

/// The projections of a decoder layer in forward order, with their input buffers' roles.
const QKV: [LoraTarget; 3] = [LoraTarget::QProj, LoraTarget::KProj, LoraTarget::VProj];

/// What one layer's backward needs from its forward (see the module docs).
struct LayerActs<B: TrainBackend> {
    h: B::Saved,
    q: B::Saved,
    k: B::Saved,
    v: B::Saved,
    gate: B::Saved,
    up: B::Saved,
    /// `x̃·Aᵀ` per adapted target, indexed like [`LoraSet::layers`].
    xa: [Option<B::Buf>; 7],
}

/// Where a projection sits: its layer (`None`: lm_head), its target, and the sequence position
/// of its first row (non-zero for the head's chunks: dropout masks are sliced from the
/// sequence's mask there).
#[derive(Debug, Clone, Copy)]
struct Site {
    layer: Option<usize>,
    target: LoraTarget,
    row0: usize,
}

impl Site {
    fn layer(l: usize, target: LoraTarget) -> Self {
        Site {
            layer: Some(l),
            target,
            row0: 0,
        }
    }
}

/// Dropout seed of module `target` of layer `layer` (`None`: lm_head) for sequence seed `seed`.
fn module_seed(seed: u64, layer: Option<usize>, target: LoraTarget) -> u64 {
    let l = layer.map_or(0, |l| l as u64 + 1);
    let t = LoraTarget::ALL
        .iter()
        .position(|&x| x == target)
        .unwrap_or(0) as u64;
    splitmix64(seed ^ splitmix64((l << 8) | t))
}

impl<B: TrainBackend> Llama<B> {
    fn lora_or_err(&self) -> Result<&super::Lora<B>> {
        self.lora
            .as_ref()
            .ok_or_else(|| Error::InvalidArg("training needs a LoRA adapter attached".into()))
    }

    /// The dropout mask of an adapted module for the `rows` packed rows from `site.row0`, or
    /// `None` without dropout. Each sequence's rows get that sequence's mask (seeded by its own
    /// seed, element offsets counted from its first row), so packing never changes a mask.
    fn dropout_keep(
        &self,
        ad: &LoraLinear<B>,
        site: Site,
        rows: usize,
        batch: &StepBatch,
    ) -> Result<Option<B::Buf>> {
        let p = self.lora_or_err()?.dropout;
        let Some(seeds) = batch.seeds.as_deref().filter(|_| p > 0.0) else {
            return Ok(None);
        };
        let (b, width) = (&self.backend, ad.in_features);
        let mut keep = b.zeros(rows * width)?;
        let (lo, hi) = (site.row0, site.row0 + rows);
        for ((start, len), &seed) in batch.spans().zip(seeds) {
            let (a, e) = (start.max(lo), (start + len).min(hi));
            if a >= e {
                continue;
            }
            let seed = module_seed(seed, site.layer, site.target);
            let (n, offset) = ((e - a) * width, ((a - start) * width) as u64);
            if a == lo && e == hi {
                b.dropout_mask(&mut keep, n, p, seed, offset)?;
            } else {
                let mut part = b.zeros(n)?;
                b.dropout_mask(&mut part, n, p, seed, offset)?;
                b.copy(&mut keep, (a - lo) * width, &part, 0, n)?;
            }
        }
        Ok(Some(keep))
    }

    /// `out = P(x)` for a projection during training; returns the adapter's `x̃·Aᵀ` if adapted.
    fn project_train(
        &self,
        out: &mut B::Buf,
        x: &B::Buf,
        site: Site,
        rows: usize,
        batch: &StepBatch,
    ) -> Result<Option<B::Buf>> {
        let b = &self.backend;
        b.matmul(out, x, self.base_weight(site.layer, site.target), rows)?;
        let lora = self.lora_or_err()?;
        let Some(ad) = lora.params.get(site.layer, site.target) else {
            return Ok(None);
        };
        let rank = lora.params.rank;
        let keep = self.dropout_keep(ad, site, rows, batch)?;
        let mut xa = b.zeros(rows * rank)?;
        b.lora_forward_add(
            out,
            &mut xa,
            x,
            keep.as_ref(),
            &ad.a,
            &ad.b,
            lora.scale,
            ad.shape(rows, rank),
        )?;
        Ok(Some(xa))
    }

    /// Backward of `y = P(x)`: `dx (+)= dy·W` (base share) plus the adapter's share,
    /// accumulating the module's `dA`, `dB` into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &self,
        dx: &mut B::Buf,
        dy: &B::Buf,
        x: &B::Buf,
        xa: Option<&B::Buf>,
        site: Site,
        rows: usize,
        accumulate: bool,
        grads: &mut LoraSet<B>,
        batch: &StepBatch,
    ) -> Result<()> {
        let w = self.base_weight(site.layer, site.target);
        self.backend.matmul_dx(dx, dy, w, rows, accumulate)?;
        match xa {
            Some(xa) => self.lora_share(dx, dy, x, xa, site, rows, grads, batch),
            None => Ok(()),
        }
    }

    /// The adapter part of a projection's backward: accumulates `dA`, `dB` and adds the
    /// adapter's share of `dx` (nothing when the module is not adapted).
    #[allow(clippy::too_many_arguments)]
    fn lora_share(
        &self,
        dx: &mut B::Buf,
        dy: &B::Buf,
        x: &B::Buf,
        xa: &B::Buf,
        site: Site,
        rows: usize,
        grads: &mut LoraSet<B>,
        batch: &StepBatch,
    ) -> Result<()> {
        let lora = self.lora_or_err()?;
        let Some(ad) = lora.params.get(site.layer, site.target) else {
            return Ok(());
        };
        let rank = lora.params.rank;
        let keep = self.dropout_keep(ad, site, rows, batch)?;
        let g = grads.get_mut(site.layer, site.target).ok_or_else(|| {
            Error::InvalidArg(format!(
                "no gradient buffer for adapted module {}",
                site.target
            ))
        })?;
        self.backend.lora_backward(
            dx,
            &mut g.a,
            &mut g.b,
            dy,
            x,
            keep.as_ref(),
            xa,
            &ad.a,
            &ad.b,
            lora.scale,
            ad.shape(rows, rank),
        )
    }

    fn packed<'a>(&self, lens: &'a [usize]) -> Packed<'a> {
        Packed {
            lens,
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Packed causal attention of post-RoPE `q`, `k`, `v`: the output `[T, q_dim]` and the
    /// per-row log-sum-exp `[T, H]`. The forward runs it, and the backward again from the stashed
    /// `q`, `k`, `v` (a deterministic kernel on the same inputs gives the same result).
    fn attention(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        batch: &StepBatch,
    ) -> Result<(B::Buf, B::Buf)> {
        let (b, t) = (&self.backend, batch.rows());
        let mut att = b.zeros(t * self.cfg.q_dim())?;
        let mut lse = b.zeros(t * self.cfg.num_attention_heads)?;
        b.attention_train(&mut att, &mut lse, q, k, v, self.packed(&batch.lens))?;
        Ok((att, lse))
    }

    /// One decoder layer's training forward: returns the saved activations and the output.
    fn layer_forward_train(
        &self,
        l: usize,
        x: &B::Buf,
        batch: &StepBatch,
    ) -> Result<(LayerActs<B>, B::Buf)> {
        let (cfg, b, t) = (&self.cfg, &self.backend, batch.rows());
        let positions = &batch.positions;
        let (c, qd, kvd, f) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let w = &self.layers[l];
        let mut xa: [Option<B::Buf>; 7] = Default::default();
        let mut n = b.zeros(t * c)?;
        b.rmsnorm(&mut n, x, &w.attn_norm, t, c, cfg.rms_norm_eps)?;
        let mut q = b.zeros(t * qd)?;
        let mut k = b.zeros(t * kvd)?;
        let mut v = b.zeros(t * kvd)?;
        for (i, (out, target)) in [&mut q, &mut k, &mut v].into_iter().zip(QKV).enumerate() {
            xa[i] = self.project_train(out, &n, Site::layer(l, target), t, batch)?;
        }
        let (heads, kv_heads, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        b.rope(&mut q, positions, &self.inv_freq, heads, d)?;
        b.rope(&mut k, positions, &self.inv_freq, kv_heads, d)?;
        let (att, lse) = self.attention(&q, &k, &v, batch)?;
        drop(lse); // the backward recomputes att and lse from the stashed q, k, v
        let mut h = b.zeros(t * c)?;
        xa[3] = self.project_train(&mut h, &att, Site::layer(l, LoraTarget::OProj), t, batch)?;
        drop(att);
        b.add_assign(&mut h, x, t * c)?;
        b.rmsnorm(&mut n, &h, &w.mlp_norm, t, c, cfg.rms_norm_eps)?;
        let mut gate = b.zeros(t * f)?;
        let mut up = b.zeros(t * f)?;
        let (gp, upj) = (LoraTarget::GateProj, LoraTarget::UpProj);
        xa[4] = self.project_train(&mut gate, &n, Site::layer(l, gp), t, batch)?;
        xa[5] = self.project_train(&mut up, &n, Site::layer(l, upj), t, batch)?;
        let mut m = b.zeros(t * f)?;
        b.swiglu(&mut m, &gate, &up, t * f)?;
        let mut out = b.zeros(t * c)?;
        let down = Site::layer(l, LoraTarget::DownProj);
        xa[6] = self.project_train(&mut out, &m, down, t, batch)?;
        b.add_assign(&mut out, &h, t * c)?;
        let acts = LayerActs {
            h: b.stash(h, t * c)?,
            q: b.stash(q, t * qd)?,
            k: b.stash(k, t * kvd)?,
            v: b.stash(v, t * kvd)?,
            gate: b.stash(gate, t * f)?,
            up: b.stash(up, t * f)?,
            xa,
        };
        Ok((acts, out))
    }

    /// Backward of the MLP block `out = h + P_d(silu(g) ⊙ u)`, `g, u = P(rms(h))`: adds the
    /// block's share to `dx` (the gradient of the layer output on entry, of `h` on exit).
    fn mlp_backward(
        &self,
        l: usize,
        a: &LayerActs<B>,
        dx: &mut B::Buf,
        t: usize,
        grads: &mut LoraSet<B>,
        batch: &StepBatch,
    ) -> Result<()> {
        let (cfg, b) = (&self.cfg, &self.backend);
        let (c, f, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        let (gate, up) = (b.unstash(&a.gate, t * f)?, b.unstash(&a.up, t * f)?);
        let mut m = b.zeros(t * f)?;
        b.swiglu(&mut m, &gate, &up, t * f)?;
        let mut dm = b.zeros(t * f)?;
        let down = Site::layer(l, LoraTarget::DownProj);
        let xa = a.xa[6].as_ref();
        self.project_backward(&mut dm, dx, &m, xa, down, t, false, grads, batch)?;
        drop(m);
        let (mut dg, mut du) = (b.zeros(t * f)?, b.zeros(t * f)?);
        b.swiglu_backward(&mut dg, &mut du, &dm, &gate, &up, t * f)?;
        drop((dm, gate, up));
        let h = b.unstash(&a.h, t * c)?;
        let mut n = b.zeros(t * c)?;
        b.rmsnorm(&mut n, &h, &self.layers[l].mlp_norm, t, c, eps)?;
        let mut dn = b.zeros(t * c)?;
        let (gp, upj) = (LoraTarget::GateProj, LoraTarget::UpProj);
        let xa = a.xa[4].as_ref();
        self.project_backward(
            &mut dn,
            &dg,
            &n,
            xa,
            Site::layer(l, gp),
            t,
            false,
            grads,
            batch,
        )?;
        let xa = a.xa[5].as_ref();
        self.project_backward(
            &mut dn,
            &du,
            &n,
            xa,
            Site::layer(l, upj),
            t,
            true,
            grads,
            batch,
        )?;
        drop((dg, du, n));
        let mut tmp = b.zeros(t * c)?;
        b.rmsnorm_backward(&mut tmp, &dn, &h, &self.layers[l].mlp_norm, t, c, eps)?;
        b.add_assign(dx, &tmp, t * c)
    }

    /// One decoder layer's backward. `dx` holds the gradient of the layer output on entry and
    /// of its input `x` on exit (left unchanged-meaningless for layer 0, where `need_dx` is false).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        x: &B::Buf,
        a: &LayerActs<B>,
        dx: &mut B::Buf,
        grads: &mut LoraSet<B>,
        batch: &StepBatch,
        need_dx: bool,
    ) -> Result<()> {
        let (cfg, b, t) = (&self.cfg, &self.backend, batch.rows());
        let positions = &batch.positions;
        let (c, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let eps = cfg.rms_norm_eps;
        self.mlp_backward(l, a, dx, t, grads, batch)?; // dx is now dh
                                                       // Attention block: h = x + P_o(att), att = attn(rope(P_q(n₁)), rope(P_k(n₁)), P_v(n₁)).
        let (q, k, v) = (
            b.unstash(&a.q, t * qd)?,
            b.unstash(&a.k, t * kvd)?,
            b.unstash(&a.v, t * kvd)?,
        );
        // The attention output and its log-sum-exp are recomputed (see the module docs).
        let (att, lse) = self.attention(&q, &k, &v, batch)?;
        let mut datt = b.zeros(t * qd)?;
        let o = Site::layer(l, LoraTarget::OProj);
        let xa = a.xa[3].as_ref();
        self.project_backward(&mut datt, dx, &att, xa, o, t, false, grads, batch)?;
        let (mut dq, mut dk, mut dv) = (b.zeros(t * qd)?, b.zeros(t * kvd)?, b.zeros(t * kvd)?);
        {
            let shape = self.packed(&batch.lens);
            let (dqkv, qkv) = ((&mut dq, &mut dk, &mut dv), (&q, &k, &v));
            b.attention_backward(
                dqkv.0, dqkv.1, dqkv.2, &datt, qkv.0, qkv.1, qkv.2, &att, &lse, shape,
            )?;
        }
        drop((datt, att, lse, q, k, v));
        let (heads, kv_heads, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        b.rope_backward(&mut dq, positions, &self.inv_freq, heads, d)?;
        b.rope_backward(&mut dk, positions, &self.inv_freq, kv_heads, d)?;
        let mut n = b.zeros(t * c)?;
        b.rmsnorm(&mut n, x, &self.layers[l].attn_norm, t, c, eps)?;
        let mut dn = b.zeros(t * c)?;
        for (i, (dy, target)) in [&dq, &dk, &dv].into_iter().zip(QKV).enumerate() {
            let (xa, site) = (a.xa[i].as_ref(), Site::layer(l, target));
            if need_dx {
                self.project_backward(&mut dn, dy, &n, xa, site, t, i > 0, grads, batch)?;
            } else if let Some(xa) = xa {
                // Layer 0: only the adapter's dA, dB are needed; skip the base share dy·W.
                self.lora_share(&mut dn, dy, &n, xa, site, t, grads, batch)?;
            }
        }
        if need_dx {
            let mut tmp = b.zeros(t * c)?;
            b.rmsnorm_backward(&mut tmp, &dn, x, &self.layers[l].attn_norm, t, c, eps)?;
            b.add_assign(dx, &tmp, t * c)?;
        }
        Ok(())
    }

    /// The head and its loss, chunked over tokens (see the module docs): returns the per-token
    /// losses `[T]` (on the backend; read back after the backward, so no step waits on the host
    /// mid-way) and writes `dx`, the gradient of the final hidden states `x` `[T, C]`.
    fn head_backward(
        &self,
        x: &B::Buf,
        targets: &[i32],
        scale: f32,
        grads: &mut LoraSet<B>,
        batch: &StepBatch,
        dx: &mut B::Buf,
    ) -> Result<B::Buf> {
        let (cfg, b, t) = (&self.cfg, &self.backend, targets.len());
        let (c, vocab, eps) = (cfg.hidden_size, cfg.vocab_size, cfg.rms_norm_eps);
        let mut n = b.zeros(t * c)?;
        b.rmsnorm(&mut n, x, &self.norm, t, c, eps)?;
        let mut dn = b.zeros(t * c)?;
        let chunk = self.ce_chunk.clamp(1, t);
        let (mut nc, mut dnc) = (b.zeros(chunk * c)?, b.zeros(chunk * c)?);
        let mut z = b.zeros(chunk * vocab)?;
        let (mut losses, mut lc) = (b.zeros(t)?, b.zeros(chunk)?);
        for r0 in (0..t).step_by(chunk) {
            let rows = chunk.min(t - r0);
            let site = Site {
                layer: None,
                target: LoraTarget::LmHead,
                row0: r0,
            };
            b.copy(&mut nc, 0, &n, r0 * c, rows * c)?;
            let xa = self.project_train(&mut z, &nc, site, rows, batch)?;
            b.cross_entropy_fused(&mut z, &mut lc, &targets[r0..r0 + rows], vocab, scale)?;
            b.copy(&mut losses, r0, &lc, 0, rows)?;
            let xa = xa.as_ref();
            self.project_backward(&mut dnc, &z, &nc, xa, site, rows, false, grads, batch)?;
            b.copy(&mut dn, r0 * c, &dnc, 0, rows * c)?;
        }
        drop((z, nc, dnc, n, lc));
        b.rmsnorm_backward(dx, &dn, x, &self.norm, t, c, eps)?;
        Ok(losses)
    }

    /// Forward and backward of one sequence: `targets[t]` is the token position `t` must predict
    /// (`-100`: no loss). The loss is `scale · Σ_t CE`; its gradient with respect to every
    /// attached LoRA matrix is **added** to `grads`. `dropout_seed` (`None`: no dropout, as in
    /// evaluation) determines every dropout mask of the step.
    pub fn forward_backward(
        &self,
        ids: &[u32],
        targets: &[i32],
        scale: f32,
        grads: &mut LoraSet<B>,
        recompute: Recompute,
        dropout_seed: Option<u64>,
    ) -> Result<StepStats> {
        let seq = SeqInput {
            ids,
            targets,
            dropout_seed,
        };
        self.forward_backward_packed(&[seq], scale, grads, recompute)
    }

    /// Forward and backward of a micro-batch, its sequences packed along the token axis (see
    /// the module docs): every projection, norm and elementwise op runs once over all `Σ T_i`
    /// rows, attention and RoPE positions restart per sequence, each sequence keeps its own
    /// dropout masks. Equals calling [`Llama::forward_backward`] once per sequence (up to f32
    /// summation order). Dropout is on for all sequences or for none.
    pub fn forward_backward_packed(
        &self,
        seqs: &[SeqInput],
        scale: f32,
        grads: &mut LoraSet<B>,
        recompute: Recompute,
    ) -> Result<StepStats> {
        let batch = StepBatch::new(seqs)?;
        let (b, t, c) = (&self.backend, batch.rows(), self.cfg.hidden_size);
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.iter().copied()).collect();
        let targets: Vec<i32> = seqs
            .iter()
            .flat_map(|s| s.targets.iter().copied())
            .collect();
        let mut x = b.zeros(t * c)?;
        b.embedding(&mut x, &self.embed, &ids, c)?;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut saved = Vec::new();
        for l in 0..self.layers.len() {
            let (acts, out) = self.layer_forward_train(l, &x, &batch)?;
            if recompute == Recompute::Selective {
                saved.push(acts);
            }
            inputs.push(b.stash(std::mem::replace(&mut x, out), t * c)?);
        }
        let mut dx = b.zeros(t * c)?;
        let losses = self.head_backward(&x, &targets, scale, grads, &batch, &mut dx)?;
        drop(x);
        for l in (0..self.layers.len()).rev() {
            let x_l = b.unstash(&inputs.pop().expect("one input per layer"), t * c)?;
            let acts = match recompute {
                Recompute::Selective => saved.pop().expect("one activation set per layer"),
                Recompute::Full => self.layer_forward_train(l, &x_l, &batch)?.0,
            };
            self.layer_backward(l, &x_l, &acts, &mut dx, grads, &batch, l > 0)?;
        }
        let loss_sum = b.download(&losses)?.iter().map(|&v| v as f64).sum();
        Ok(StepStats {
            loss_sum,
            targets: targets.iter().filter(|&&t| t >= 0).count(),
        })
    }
}

/// One sequence of a training micro-batch: token ids, next-token targets (`-100`: no loss) and
/// the seed of its dropout masks (`None`: no dropout).
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub ids: &'a [u32],
    pub targets: &'a [i32],
    pub dropout_seed: Option<u64>,
}

/// The packed layout of a micro-batch: sequence lengths, each row's position (restarting at 0
/// per sequence), and the sequences' dropout seeds.
struct StepBatch {
    lens: Vec<usize>,
    positions: Vec<u32>,
    seeds: Option<Vec<u64>>,
}

impl StepBatch {
    fn new(seqs: &[SeqInput]) -> Result<Self> {
        if seqs.is_empty() {
            return Err(Error::InvalidArg("forward_backward: no sequences".into()));
        }
        for s in seqs {
            if s.ids.is_empty() || s.targets.len() != s.ids.len() {
                return Err(Error::InvalidArg(format!(
                    "forward_backward: {} tokens with {} targets",
                    s.ids.len(),
                    s.targets.len()
                )));
            }
        }
        let seeds: Vec<Option<u64>> = seqs.iter().map(|s| s.dropout_seed).collect();
        let seeds = match seeds.iter().all(Option::is_some) {
            true => Some(seeds.into_iter().flatten().collect()),
            false if seeds.iter().all(Option::is_none) => None,
            false => {
                return Err(Error::InvalidArg(
                    "forward_backward: dropout seeds for some sequences of a batch only".into(),
                ))
            }
        };
        Ok(StepBatch {
            lens: seqs.iter().map(|s| s.ids.len()).collect(),
            positions: seqs.iter().flat_map(|s| 0..s.ids.len() as u32).collect(),
            seeds,
        })
    }

    fn rows(&self) -> usize {
        self.positions.len()
    }

    /// `(first row, length)` of every sequence.
    fn spans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.lens.iter().scan(0usize, |start, &len| {
            let s = *start;
            *start += len;
            Some((s, len))
        })
    }
}
