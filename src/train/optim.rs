//! AdamW with 32-bit states and global gradient-norm clipping, numerically as PyTorch.
//!
//! [`AdamW::update`] follows `torch.optim.AdamW` (`_single_tensor_adam` with
//! `decoupled_weight_decay=True`, the path PyTorch takes on CPU) operation by operation: the
//! scalar coefficients are computed in double precision (Python floats) and rounded to f32 where
//! PyTorch's kernels do, the tensor arithmetic is f32. [`clip_grad_norm`] follows
//! `torch.nn.utils.clip_grad_norm_` (2-norm).
//!
//! The states (`exp_avg`, `exp_avg_sq`, step) are host `Vec<f32>`s keyed by parameter name in
//! [`AdamWState`], which serializes to a safetensors blob and back bit-exactly, for checkpoints.

use super::optim8::{blocks, Quant8};
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Where and how the optimizer keeps its states (`--optim`, names as transformers' `optim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimKind {
    /// 32-bit AdamW states in memory the driver pages to host RAM under pressure instead of
    /// failing (bitsandbytes' paged optimizers; CUDA managed memory). The default.
    #[default]
    PagedAdamW32bit,
    /// 32-bit AdamW states in plain device memory.
    AdamW,
    /// bitsandbytes' 8-bit AdamW (`bnb.optim.PagedAdamW8bit`): moments as 8-bit blockwise
    /// dynamically quantized codes (2.03 bytes per parameter instead of 8) in pageable memory,
    /// updated by bnb's rule (decay after the update; see [`crate::train::optim8`]). Tensors
    /// under 4096 values keep f32 moments, as bnb does.
    PagedAdamW8bit,
}

impl OptimKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimKind::PagedAdamW32bit => "paged_adamw_32bit",
            OptimKind::AdamW => "adamw",
            OptimKind::PagedAdamW8bit => "paged_adamw_8bit",
        }
    }

    /// Whether the states live in memory the driver may page to the host.
    pub fn paged(self) -> bool {
        matches!(self, OptimKind::PagedAdamW32bit | OptimKind::PagedAdamW8bit)
    }

    /// Bytes of optimizer state per trainable parameter (tensors of `n` values): 8 for the
    /// 32-bit optimizers; [`crate::train::optim8::state_nbytes`] for the 8-bit one (2.03125
    /// for tensors of at least 4096 values, 8 below).
    pub fn state_nbytes(self, n: usize) -> usize {
        match self {
            OptimKind::PagedAdamW8bit => super::optim8::state_nbytes(n),
            _ => 8 * n,
        }
    }
}

impl std::str::FromStr for OptimKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "paged_adamw_32bit" => Ok(OptimKind::PagedAdamW32bit),
            "adamw" | "adamw_torch" => Ok(OptimKind::AdamW),
            "paged_adamw_8bit" => Ok(OptimKind::PagedAdamW8bit),
            _ => Err(format!(
                "unknown optimizer {s:?}; use paged_adamw_32bit, paged_adamw_8bit or adamw"
            )),
        }
    }
}

/// AdamW hyper-parameters (`torch.optim.AdamW` names and meaning).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamW {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01.
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The state of one parameter tensor: first and second moments and the number of steps taken.
///
/// The moments are f32 (`m`, `v`) or, for `paged_adamw_8bit` tensors of at least 4096 values,
/// 8-bit blockwise codes (`q8`; `m` and `v` are then empty).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamParamState {
    pub step: u64,
    /// `exp_avg`.
    pub m: Vec<f32>,
    /// `exp_avg_sq`.
    pub v: Vec<f32>,
    /// 8-bit moments ([`crate::train::optim8`]), in place of `m` and `v`.
    pub q8: Option<Quant8>,
}

impl AdamParamState {
    /// Zero moments for a tensor of `n` elements, step 0 (PyTorch's lazy init).
    pub fn new(n: usize) -> Self {
        AdamParamState {
            step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
            q8: None,
        }
    }

