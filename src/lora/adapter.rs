//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Layout and conventions follow Hugging Face PEFT (checked against peft 0.21.2, see
//! `scripts/fixtures_peft.py`):
//! - for a linear layer `W` `[out, in]`, LoRA adds `scaling · B · A · x` with `A` `[r, in]`,
//!   `B` `[out, r]`, `scaling = lora_alpha / r` (`lora_alpha / √r` with rsLoRA);
//! - tensors are named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`,
//!   `….mlp.down_proj.lora_B.weight`, and `base_model.model.lm_head.lora_A.weight`;
//! - a fresh adapter has `A` Kaiming-uniform (`a = √5`, so uniform(−1/√in, 1/√in)) and `B = 0`.
//!
//! Anything in a PEFT config that changes the math in a way we do not implement (DoRA,
//! `fan_in_fan_out`, per-layer ranks, bias training, layer subsets, …) is rejected with an error
//! naming the file and the field, never silently ignored.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the adapter configuration file in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Name of the adapter weights file in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A linear layer of a Llama decoder that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
    LmHead,
}

impl LoraTarget {
    /// Every target, in canonical order.
    pub const ALL: [LoraTarget; 8] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
        LoraTarget::LmHead,
    ];

    /// What PEFT's `all-linear` expands to on a `LlamaForCausalLM`: every linear layer except
    /// the output layer (`lm_head`), which PEFT excludes.
    pub const ALL_LINEAR: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    /// The module name as PEFT and transformers spell it (`q_proj`, …, `lm_head`).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
            LoraTarget::LmHead => "lm_head",
        }
    }

    /// The target a module name denotes.
    pub fn from_name(name: &str) -> Option<LoraTarget> {
        LoraTarget::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The parent module inside a decoder layer (`self_attn` or `mlp`); `None` for `lm_head`.
    pub fn parent(self) -> Option<&'static str> {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                Some("self_attn")
            }
            LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => Some("mlp"),
            LoraTarget::LmHead => None,
        }
    }

    /// `(out_features, in_features)` of the base linear layer.
    pub fn shape(self, cfg: &ModelConfig) -> (usize, usize) {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        match self {
            LoraTarget::QProj => (cfg.q_dim(), h),
            LoraTarget::KProj | LoraTarget::VProj => (cfg.kv_dim(), h),
            LoraTarget::OProj => (h, cfg.q_dim()),
            LoraTarget::GateProj | LoraTarget::UpProj => (f, h),
            LoraTarget::DownProj => (h, f),
            LoraTarget::LmHead => (cfg.vocab_size, h),
        }
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One adapted linear layer: a decoder projection of layer `layer`, or `lm_head` (`layer: None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoraModule {
    pub layer: Option<usize>,
    pub target: LoraTarget,
}

impl LoraModule {
    /// A projection of decoder layer `layer`.
    pub fn layer(layer: usize, target: LoraTarget) -> Self {
        debug_assert!(target != LoraTarget::LmHead);
        LoraModule {
            layer: Some(layer),
            target,
        }
    }

    /// The output layer.
    pub fn lm_head() -> Self {
        LoraModule {
            layer: None,
            target: LoraTarget::LmHead,
        }
    }

    /// The module's path in the transformers model, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn path(&self) -> String {
        match (self.layer, self.target.parent()) {
            (Some(i), Some(parent)) => format!("model.layers.{i}.{parent}.{}", self.target),
            _ => self.target.name().to_string(),
        }
    }
}

impl fmt::Display for LoraModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

/// The safetensors key PEFT uses for `lora_A` (`a = true`) or `lora_B` of a module.
pub fn peft_key(module: &LoraModule, a: bool) -> String {
    let ab = if a { "lora_A" } else { "lora_B" };
    format!("base_model.model.{}.{ab}.weight", module.path())
}

/// The parts of PEFT's `LoraConfig` that qlora implements.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// LoRA rank (`r`), ≥ 1.
    pub r: usize,
    pub lora_alpha: f32,
    /// Dropout probability on the LoRA input path (training only), in [0, 1).
    pub lora_dropout: f32,
    /// Targeted module names (`q_proj`, …, `lm_head`), canonical order, no duplicates.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub base_model_name_or_path: Option<String>,
    /// `None`: the targets are adapted in every decoder layer (the normal case). `Some(layers)`:
    /// the config listed full module paths (as PEFT writes for `all-linear`) covering exactly
    /// these layers; [`LoraConfig::validate_for`] accepts it only when that is every layer.
    pub target_layers: Option<Vec<usize>>,
}

/// Fields of PEFT's `LoraConfig` that must keep their neutral value (null, false, empty), with
/// what a non-neutral value would mean.
const MUST_BE_NEUTRAL: &[(&str, &str)] = &[
    (
        "fan_in_fan_out",
        "transposed (Conv1D-style) base weights are not supported",
    ),
    ("use_dora", "DoRA adapters are not supported"),
    (
        "layers_to_transform",
        "adapting a subset of layers is not supported",
    ),
    ("rank_pattern", "per-module ranks are not supported"),
    ("alpha_pattern", "per-module alphas are not supported"),
    (
        "modules_to_save",
        "fully trained extra modules are not supported",
    ),
    ("lora_bias", "trained LoRA biases are not supported"),
    ("layer_replication", "layer replication is not supported"),
    ("exclude_modules", "excluded modules are not supported"),
    (
        "target_parameters",
        "LoRA on parameters (not modules) is not supported",
    ),
    (
        "trainable_token_indices",
        "trainable token embeddings are not supported",
    ),
    ("use_qalora", "QA-LoRA is not supported"),
    (
        "alora_invocation_tokens",
        "activated LoRA (aLoRA) is not supported",
    ),
    ("use_bdlora", "BD-LoRA is not supported"),
    ("arrow_config", "Arrow routing is not supported"),
];

fn is_neutral(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

/// One entry of `target_modules`: a module name, optionally restricted to one layer.
fn parse_target_entry(s: &str) -> std::result::Result<(LoraTarget, Option<usize>), String> {
    let bad = || {
        format!(
            "field `target_modules`: entry {s:?} does not name a Llama linear layer (expected one of {}, or a path such as model.layers.0.self_attn.q_proj)",
            LoraTarget::ALL.map(|t| t.name()).join(", ")
        )
    };
    let mut parts: Vec<&str> = s.split('.').collect();
    let name = parts.pop().ok_or_else(bad)?;
    let target = LoraTarget::from_name(name).ok_or_else(bad)?;
    if target == LoraTarget::LmHead {
        return if parts.is_empty() {
            Ok((target, None))
        } else {
            Err(bad())
        };
    }
    // PEFT matches a list entry by suffix: `key == entry` or `key.endswith("." + entry)`.
    // Accept the suffixes of `model.layers.{i}.{parent}.{name}`.
    if let Some(p) = parts.last() {
        if Some(*p) != target.parent() {
            return Err(bad());
        }
        parts.pop();
    }
    let mut layer = None;
    if let Some(p) = parts.last() {
        layer = Some(p.parse::<usize>().map_err(|_| bad())?);
        parts.pop();
        match parts.pop() {
            Some("layers") => {}
            _ => return Err(bad()),
        }
        match parts.pop() {
            None | Some("model") => {}
            _ => return Err(bad()),
        }
        if !parts.is_empty() {
            return Err(bad());
        }
    }
    Ok((target, layer))
}

fn get_bool(obj: &Map<String, Value>, key: &str) -> std::result::Result<bool, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("field `{key}`: expected true or false, got {v}")),
    }
}

fn get_f32(obj: &Map<String, Value>, key: &str, default: f32) -> std::result::Result<f32, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| format!("field `{key}`: not a number")),
        Some(v) => Err(format!("field `{key}`: expected a number, got {v}")),
    }
}

impl LoraConfig {
    /// A config with PEFT's defaults for the rest (`lora_dropout` 0, no rsLoRA) for the given
    /// rank, alpha and targets (module names, or `["all-linear"]`).
    pub fn new(r: usize, lora_alpha: f32, targets: &[&str]) -> Result<Self> {
        let cfg = LoraConfig {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: expand_targets(targets)?,
            use_rslora: false,
            base_model_name_or_path: None,
            target_layers: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The factor on `B · A · x`: `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA. Computed
    /// in double precision as PEFT does (Python floats), then rounded to f32.
    pub fn scaling(&self) -> f32 {
        let (alpha, r) = (self.lora_alpha as f64, self.r as f64);
        let s = if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        };
        s as f32
    }

    /// The targets as [`LoraTarget`]s, canonical order.
    pub fn targets(&self) -> Vec<LoraTarget> {
        let mut t: Vec<LoraTarget> = self
            .target_modules
            .iter()
            .filter_map(|n| LoraTarget::from_name(n))
            .collect();
        t.sort();
        t.dedup();
        t
    }

    /// Checks the values on their own (rank, alpha, dropout, target names).
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::InvalidArg("LoRA rank r must be at least 1".into()));
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return Err(Error::InvalidArg(format!(
                "lora_alpha must be a positive number, got {}",
                self.lora_alpha
            )));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::InvalidArg(format!(
                "lora_dropout must be in [0, 1), got {}",
                self.lora_dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(Error::InvalidArg("target_modules is empty".into()));
        }
        for t in &self.target_modules {
            if LoraTarget::from_name(t).is_none() {
                return Err(Error::InvalidArg(format!(
                    "unknown LoRA target module `{t}` (expected one of {}, or all-linear)",
                    LoraTarget::ALL.map(|t| t.name()).join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Checks the config against the model it is meant for.
    pub fn validate_for(&self, model: &ModelConfig) -> Result<()> {
        self.validate()?;
        if let Some(layers) = &self.target_layers {
            let all: Vec<usize> = (0..model.num_hidden_layers).collect();
            if *layers != all {
                return Err(Error::Unsupported(format!(
                    "the adapter targets only decoder layers {layers:?} of {}; adapting a subset of layers is not supported",
                    model.num_hidden_layers
                )));
            }
        }
        Ok(())
    }

    /// Every adapted module for this model, in order (layer by layer, then `lm_head`).
    pub fn modules(&self, model: &ModelConfig) -> Vec<LoraModule> {
        let targets = self.targets();
        let mut out = Vec::new();
        for l in 0..model.num_hidden_layers {
            for &t in &targets {
                if t != LoraTarget::LmHead {
                    out.push(LoraModule::layer(l, t));
                }
            }
        }
        if targets.contains(&LoraTarget::LmHead) {
            out.push(LoraModule::lm_head());
        }
        out
    }

    /// Reads and validates `adapter_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| Error::bad_file(path, msg))
    }

    /// Parses PEFT's `adapter_config.json` text; the error is a message without the file name.
    /// Unknown fields are ignored.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| "expected a JSON object".to_string())?;
        match obj.get("peft_type") {
            Some(Value::String(s)) if s == "LORA" => {}
            Some(other) => {
                return Err(format!(
                    "field `peft_type`: {other} is not supported; only LoRA adapters (\"LORA\") are"
                ))
            }
            None => return Err("missing field `peft_type` (expected \"LORA\")".into()),
        }
        match obj.get("task_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "CAUSAL_LM" => {}
            Some(other) => {
                return Err(format!(
                    "field `task_type`: {other} is not supported; expected \"CAUSAL_LM\""
                ))
            }
        }
        match obj.get("bias") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(other) => {
                return Err(format!(
                    "field `bias`: {other} is not supported; only \"none\" (no trained biases) is"
                ))
            }
        }
        for (key, why) in MUST_BE_NEUTRAL {
            if let Some(val) = obj.get(*key) {
                if !is_neutral(val) {
                    return Err(format!("field `{key}` = {val}: {why}"));
                }
            }
        }
        let r = match obj.get("r") {
            None | Some(Value::Null) => 8, // PEFT's default
            Some(Value::Number(n)) => match n.as_u64() {
                Some(r) if r >= 1 => r as usize,
                _ => return Err(format!("field `r`: expected a positive integer, got {n}")),
            },
            Some(other) => {
                return Err(format!(
                    "field `r`: expected a positive integer, got {other}"
                ))
            }
        };
        let lora_alpha = get_f32(obj, "lora_alpha", 8.0)?;
        if !lora_alpha.is_finite() || lora_alpha <= 0.0 {
            return Err(format!(
                "field `lora_alpha`: must be positive, got {lora_alpha}"
            ));
        }
        let lora_dropout = get_f32(obj, "lora_dropout", 0.0)?;
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(format!(
                "field `lora_dropout`: must be in [0, 1), got {lora_dropout}"
            ));
        }
        let use_rslora = get_bool(obj, "use_rslora")?;
        let base_model_name_or_path = match obj.get("base_model_name_or_path") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };

        // target_modules: a list of names / module paths, the string "all-linear", or null
        // (PEFT then uses its default for Llama: q_proj, v_proj).
        let mut entries: Vec<(LoraTarget, Option<usize>)> = Vec::new();
        match obj.get("target_modules") {
            None | Some(Value::Null) => {
                entries.push((LoraTarget::QProj, None));
                entries.push((LoraTarget::VProj, None));
            }
            Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
                entries.extend(LoraTarget::ALL_LINEAR.map(|t| (t, None)));
            }
            Some(Value::String(s)) => {
                return Err(format!(
                    "field `target_modules`: the regular expression {s:?} is not supported; list the module names (or use \"all-linear\")"
                ))
            }
            Some(Value::Array(a)) => {
                for item in a {
                    let s = item.as_str().ok_or_else(|| {
                        format!("field `target_modules`: expected strings, got {item}")
                    })?;
                    entries.push(parse_target_entry(s)?);
                }
            }
            Some(other) => {
                return Err(format!(
                    "field `target_modules`: expected a list of module names, got {other}"
                ))
            }
        }
        if entries.is_empty() {
            return Err("field `target_modules`: empty list".into());
        }
        // Per target: None = every layer; Some(set) = only those layers.
        let mut per_target: BTreeMap<LoraTarget, Option<BTreeSet<usize>>> = BTreeMap::new();
        for (t, layer) in entries {
            let slot = per_target.entry(t).or_insert_with(|| Some(BTreeSet::new()));
            match (layer, slot.as_mut()) {
                (None, _) => *slot = None,
                (Some(l), Some(set)) => {
                    set.insert(l);
                }
                (Some(_), None) => {}
            }
        }
        let mut layer_sets: BTreeSet<Option<BTreeSet<usize>>> = BTreeSet::new();
        for (t, set) in &per_target {
            if *t != LoraTarget::LmHead {
                layer_sets.insert(set.clone());
            }
        }
        if layer_sets.len() > 1 {
            return Err(
                "field `target_modules`: different modules are adapted in different layers; this is not supported"
                    .into(),
            );
        }
        let target_layers = layer_sets
            .into_iter()
            .next()
            .flatten()
            .map(|s| s.into_iter().collect());
        let cfg = LoraConfig {
            r,
            lora_alpha,
            lora_dropout,
            target_modules: per_target.keys().map(|t| t.name().to_string()).collect(),
            use_rslora,
            base_model_name_or_path,
            target_layers,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// PEFT's `adapter_config.json` for this config: the fields PEFT has written since 0.10,
    /// with PEFT's defaults where qlora has no setting.
    pub fn to_json(&self) -> Value {
        let alpha = if self.lora_alpha.fract() == 0.0 && self.lora_alpha.abs() < 1e9 {
            json!(self.lora_alpha as i64)
        } else {
            json!(self.lora_alpha as f64)
        };
        // Shortest decimal of the f32 (0.05 rather than 0.05000000074505806).
        let dropout: f64 = format!("{}", self.lora_dropout).parse().unwrap_or(0.0);
        json!({
            "alpha_pattern": {},
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layer_replication": null,
            "layers_pattern": null,
            "layers_to_transform": null,
            "loftq_config": {},
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "revision": null,
            "target_modules": self.targets().iter().map(|t| t.name()).collect::<Vec<_>>(),
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": self.use_rslora,
        })
    }
}

/// Names → canonical target list; `all-linear` expands to the 7 decoder projections.
fn expand_targets(targets: &[&str]) -> Result<Vec<String>> {
    let mut set = BTreeSet::new();
    for &t in targets {
        if t.eq_ignore_ascii_case("all-linear") {
            set.extend(LoraTarget::ALL_LINEAR);
        } else {
            let target = LoraTarget::from_name(t).ok_or_else(|| {
                Error::InvalidArg(format!(
                    "unknown LoRA target module `{t}` (expected one of {}, or all-linear)",
                    LoraTarget::ALL.map(|t| t.name()).join(", ")
                ))
            })?;
            set.insert(target);
        }
    }
    Ok(set.into_iter().map(|t| t.name().to_string()).collect())
}

/// The `A` / `B` matrices of one adapted linear layer, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// `[r, in_features]`.
    pub a: Vec<f32>,
    /// `[out_features, r]`.
    pub b: Vec<f32>,
    pub in_features: usize,
    pub out_features: usize,
}

