//! The replay of one training step (or one evaluation forward), allocation by allocation, in the
//! order the model code performs them and with its drop points (the plan's module docs, "One
//! step"). [`Walk`] holds the primitives — an f32 buffer, a bf16 stash, a dropout mask, an
//! adapted projection, the flash-attention sequence tables — and the two walks the plan runs,
//! [`Walk::step`] and [`Walk::eval`]; `forward.rs` replays `layer_forward_train`, `backward.rs`
//! the head and the layer backward.

mod backward;
mod forward;

use super::shape::{DeviceWeight, Dims, RunShape, NF4_GEMV_MAX_M};
use super::sim::{Alloc, Kind, Sim};
use crate::lora::LoraTarget;
use crate::model::Recompute;

/// What `layer_forward_train` returns for the backward.
struct Acts(Vec<Alloc>);

/// Bytes of the flash-attention sequence tables of a batch of `lens` (`flash_attention.rs`
/// `seq_tables`, uploaded by `tables`): one i32 buffer `[forward tiles | backward tiles |
/// cu_seqlens]`, a `(sequence, tile)` pair per 64-row tile in each table and `B + 1` offsets,
/// `4·Σ⌈len/64⌉ + B + 1` values.
pub(super) fn table_bytes(lens: &[usize]) -> usize {
    let tiles: usize = lens.iter().map(|l| l.div_ceil(64)).sum();
    4 * (4 * tiles + lens.len() + 1)
}

/// The flash-attention sequence tables alive during a walk.
enum Tables {
    /// None counted (`device_internals` off).
    None,
    /// The tables of the batch trained before, until this one's first attention replaces them.
    Carried(Alloc),
    /// This batch's.
    Own(Alloc),
}

/// The replay of one micro-batch (or one evaluation example).
pub(super) struct Walk<'a> {
    run: &'a RunShape,
    d: Dims,
    lens: &'a [usize],
    t: usize,
    sim: Sim,
    tables: Tables,
}

impl<'a> Walk<'a> {
    /// A walk of the batch of sequences `lens`; `carried` bytes of sequence tables are alive at
    /// its start (the tables of the batch trained before it; 0: none).
    pub(super) fn new(run: &'a RunShape, lens: &'a [usize], carried: usize) -> Self {
        let mut sim = Sim::new();
        let tables = if run.device_internals && carried > 0 {
            Tables::Carried(sim.alloc(Kind::Tables, carried))
        } else {
            Tables::None
        };
        Walk {
            run,
            d: run.model.dims(),
            lens,
            t: lens.iter().sum(),
            sim,
            tables,
        }
    }

    /// `flash_attention.rs` `tables`, called by every training attention: the first call of a
    /// step finds the tables of the batch before (unless the lengths are the same: then they
    /// stay, of the same size), frees them and uploads this batch's; later calls reuse them.
    fn attention_tables(&mut self) {
        if !self.run.device_internals {
            return;
        }
        match std::mem::replace(&mut self.tables, Tables::None) {
            Tables::Own(a) => self.tables = Tables::Own(a),
            Tables::Carried(a) => {
                self.sim.free(a);
                self.tables = Tables::Own(self.sim.alloc(Kind::Tables, table_bytes(self.lens)));
            }
            Tables::None => {
                self.tables = Tables::Own(self.sim.alloc(Kind::Tables, table_bytes(self.lens)));
            }
        }
    }

    /// Frees the tables at the end of a walk (they stay on the device; the walk is over).
    fn end(mut self) -> Sim {
        match std::mem::replace(&mut self.tables, Tables::None) {
            Tables::Own(a) | Tables::Carried(a) => self.sim.free(a),
            Tables::None => {}
        }
        self.sim
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

    /// `forward_backward_packed` of this micro-batch.
    pub(super) fn step(mut self) -> Sim {
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
        let losses = self.head();
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
        self.sim.free_all([dx, losses]);
        self.end()
    }

    /// `example_loss` of an example of `self.t` tokens: `Llama::forward` with `Logits::All`, then
    /// the loss. Inference attention takes no sequence tables: the carried ones stay alive.
    pub(super) fn eval(mut self) -> Sim {
        let (d, t) = (self.d, self.t);
        let r = self.run.adapter.rank;
        use Kind::Eval as E;
        use LoraTarget::*;
        self.sim.at("eval", None, "KV cache and forward scratch");
        // The KV cache is bf16 on the device (`Backend::Kv`).
        let mut held: Vec<Alloc> = (0..2 * d.layers)
            .map(|_| self.sim.alloc(E, 2 * (t * d.k).max(1)))
            .collect();
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
        // The head normalizes into the scratch's `xn`; a forward of at most
        // KEEP_SCRATCH_ROWS tokens leaves its scratch in the cache (freed with it).
        self.sim.at("eval", None, "logits");
        let logits = self.f32(E, t * d.v);
        if self.adapted(LmHead) {
            let xa = self.f32(E, t * r);
            self.sim.free(xa);
        }
        if t <= crate::model::KEEP_SCRATCH_ROWS {
            held.extend(scratch);
        } else {
            self.sim.free_all(scratch);
        }
        let losses = self.f32(E, t);
        let targets = self.internal(E, t);
        self.free_opt(targets);
        held.extend([logits, losses]);
        self.sim.free_all(held);
        self.end()
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
