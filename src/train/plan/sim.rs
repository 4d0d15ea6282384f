//! The ledger of the replay: live bytes by kind, the high-water mark and where it was reached.

use super::PhasePeak;

/// Kinds of step buffers (the plan's step lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Kept for the backward: bf16 stashes, `xa`, stashed layer inputs.
    Activations,
    /// The residual stream `x` / layer outputs / unstashed layer inputs, its gradient `dx`, and
    /// the micro-batch's per-token losses (read back after the backward).
    Residual,
    /// One layer's f32 temporaries: norms, projections' outputs, unstashed copies, gradients,
    /// small uploads.
    WorkingSet,
    /// Dropout masks and their per-sequence slices.
    Masks,
    /// The head: final norm and its gradient, the chunk buffers, the logits chunk.
    Head,
    /// Evaluation forward: KV cache, forward scratch, logits.
    Eval,
    /// The flash-attention sequence tables (`FlashScratch.tables`) of the batch being trained,
    /// or of the one before it.
    Tables,
    /// Loading: the weights, norms and embedding as `Llama::assemble` uploads them, and the
    /// NF4 quantizer's buffers.
    Load,
}

const KINDS: usize = 8;

/// A live allocation of the replay (freed by [`Sim::free`]; deliberately not `Copy`).
#[must_use]
pub(super) struct Alloc {
    kind: Kind,
    bytes: usize,
}

/// The replay's position: phase, layer and the operation under way.
#[derive(Debug, Clone, Copy)]
pub(super) struct Where {
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
pub(super) struct Sim {
    live: [usize; KINDS],
    total: usize,
    pub peak: usize,
    /// Live bytes by kind at the peak.
    pub at_peak: [usize; KINDS],
    here: Where,
    pub peak_at: Where,
    /// The peak of each phase, in the order the phases began.
    pub phases: Vec<PhasePeak>,
}

impl Sim {
    pub fn new() -> Self {
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

    /// Moves the replay to `op` of `layer` in `phase`.
    pub fn at(&mut self, phase: &'static str, layer: Option<usize>, op: &'static str) {
        self.here = Where { phase, layer, op };
    }

    pub fn alloc(&mut self, kind: Kind, bytes: usize) -> Alloc {
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

    pub fn free(&mut self, a: Alloc) {
        self.live[a.kind as usize] -= a.bytes;
        self.total -= a.bytes;
    }

    pub fn free_all(&mut self, v: impl IntoIterator<Item = Alloc>) {
        for a in v {
            self.free(a);
        }
    }
}