impl LoraPair {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.len().checked_div(self.in_features).unwrap_or(0)
    }

    /// Number of parameters (`r · (in + out)`).
    pub fn numel(&self) -> usize {
        self.a.len() + self.b.len()
    }
}

/// All LoRA matrices of an adapter, by module.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub r: usize,
    pub modules: BTreeMap<LoraModule, LoraPair>,
}

impl LoraWeights {
    /// Zero `A` and `B` for every module the config targets on this model.
    pub fn zeros(cfg: &LoraConfig, model: &ModelConfig) -> Result<Self> {
        cfg.validate_for(model)?;
        let modules = cfg
            .modules(model)
            .into_iter()
            .map(|m| {
                let (out_f, in_f) = m.target.shape(model);
                let pair = LoraPair {
                    a: vec![0.0; cfg.r * in_f],
                    b: vec![0.0; out_f * cfg.r],
                    in_features: in_f,
                    out_features: out_f,
                };
                (m, pair)
            })
            .collect();
        Ok(LoraWeights { r: cfg.r, modules })
    }

    /// A fresh adapter as PEFT initializes one (`init_lora_weights=True`): `B = 0` and `A`
    /// drawn as `nn.init.kaiming_uniform_(A, a=√5)`, i.e. uniform(−bound, bound) with
    /// bound = gain·√(3 / in) and gain = √(2 / (1 + a²)), which is 1/√in. Deterministic in
    /// `seed` (modules are filled in [`LoraConfig::modules`] order from one `StdRng`).
    pub fn init(cfg: &LoraConfig, model: &ModelConfig, seed: u64) -> Result<Self> {
        let mut w = Self::zeros(cfg, model)?;
        let mut rng = StdRng::seed_from_u64(seed);
        for pair in w.modules.values_mut() {
            let bound = kaiming_uniform_bound(pair.in_features);
            for x in pair.a.iter_mut() {
                *x = rng.random_range(-bound..bound);
            }
        }
        Ok(w)
    }

