//! LoRA adapters resident on a backend, attached to a [`Llama`](super::Llama).
//!
//! An adapted projection computes `y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ` (PEFT's `Linear.forward`;
//! `s = α/r`, or `α/√r` with rsLoRA). [`LoraSet`] holds one `A` `[r, in]` / `B` `[out, r]` pair per
//! adapted module as backend buffers; the same type holds their gradients during training.
//! Conversion to and from the host-side [`LoraWeights`] (PEFT files) is exact (f32 both ways).

use crate::backend::{Backend, LoraShape};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraModule, LoraPair, LoraTarget, LoraWeights};
use std::collections::BTreeMap;

/// Number of adaptable projections inside one decoder layer (q, k, v, o, gate, up, down).
pub const LAYER_TARGETS: usize = 7;

/// Position of a decoder-layer target in [`LoraSet::layers`]; `None` for `lm_head`.
pub fn target_index(t: LoraTarget) -> Option<usize> {
    LoraTarget::ALL_LINEAR.iter().position(|&x| x == t)
}

/// One adapted projection's matrices (or their gradients).
pub struct LoraLinear<B: Backend> {
    /// `[rank, in_features]`.
    pub a: B::Buf,
    /// `[out_features, rank]`.
    pub b: B::Buf,
    pub in_features: usize,
    pub out_features: usize,
    /// The backend's inference copies of `a` and `b` ([`Backend::lora_inference_copy`]), made
    /// by [`LoraSet::freeze`] for an adapter that will not change again; `None` while training.
    /// Mutable access through [`LoraSet::modules_mut`] or [`LoraSet::get_mut`] drops them, so a
    /// copy never outlives an update of its f32 matrices.
    pub frozen: Option<(B::Linear, B::Linear)>,
}

impl<B: Backend> LoraLinear<B> {
    /// The shape of this adapter applied to `rows` tokens.
    pub fn shape(&self, rows: usize, rank: usize) -> LoraShape {
        LoraShape {
            rows,
            in_features: self.in_features,
            out_features: self.out_features,
            rank,
        }
    }
}

/// Every adapted module of a model: `layers[l][target_index(t)]`, plus `lm_head`.
pub struct LoraSet<B: Backend> {
    pub rank: usize,
    pub layers: Vec<[Option<LoraLinear<B>>; LAYER_TARGETS]>,
    pub lm_head: Option<LoraLinear<B>>,
}

impl<B: Backend> LoraSet<B> {
    /// Uploads host weights; `num_layers` is the model's depth.
    pub fn upload(b: &B, w: &LoraWeights, num_layers: usize) -> Result<Self> {
        let mut set = LoraSet {
            rank: w.r,
            layers: (0..num_layers).map(|_| Default::default()).collect(),
            lm_head: None,
        };
        for (m, pair) in &w.modules {
            let lin = LoraLinear {
                a: b.upload(&pair.a)?,
                b: b.upload(&pair.b)?,
                in_features: pair.in_features,
                out_features: pair.out_features,
                frozen: None,
            };
            let slot = set.slot_mut(m).ok_or_else(|| {
                Error::InvalidArg(format!(
                    "adapter module {m} does not exist in a {num_layers}-layer model"
                ))
            })?;
            *slot = Some(lin);
        }
        Ok(set)
    }