    /// Values of the tensor.
    pub fn len(&self) -> usize {
        match &self.q8 {
            Some(q) => q.len(),
            None => self.m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Host bytes of the moments.
    pub fn nbytes(&self) -> usize {
        match &self.q8 {
            Some(q) => q.nbytes(),
            None => 4 * (self.m.len() + self.v.len()),
        }
    }
}

/// `torch.lerp(start, end, weight)` for a scalar weight as ATen's vectorized CPU kernel computes
/// it: `fma(w, end − start, start)` for |w| < 0.5, else `fma(w − 1, end − start, end)`.
#[inline]
fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(end - start, start)
    } else {
        (w - 1.0).mul_add(end - start, end)
    }
}

impl AdamW {
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps >= 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArg(format!(
                "invalid AdamW hyper-parameters {self:?} (need lr ≥ 0, betas in [0, 1), eps ≥ 0, weight_decay ≥ 0)"
            )))
        }
    }

    /// One AdamW step on one tensor with the configured `lr`.
    pub fn step(&self, param: &mut [f32], grad: &[f32], state: &mut AdamParamState) {
        self.update(self.lr, param, grad, state)
    }

    /// One AdamW step on one tensor with learning rate `lr` (e.g. from an
    /// [`LrSchedule`](crate::train::LrSchedule)), exactly as `torch.optim.AdamW`:
    ///
    /// ```text
    /// t += 1
    /// p *= 1 − lr·wd                                  (decoupled weight decay)
    /// m  = lerp(m, g, 1 − β1)                         (m + (1−β1)(g − m))
    /// v  = v·β2 + (1 − β2)·g·g
    /// p += −(lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
    /// ```
    ///
    /// Panics if the lengths of `param`, `grad` and the state differ.
    pub fn update(&self, lr: f64, param: &mut [f32], grad: &[f32], state: &mut AdamParamState) {
        assert_eq!(
            param.len(),
            grad.len(),
            "AdamW: param and grad lengths differ"
        );
        assert_eq!(
            param.len(),
            state.m.len(),
            "AdamW: param and state lengths differ"
        );
        assert_eq!(
            param.len(),
            state.v.len(),
            "AdamW: param and state lengths differ"
        );
        state.step += 1;
        let t = state.step as f64;
        if self.weight_decay != 0.0 {
            let decay = (1.0 - lr * self.weight_decay) as f32;
            for p in param.iter_mut() {
                *p *= decay;
            }
        }
        let w1 = (1.0 - self.beta1) as f32;
        let beta2 = self.beta2 as f32;
        let w2 = (1.0 - self.beta2) as f32;
        let bias_correction1 = 1.0 - self.beta1.powf(t);
        let bias_correction2 = 1.0 - self.beta2.powf(t);
        let step_size = lr / bias_correction1;
        let bc2_sqrt = bias_correction2.powf(0.5) as f32;
        let neg_step = (-step_size) as f32;
        let eps = self.eps as f32;
        for (((p, &g), m), v) in param
            .iter_mut()
            .zip(grad)
            .zip(state.m.iter_mut())
            .zip(state.v.iter_mut())
        {
            *m = lerp(*m, g, w1);
            *v = *v * beta2 + w2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p += neg_step * *m / denom;
        }
    }
}

/// AdamW states of a set of named parameter tensors (e.g. PEFT keys of the LoRA matrices).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdamWState {
    pub params: BTreeMap<String, AdamParamState>,
}

/// The format of files with f32 moments only (unchanged since the first release).
const STATE_FORMAT: &str = "qlora-adamw-v1";
/// The format of files holding 8-bit moments (`paged_adamw_8bit`); read alongside v1.
const STATE_FORMAT_Q8: &str = "qlora-adamw-v2";
/// The `quant` metadata of a v2 file: what its 8-bit tensors mean.
const QUANT_META: &str = "bnb-dynamic-blockwise-256: exp_avg codes of create_dynamic_map(signed=True), exp_avg_sq codes of create_dynamic_map(signed=False), value = map[code] * absmax[i / 256]";