    /// The pair of a module, if adapted.
    pub fn get(&self, module: &LoraModule) -> Option<&LoraPair> {
        self.modules.get(module)
    }

    /// Mutable access to the pair of a module.
    pub fn get_mut(&mut self, module: &LoraModule) -> Option<&mut LoraPair> {
        self.modules.get_mut(module)
    }

    /// Total number of LoRA parameters.
    pub fn num_params(&self) -> usize {
        self.modules.values().map(LoraPair::numel).sum()
    }

    /// Reads `adapter_model.safetensors` (F32, F16 or BF16 tensors, widened to f32) and checks
    /// it against the adapter config and the model: every targeted module has `lora_A`
    /// `[r, in]` and `lora_B` `[out, r]`, and nothing else is in the file.
    pub fn load_file(path: &Path, cfg: &LoraConfig, model: &ModelConfig) -> Result<Self> {
        cfg.validate_for(model)?;
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
        let expected: BTreeSet<LoraModule> = cfg.modules(model).into_iter().collect();
        let targets = cfg.targets();
        let bad = |name: &str, msg: String| Error::BadTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            msg,
        };
        let mut a_map: HashMap<LoraModule, Vec<f32>> = HashMap::new();
        let mut b_map: HashMap<LoraModule, Vec<f32>> = HashMap::new();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        for name in &names {
            let (module, is_a) = parse_peft_key(name).map_err(|msg| bad(name, msg))?;
            if let Some(l) = module.layer {
                if l >= model.num_hidden_layers {
                    return Err(bad(
                        name,
                        format!(
                            "layer {l} does not exist: the model has {} layers (an adapter for another architecture?)",
                            model.num_hidden_layers
                        ),
                    ));
                }
            }
            if !targets.contains(&module.target) {
                return Err(bad(
                    name,
                    format!(
                        "`{}` is not in target_modules {:?} of {CONFIG_FILE}",
                        module.target, cfg.target_modules
                    ),
                ));
            }
            if !expected.contains(&module) {
                return Err(bad(
                    name,
                    "module is not targeted by the adapter config".into(),
                ));
            }
            let view = st.tensor(name).map_err(|e| bad(name, e.to_string()))?;
            let (out_f, in_f) = module.target.shape(model);
            let want = if is_a { [cfg.r, in_f] } else { [out_f, cfg.r] };
            if view.shape() != want {
                let what = if is_a {
                    format!("[r={}, in_features={in_f}]", cfg.r)
                } else {
                    format!("[out_features={out_f}, r={}]", cfg.r)
                };
                return Err(bad(
                    name,
                    format!(
                        "shape {:?}, expected {what} for {} of this model (an adapter for another architecture, or r ≠ {}?)",
                        view.shape(),
                        module.target,
                        cfg.r
                    ),
                ));
            }
            let data = widen(view.dtype(), view.data()).map_err(|msg| bad(name, msg))?;
            if let Some(i) = data.iter().position(|x| !x.is_finite()) {
                return Err(bad(
                    name,
                    format!("non-finite value {} at index {i}", data[i]),
                ));
            }
            if is_a {
                a_map.insert(module, data);
            } else {
                b_map.insert(module, data);
            }
        }
        let mut modules = BTreeMap::new();
        for m in expected {
            let missing = |a| Error::MissingTensor {
                path: path.to_path_buf(),
                name: peft_key(&m, a),
            };
            let a = a_map.remove(&m).ok_or_else(|| missing(true))?;
            let b = b_map.remove(&m).ok_or_else(|| missing(false))?;
            let (out_f, in_f) = m.target.shape(model);
            modules.insert(
                m,
                LoraPair {
                    a,
                    b,
                    in_features: in_f,
                    out_features: out_f,
                },
            );
        }
        Ok(LoraWeights { r: cfg.r, modules })
    }
}

