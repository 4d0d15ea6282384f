//! The forward of one decoder layer in training (`layer_forward_train`), replayed.

use super::{Acts, Alloc, Kind, Walk};
use crate::lora::LoraTarget;

impl Walk<'_> {
    /// `layer_forward_train`: returns the kept activations and the layer output.
    pub(super) fn layer_forward(&mut self, l: usize, phase: &'static str) -> (Acts, Alloc) {
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
        let lse = self.f32(WorkingSet, t * d.h);
        self.attention_tables();
        self.sim.free(lse); // the backward recomputes att and lse
        self.sim.at(phase, Some(l), "o_proj");
        let h = self.f32(WorkingSet, t * d.c);
        xa.extend(self.project_train(OProj, t, 0, Activations));
        self.sim.free(att);
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
            self.stash(gate, t * d.f),
            self.stash(up, t * d.f),
        ];
        kept.extend(xa);
        self.sim.free(m);
        self.sim.free(n);
        (Acts(kept), out)
    }
}