    /// Zero buffers shaped like `self` (gradient accumulators).
    pub fn zeros_like(&self, b: &B) -> Result<Self> {
        let zero = |l: &LoraLinear<B>| -> Result<LoraLinear<B>> {
            Ok(LoraLinear {
                a: b.zeros(self.rank * l.in_features)?,
                b: b.zeros(l.out_features * self.rank)?,
                in_features: l.in_features,
                out_features: l.out_features,
                frozen: None,
            })
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for row in &self.layers {
            let mut out: [Option<LoraLinear<B>>; LAYER_TARGETS] = Default::default();
            for (o, l) in out.iter_mut().zip(row) {
                *o = l.as_ref().map(zero).transpose()?;
            }
            layers.push(out);
        }
        Ok(LoraSet {
            rank: self.rank,
            layers,
            lm_head: self.lm_head.as_ref().map(zero).transpose()?,
        })
    }

    fn slot_mut(&mut self, m: &LoraModule) -> Option<&mut Option<LoraLinear<B>>> {
        match (m.layer, target_index(m.target)) {
            (Some(l), Some(i)) => self.layers.get_mut(l).map(|row| &mut row[i]),
            (None, None) => Some(&mut self.lm_head),
            _ => None,
        }
    }

    /// The adapter of module `target` in layer `layer` (`None` = lm_head), if any.
    pub fn get(&self, layer: Option<usize>, target: LoraTarget) -> Option<&LoraLinear<B>> {
        match (layer, target_index(target)) {
            (Some(l), Some(i)) => self.layers.get(l).and_then(|row| row[i].as_ref()),
            (None, None) => self.lm_head.as_ref(),
            _ => None,
        }
    }

    /// Mutable access, as [`LoraSet::get`]; drops the module's inference copies.
    pub fn get_mut(
        &mut self,
        layer: Option<usize>,
        target: LoraTarget,
    ) -> Option<&mut LoraLinear<B>> {
        let lin = match (layer, target_index(target)) {
            (Some(l), Some(i)) => self.layers.get_mut(l).and_then(|row| row[i].as_mut()),
            (None, None) => self.lm_head.as_mut(),
            _ => None,
        }?;
        lin.frozen = None;
        Some(lin)
    }

    /// Makes every module's inference copies ([`LoraLinear::frozen`]) from its current
    /// matrices. For an adapter that will not change again (generation, evaluation): training
    /// reaches the matrices through [`LoraSet::modules_mut`], which drops the copies.
    pub fn freeze(&mut self, be: &B) -> Result<()> {
        let rank = self.rank;
        let all = self.layers.iter_mut().flatten().flatten();
        for lin in all.chain(self.lm_head.as_mut()) {
            let a = be.lora_inference_copy(&lin.a, rank, lin.in_features)?;
            let b = be.lora_inference_copy(&lin.b, lin.out_features, rank)?;
            lin.frozen = a.zip(b);
        }
        Ok(())
    }

    /// Every adapted module with its matrices, in [`LoraModule`] order.
    pub fn modules(&self) -> Vec<(LoraModule, &LoraLinear<B>)> {
        let mut out: Vec<_> = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, row)| {
                row.iter()
                    .zip(LoraTarget::ALL_LINEAR)
                    .filter_map(move |(s, t)| s.as_ref().map(|lin| (LoraModule::layer(l, t), lin)))
            })
            .collect();
        if let Some(h) = &self.lm_head {
            out.push((LoraModule::lm_head(), h));
        }
        out.sort_by_key(|(m, _)| *m);
        out
    }

    /// Mutable version of [`LoraSet::modules`]; drops every module's inference copies (the
    /// caller may change the matrices: the optimizer step does).
    pub fn modules_mut(&mut self) -> Vec<(LoraModule, &mut LoraLinear<B>)> {
        let mut out: Vec<_> = self
            .layers
            .iter_mut()
            .enumerate()
            .flat_map(|(l, row)| {
                row.iter_mut()
                    .zip(LoraTarget::ALL_LINEAR)
                    .filter_map(move |(s, t)| s.as_mut().map(|lin| (LoraModule::layer(l, t), lin)))
            })
            .collect();
        if let Some(h) = &mut self.lm_head {
            out.push((LoraModule::lm_head(), h));
        }
        out.sort_by_key(|(m, _)| *m);
        for (_, lin) in &mut out {
            lin.frozen = None;
        }
        out
    }

    /// Copies the matrices back to the host.
    pub fn download(&self, b: &B) -> Result<LoraWeights> {
        let mut modules = BTreeMap::new();
        for (m, lin) in self.modules() {
            modules.insert(
                m,
                LoraPair {
                    a: b.download(&lin.a)?,
                    b: b.download(&lin.b)?,
                    in_features: lin.in_features,
                    out_features: lin.out_features,
                },
            );
        }
        Ok(LoraWeights {
            r: self.rank,
            modules,
        })
    }
}

