//! PEFT's `adapter_config.json`: which modules LoRA adapts, rank, alpha, dropout, rsLoRA, and the
//! PEFT key names of the adapted modules.
//!
//! Anything in a PEFT config that changes the math in a way we do not implement (DoRA,
//! `fan_in_fan_out`, per-layer ranks, bias training, layer subsets, …) is rejected with an error
//! naming the file and the field, never silently ignored.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

/// Name of the adapter configuration file in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Name of the adapter weights file in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The largest LoRA rank accepted (65,536; published adapters use 4 to 256). Keeps every
/// parameter count of an adapter far from overflow.
pub const MAX_RANK: usize = 1 << 16;

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

/// `Ok` when `peft_type`, `task_type`, `bias` and the must-be-neutral fields describe plain LoRA.
fn check_plain_lora(obj: &Map<String, Value>) -> std::result::Result<(), String> {
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
    Ok(())
}

/// The rank `r` (PEFT's default 8 when absent or null).
fn get_rank(obj: &Map<String, Value>) -> std::result::Result<usize, String> {
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
    Ok(r)
}

/// The (target, layer) entries of `target_modules` (layer None: every layer); never empty.
fn target_entries(
    obj: &Map<String, Value>,
) -> std::result::Result<Vec<(LoraTarget, Option<usize>)>, String> {
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
    Ok(entries)
}

/// The adapted module names and their common layers (None: all); refuses per-module layer sets.
fn target_plan(
    entries: Vec<(LoraTarget, Option<usize>)>,
) -> std::result::Result<(Vec<String>, Option<Vec<usize>>), String> {
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
    let target_modules = per_target.keys().map(|t| t.name().to_string()).collect();
    Ok((target_modules, target_layers))
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
        if self.r > MAX_RANK {
            return Err(Error::InvalidArg(format!(
                "LoRA rank r = {} is beyond any usable rank (limit {MAX_RANK})",
                self.r
            )));
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
        check_plain_lora(obj)?;
        let r = get_rank(obj)?;
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
        let (target_modules, target_layers) = target_plan(target_entries(obj)?)?;
        let cfg = LoraConfig {
            r,
            lora_alpha,
            lora_dropout,
            target_modules,
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