/// `nn.init.kaiming_uniform_(w, a=√5)` bound for `fan_in` inputs: gain·√(3/fan_in) with
/// gain = √(2/(1+a²)) = √(1/3), i.e. 1/√fan_in (computed as torch does, in f64).
pub fn kaiming_uniform_bound(fan_in: usize) -> f32 {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    (3f64.sqrt() * std) as f32
}

/// `base_model.model.<path>.lora_{A,B}.weight` → (module, is_A).
fn parse_peft_key(name: &str) -> std::result::Result<(LoraModule, bool), String> {
    let unexpected = |why: &str| format!("unexpected tensor in a LoRA adapter: {why}");
    if name.contains("lora_embedding_A") || name.contains("lora_embedding_B") {
        return Err(unexpected("LoRA on embeddings is not supported"));
    }
    if name.contains("lora_magnitude_vector") {
        return Err(unexpected(
            "a DoRA magnitude vector (DoRA is not supported)",
        ));
    }
    let Some(rest) = name.strip_prefix("base_model.model.") else {
        return Err(unexpected(
            "expected keys starting with `base_model.model.` (PEFT's layout)",
        ));
    };
    let (path, is_a) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        (p, true)
    } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
        (p, false)
    } else if rest.ends_with(".lora_A.bias") || rest.ends_with(".lora_B.bias") {
        return Err(unexpected("a LoRA bias (lora_bias is not supported)"));
    } else {
        return Err(unexpected(
            "not a lora_A / lora_B weight (modules_to_save or full weights are not supported)",
        ));
    };
    let not_llama = || unexpected("not a LoRA-able linear layer of a Llama model");
    if path == "lm_head" {
        return Ok((LoraModule::lm_head(), is_a));
    }
    let parts: Vec<&str> = path.split('.').collect();
    match parts.as_slice() {
        ["model", "layers", i, parent, m] => {
            let layer = i.parse::<usize>().map_err(|_| not_llama())?;
            let target = LoraTarget::from_name(m).ok_or_else(not_llama)?;
            if target.parent() != Some(*parent) {
                return Err(not_llama());
            }
            Ok((LoraModule::layer(layer, target), is_a))
        }
        _ => Err(not_llama()),
    }
}