/// An adapter attached to a model: its matrices, scaling and dropout.
pub struct Lora<B: Backend> {
    pub params: LoraSet<B>,
    /// `s = α/r` (or `α/√r`).
    pub scale: f32,
    /// PEFT's `lora_dropout`, applied to the adapter input during training only.
    pub dropout: f32,
}

impl<B: Backend> Lora<B> {
    /// Uploads an adapter after checking it against the model.
    pub fn new(b: &B, cfg: &LoraConfig, w: &LoraWeights, model: &ModelConfig) -> Result<Self> {
        cfg.validate_for(model)?;
        Ok(Lora {
            params: LoraSet::upload(b, w, model.num_hidden_layers)?,
            scale: cfg.scaling(),
            dropout: cfg.lora_dropout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::HostLinear;

    /// Two modules of a 2-layer model, rank 2, in 4 → out 3.
    fn set(b: &CpuBackend) -> LoraSet<CpuBackend> {
        let pair = |v: f32| LoraPair {
            a: vec![v; 2 * 4],
            b: vec![v; 3 * 2],
            in_features: 4,
            out_features: 3,
        };
        let modules = [
            (LoraModule::layer(1, LoraTarget::VProj), pair(0.5)),
            (LoraModule::lm_head(), pair(-1.0)),
        ];
        let w = LoraWeights {
            r: 2,
            modules: modules.into_iter().collect(),
        };
        LoraSet::upload(b, &w, 2).unwrap()
    }

    /// Stands in for a device's copies (the CPU makes none).
    fn fake_copies(b: &CpuBackend, set: &mut LoraSet<CpuBackend>) {
        let dense = || HostLinear::Dense {
            rows: 1,
            cols: 1,
            data: vec![0.0],
        };
        let all = set.layers.iter_mut().flatten().flatten();
        for lin in all.chain(set.lm_head.as_mut()) {
            lin.frozen = Some((b.linear(dense()).unwrap(), b.linear(dense()).unwrap()));
        }
    }

    fn copies(set: &LoraSet<CpuBackend>) -> usize {
        set.modules()
            .iter()
            .filter(|(_, l)| l.frozen.is_some())
            .count()
    }

    /// The CPU backend is the spec: freezing makes no copies, the f32 matrices stay what
    /// `matmul_lora` reads.
    #[test]
    fn cpu_freeze_makes_no_copies() {
        let b = CpuBackend::new();
        let mut s = set(&b);
        s.freeze(&b).unwrap();
        assert_eq!(copies(&s), 0);
    }

    /// Mutable access (the optimizer step's `modules_mut`, or `get_mut`) drops the inference
    /// copies: a copy never outlives a change of its f32 matrices.
    #[test]
    fn mutable_access_drops_inference_copies() {
        let b = CpuBackend::new();
        let mut s = set(&b);
        fake_copies(&b, &mut s);
        assert_eq!(copies(&s), 2);
        assert_eq!(s.modules_mut().len(), 2);
        assert_eq!(copies(&s), 0);

        fake_copies(&b, &mut s);
        assert!(s.get_mut(Some(1), LoraTarget::VProj).is_some());
        assert!(s.get(Some(1), LoraTarget::VProj).unwrap().frozen.is_none());
        assert!(s.get(None, LoraTarget::LmHead).unwrap().frozen.is_some());
        assert!(s.get_mut(Some(0), LoraTarget::VProj).is_none());
        assert_eq!(copies(&s), 1);
    }
}
