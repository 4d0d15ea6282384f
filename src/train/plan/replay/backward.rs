//! The backward of one step, replayed: the fused head (`head_backward`), then per layer
//! `mlp_backward` and the attention block's backward (`layer_backward`).

use super::{Alloc, Kind, Walk};
use crate::lora::LoraTarget;

impl Walk<'_> {
    /// `head_backward` (called with `x` and `dx` alive): returns the per-token losses, alive until
    /// the end of the micro-batch's backward.
    pub(super) fn head(&mut self) -> Alloc {
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
        let losses = self.f32(Kind::Residual, t);
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
        self.sim.free_all([z, nc, dnc, n, lc]);
        self.sim.free(dn);
        losses
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
    pub(super) fn layer_backward(&mut self, l: usize) {
        let (d, t) = (self.d, self.t);
        use Kind::WorkingSet as W;
        use LoraTarget::*;
        self.mlp_backward(l);
        self.sim.at("backward", Some(l), "attention recomputed");
        let q = self.f32(W, t * d.q);
        let k = self.f32(W, t * d.k);
        let v = self.f32(W, t * d.k);
        let att = self.f32(W, t * d.q);
        let lse = self.f32(W, t * d.h);
        self.attention_tables();
        self.sim.at("backward", Some(l), "o_proj backward");
        let datt = self.f32(W, t * d.q);
        self.lora_share(OProj, t, 0);
        self.sim.at("backward", Some(l), "attention backward");
        let dq = self.f32(W, t * d.q);
        let dk = self.f32(W, t * d.k);
        let dv = self.f32(W, t * d.k);
        // The kernels' Δ is the persistent `FlashScratch.delta`; the tables are this batch's.
        self.attention_tables();
        self.sim.free_all([datt, att, lse, q, k, v]);
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
}