/// Row-major little-endian F32 / F16 / BF16 bytes → f32.
fn widen(dtype: safetensors::Dtype, data: &[u8]) -> std::result::Result<Vec<f32>, String> {
    use safetensors::Dtype as S;
    Ok(match dtype {
        S::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        S::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        S::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => return Err(format!("dtype {other:?} is not supported (F32, F16, BF16)")),
    })
}

fn narrow(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// Reads an adapter directory (`adapter_config.json` + `adapter_model.safetensors`) for `model`.
pub fn load_adapter(dir: &Path, model: &ModelConfig) -> Result<(LoraConfig, LoraWeights)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg = LoraConfig::from_file(&cfg_path)?;
    cfg.validate_for(model)
        .map_err(|e| Error::bad_file(&cfg_path, e.to_string()))?;
    let weights = LoraWeights::load_file(&dir.join(WEIGHTS_FILE), &cfg, model)?;
    Ok((cfg, weights))
}

/// A file in `dir` that is removed on drop unless [`TempFile::persist`] renamed it.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn write(dir: &Path, final_name: &str, bytes: &[u8]) -> Result<TempFile> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = dir.join(format!(".{final_name}.tmp-{}-{nanos}", std::process::id()));
        let tmp = TempFile { path, keep: false };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp.path)
            .map_err(|e| Error::io(&tmp.path, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp.path, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp.path, e))?;
        Ok(tmp)
    }

    fn persist(mut self, to: &Path) -> Result<()> {
        std::fs::rename(&self.path, to).map_err(|e| Error::io(to, e))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if needed),