impl AdamWState {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of `name`, created (zero, step 0) for `n` elements on first use. Panics if it
    /// exists with another length.
    pub fn entry(&mut self, name: &str, n: usize) -> &mut AdamParamState {
        let s = self
            .params
            .entry(name.to_string())
            .or_insert_with(|| AdamParamState::new(n));
        assert_eq!(s.len(), n, "AdamW state `{name}` has another length");
        s
    }

    /// Host bytes of the states (no padding): what a checkpoint of them costs.
    pub fn nbytes(&self) -> usize {
        self.params.values().map(AdamParamState::nbytes).sum()
    }

    /// Serializes to a safetensors blob, the step counts in the metadata (`steps`, a JSON
    /// object). Per parameter, f32 moments as `<name>.exp_avg` and `<name>.exp_avg_sq` (F32
    /// `[n]`); 8-bit ones as `<name>.exp_avg.codes` and `<name>.exp_avg_sq.codes` (U8 `[n]`) with
    /// `<name>.exp_avg.absmax` and `<name>.exp_avg_sq.absmax` (F32 `[⌈n/256⌉]`). A file without
    /// 8-bit tensors is format `qlora-adamw-v1` (byte-identical to earlier releases), one with
    /// them `qlora-adamw-v2` with a `quant` entry naming the maps. The same on every device.
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        let mut blobs: Vec<(String, safetensors::Dtype, Vec<u8>)> = Vec::new();
        let mut steps = serde_json::Map::new();
        let mut any_q8 = false;
        for (name, s) in &self.params {
            steps.insert(name.clone(), serde_json::Value::from(s.step));
            match &s.q8 {
                None => {
                    if s.m.len() != s.v.len() {
                        return Err(Error::InvalidArg(format!(
                            "AdamW state `{name}`: exp_avg and exp_avg_sq lengths differ"
                        )));
                    }
                    let f32 = safetensors::Dtype::F32;
                    blobs.push((format!("{name}.exp_avg"), f32, f32_bytes(&s.m)));
                    blobs.push((format!("{name}.exp_avg_sq"), f32, f32_bytes(&s.v)));
                }
                Some(q) => {
                    if !q.is_consistent() {
                        return Err(Error::InvalidArg(format!(
                            "AdamW state `{name}`: 8-bit codes and absmax lengths are inconsistent"
                        )));
                    }
                    any_q8 = true;
                    let (u8t, f32) = (safetensors::Dtype::U8, safetensors::Dtype::F32);
                    for (moment, codes, absmax) in [
                        ("exp_avg", &q.m_codes, &q.m_absmax),
                        ("exp_avg_sq", &q.v_codes, &q.v_absmax),
                    ] {
                        blobs.push((format!("{name}.{moment}.codes"), u8t, codes.clone()));
                        blobs.push((format!("{name}.{moment}.absmax"), f32, f32_bytes(absmax)));
                    }
                }
            }
        }
        let mut views = Vec::with_capacity(blobs.len());
        for (name, dtype, bytes) in &blobs {
            let n = 8 * bytes.len() / dtype.bitsize();
            let view = safetensors::tensor::TensorView::new(*dtype, vec![n], bytes)
                .map_err(|e| Error::InvalidArg(format!("{name}: {e}")))?;
            views.push((name.clone(), view));
        }
        let format = if any_q8 {
            STATE_FORMAT_Q8
        } else {
            STATE_FORMAT
        };
        let mut metadata = HashMap::from([
            ("format".to_string(), format.to_string()),
            (
                "steps".to_string(),
                serde_json::Value::Object(steps).to_string(),
            ),
        ]);
        if any_q8 {
            metadata.insert("quant".to_string(), QUANT_META.to_string());
        }
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::InvalidArg(format!("serializing AdamW state: {e}")))
    }

    /// Restores what [`AdamWState::state_bytes`] wrote (either format); `path` names the source
    /// in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::bad_file(path, msg);
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let format = md.get("format").map(String::as_str);
        if format != Some(STATE_FORMAT) && format != Some(STATE_FORMAT_Q8) {
            return Err(bad(format!(
                "not a qlora AdamW state (metadata format is neither {STATE_FORMAT:?} nor {STATE_FORMAT_Q8:?})"
            )));
        }
        let steps: serde_json::Map<String, serde_json::Value> = md
            .get("steps")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("metadata `steps` is missing or malformed".into()))?;
        let tensor = |key: &str, dtype: safetensors::Dtype| {
            let view = st.tensor(key).map_err(|_| Error::MissingTensor {
                path: path.to_path_buf(),
                name: key.to_string(),
            })?;
            if view.dtype() != dtype || view.shape().len() != 1 {
                return Err(Error::BadTensor {
                    path: path.to_path_buf(),
                    name: key.to_string(),
                    msg: format!("expected a 1-D {dtype:?} tensor"),
                });
            }
            Ok(view.data().to_vec())
        };
        let load_f32 = |key: &str| -> Result<Vec<f32>> {
            Ok(tensor(key, safetensors::Dtype::F32)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let mut params = BTreeMap::new();
        let mut tensors = 0;
        for (name, step) in steps {
            let step = step
                .as_u64()
                .ok_or_else(|| bad(format!("metadata `steps`: `{name}` is not an integer")))?;
            let state = if st.names().contains(&&format!("{name}.exp_avg.codes")[..]) {
                let q = Quant8 {
                    m_codes: tensor(&format!("{name}.exp_avg.codes"), safetensors::Dtype::U8)?,
                    m_absmax: load_f32(&format!("{name}.exp_avg.absmax"))?,
                    v_codes: tensor(&format!("{name}.exp_avg_sq.codes"), safetensors::Dtype::U8)?,
                    v_absmax: load_f32(&format!("{name}.exp_avg_sq.absmax"))?,
                };
                if !q.is_consistent() {
                    return Err(bad(format!(
                        "`{name}`: 8-bit codes of lengths {} and {} with {} and {} absmax (blocks of 256: {} expected)",
                        q.m_codes.len(),
                        q.v_codes.len(),
                        q.m_absmax.len(),
                        q.v_absmax.len(),
                        blocks(q.m_codes.len())
                    )));
                }
                tensors += 4;
                AdamParamState {
                    step,
                    m: Vec::new(),
                    v: Vec::new(),
                    q8: Some(q),
                }
            } else {
                let m = load_f32(&format!("{name}.exp_avg"))?;
                let v = load_f32(&format!("{name}.exp_avg_sq"))?;
                if m.len() != v.len() {
                    return Err(bad(format!(
                        "`{name}`: exp_avg and exp_avg_sq lengths differ"
                    )));
                }
                tensors += 2;
                AdamParamState {
                    step,
                    m,
                    v,
                    q8: None,
                }
            };
            params.insert(name, state);
        }
        if st.len() != tensors {
            return Err(bad("tensors without a step count in the metadata".into()));
        }
        Ok(AdamWState { params })
    }

    /// Writes [`AdamWState::state_bytes`] to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.state_bytes()?;
        std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
    }

    /// Reads a file written by [`AdamWState::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Scales all gradients together so their global 2-norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the total norm is the 2-norm of the
/// per-tensor 2-norms, the clip coefficient is `max_norm / (total + 1e-6)` clamped to 1, and
/// every gradient is multiplied by it. Returns the total norm before clipping.
///
/// As in PyTorch, a non-finite total norm is returned as is and the gradients become
/// non-finite (or zero); callers should check the returned norm and skip the step.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let total = grad_norm(grads.iter().map(|g| &**g));
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 || coef.is_nan() {
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= coef;
            }
        }
    }
    total
}

/// The global 2-norm of a set of tensors: the 2-norm of their 2-norms (f64 sums, each norm
/// rounded to f32 as PyTorch's per-tensor `vector_norm` results are).
pub fn grad_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f32 {
    let norms: Vec<f32> = grads
        .into_iter()
        .map(|g| {
            g.iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
                .sqrt() as f32
        })
        .collect();
    norms
        .iter()
        .map(|&n| (n as f64) * (n as f64))
        .sum::<f64>()
        .sqrt() as f32
}
