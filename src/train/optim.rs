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
}

impl OptimKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimKind::PagedAdamW32bit => "paged_adamw_32bit",
            OptimKind::AdamW => "adamw",
        }
    }
}

impl std::str::FromStr for OptimKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "paged_adamw_32bit" => Ok(OptimKind::PagedAdamW32bit),
            "adamw" | "adamw_torch" => Ok(OptimKind::AdamW),
            _ => Err(format!(
                "unknown optimizer {s:?}; use paged_adamw_32bit or adamw"
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
#[derive(Debug, Clone, PartialEq)]
pub struct AdamParamState {
    pub step: u64,
    /// `exp_avg`.
    pub m: Vec<f32>,
    /// `exp_avg_sq`.
    pub v: Vec<f32>,
}

impl AdamParamState {
    /// Zero moments for a tensor of `n` elements, step 0 (PyTorch's lazy init).
    pub fn new(n: usize) -> Self {
        AdamParamState {
            step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    pub fn len(&self) -> usize {
        self.m.len()
    }

    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
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

const STATE_FORMAT: &str = "qlora-adamw-v1";

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

    /// Host bytes of the states (f32 values, no padding): what a checkpoint of them costs.
    pub fn nbytes(&self) -> usize {
        self.params.values().map(|s| 8 * s.len()).sum()
    }

    /// Serializes to a safetensors blob: `<name>.exp_avg` and `<name>.exp_avg_sq` (F32) per
    /// parameter, the step counts in the metadata (`steps`, a JSON object).
    pub fn state_bytes(&self) -> Result<Vec<u8>> {
        let mut blobs = Vec::with_capacity(2 * self.params.len());
        let mut steps = serde_json::Map::new();
        for (name, s) in &self.params {
            if s.m.len() != s.v.len() {
                return Err(Error::InvalidArg(format!(
                    "AdamW state `{name}`: exp_avg and exp_avg_sq lengths differ"
                )));
            }
            steps.insert(name.clone(), serde_json::Value::from(s.step));
            blobs.push((format!("{name}.exp_avg"), f32_bytes(&s.m)));
            blobs.push((format!("{name}.exp_avg_sq"), f32_bytes(&s.v)));
        }
        let mut views = Vec::with_capacity(blobs.len());
        for (name, bytes) in &blobs {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![bytes.len() / 4],
                bytes,
            )
            .map_err(|e| Error::InvalidArg(format!("{name}: {e}")))?;
            views.push((name.clone(), view));
        }
        let metadata = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            (
                "steps".to_string(),
                serde_json::Value::Object(steps).to_string(),
            ),
        ]);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::InvalidArg(format!("serializing AdamW state: {e}")))
    }

    /// Restores what [`AdamWState::state_bytes`] wrote; `path` names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::bad_file(path, msg);
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let md = meta.metadata().clone().unwrap_or_default();
        if md.get("format").map(String::as_str) != Some(STATE_FORMAT) {
            return Err(bad(format!(
                "not a qlora AdamW state (metadata format is not {STATE_FORMAT:?})"
            )));
        }
        let steps: serde_json::Map<String, serde_json::Value> = md
            .get("steps")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("metadata `steps` is missing or malformed".into()))?;
        let mut params = BTreeMap::new();
        for (name, step) in steps {
            let step = step
                .as_u64()
                .ok_or_else(|| bad(format!("metadata `steps`: `{name}` is not an integer")))?;
            let load = |suffix: &str| -> Result<Vec<f32>> {
                let key = format!("{name}.{suffix}");
                let view = st.tensor(&key).map_err(|_| Error::MissingTensor {
                    path: path.to_path_buf(),
                    name: key.clone(),
                })?;
                if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 1 {
                    return Err(Error::BadTensor {
                        path: path.to_path_buf(),
                        name: key,
                        msg: "expected a 1-D F32 tensor".into(),
                    });
                }
                Ok(view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect())
            };
            let m = load("exp_avg")?;
            let v = load("exp_avg_sq")?;
            if m.len() != v.len() {
                return Err(bad(format!(
                    "`{name}`: exp_avg and exp_avg_sq lengths differ"
                )));
            }
            params.insert(name, AdamParamState { step, m, v });
        }
        if st.len() != 2 * params.len() {
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