/// with the weights stored as `dtype` (F32, BF16 or F16), so that PEFT's
/// `PeftModel.from_pretrained(base, dir)` loads them.
///
/// Atomic per file: both files are first written and synced as hidden temporary files in `dir`,
/// then renamed into place, config first and weights last, so `adapter_model.safetensors`
/// appears only once everything has been written; on any failure the temporary files are
/// removed. Refuses (an `AlreadyExists` I/O error naming the file) when `dir` already holds an
/// adapter (`adapter_model.safetensors` or `adapter_config.json`) unless `overwrite` is true.
pub fn save_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    weights: &LoraWeights,
    dtype: DType,
    overwrite: bool,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::InvalidArg(format!(
            "adapter dtype {dtype} is not supported (F32, BF16, F16)"
        )));
    }
    cfg.validate()?;
    if weights.r != cfg.r {
        return Err(Error::InvalidArg(format!(
            "the LoRA weights have rank {} but the config says r = {}",
            weights.r, cfg.r
        )));
    }
    let targets = cfg.targets();
    let mut st_dtype_shape = Vec::with_capacity(2 * weights.modules.len());
    for (m, pair) in &weights.modules {
        if !targets.contains(&m.target) {
            return Err(Error::InvalidArg(format!(
                "LoRA weights for {m}, which is not in target_modules {:?}",
                cfg.target_modules
            )));
        }
        if pair.a.len() != cfg.r * pair.in_features || pair.b.len() != pair.out_features * cfg.r {
            return Err(Error::InvalidArg(format!(
                "LoRA weights for {m}: A has {} values and B {}, expected {}·{} and {}·{}",
                pair.a.len(),
                pair.b.len(),
                cfg.r,
                pair.in_features,
                pair.out_features,
                cfg.r
            )));
        }
        for (which, vals) in [("lora_A", &pair.a), ("lora_B", &pair.b)] {
            if let Some(i) = vals.iter().position(|x| !x.is_finite()) {
                return Err(Error::InvalidArg(format!(
                    "LoRA weights for {m}: non-finite {which} value {} at index {i}; refusing to save",
                    vals[i]
                )));
            }
        }
        st_dtype_shape.push((
            peft_key(m, true),
            narrow(&pair.a, dtype),
            vec![cfg.r, pair.in_features],
        ));
        st_dtype_shape.push((
            peft_key(m, false),
            narrow(&pair.b, dtype),
            vec![pair.out_features, cfg.r],
        ));
    }
    if weights.modules.is_empty() {
        return Err(Error::InvalidArg("no LoRA weights to save".into()));
    }

    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let config_path = dir.join(CONFIG_FILE);
    if !overwrite {
        for p in [&weights_path, &config_path] {
            if p.exists() {
                return Err(Error::io(
                    p,
                    std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "an adapter already exists here; refusing to overwrite it",
                    ),
                ));
            }
        }
    }

    let st_dtype = match dtype {
        DType::BF16 => safetensors::Dtype::BF16,
        DType::F16 => safetensors::Dtype::F16,
        _ => safetensors::Dtype::F32,
    };
    let mut views = Vec::with_capacity(st_dtype_shape.len());
    for (name, bytes, shape) in &st_dtype_shape {
        let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
            .map_err(|e| Error::InvalidArg(format!("{name}: {e}")))?;
        views.push((name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let st_bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::InvalidArg(format!("serializing the adapter: {e}")))?;
    let mut cfg_text = serde_json::to_string_pretty(&cfg.to_json())
        .map_err(|e| Error::InvalidArg(format!("serializing the adapter config: {e}")))?;
    cfg_text.push('\n');

    let tmp_weights = TempFile::write(dir, WEIGHTS_FILE, &st_bytes)?;
    let tmp_config = TempFile::write(dir, CONFIG_FILE, cfg_text.as_bytes())?;
    tmp_config.persist(&config_path)?;
    tmp_weights.persist(&weights_path)?;
    // Make the renames durable; not all platforms can open a directory, so best effort.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Number of LoRA parameters the config adds to this model: Σ r·(in + out) over the adapted
/// modules.
pub fn trainable_params(cfg: &LoraConfig, model: &ModelConfig) -> usize {
    cfg.modules(model)
        .iter()
        .map(|m| {
            let (out_f, in_f) = m.target.shape(model);
            cfg.r * (in_f + out_f)
        })
        .sum()
}

/// Number of parameters of the base model (embeddings, projections, norms, untied `lm_head`).
pub fn base_params(model: &ModelConfig) -> usize {
    crate::weights::llama_tensor_names(model)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>())
        .sum()
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `"4,194,304 trainable of 6,742,609,920 total, 0.06%"`; `total` counts every parameter,
/// trainable included (as PEFT's `print_trainable_parameters`).
pub fn format_trainable(trainable: usize, total: usize) -> String {
    let pct = if total == 0 {
        0.0
    } else {
        100.0 * trainable as f64 / total as f64
    };
    format!(
        "{} trainable of {} total, {pct:.2}%",
        thousands(trainable),
        thousands(total)
    )
}

/// [`format_trainable`] for a LoRA config on a model (total = base + LoRA parameters).
pub fn trainable_report(cfg: &LoraConfig, model: &ModelConfig) -> String {
    let t = trainable_params(cfg, model);
    format_trainable(t, base_params(model) + t)
}
