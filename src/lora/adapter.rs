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
//! The configuration (`adapter_config.json`, module names, PEFT keys) is in `config.rs`.

use super::config::{peft_key, LoraConfig, LoraModule, LoraTarget, CONFIG_FILE, WEIGHTS_FILE};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

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

/// The two files of an adapter, serialized: `adapter_model.safetensors` and
/// `adapter_config.json`.
pub struct AdapterFiles {
    pub weights: Vec<u8>,
    pub config: Vec<u8>,
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if needed),
/// with the weights stored as `dtype` (F32, BF16 or F16), so that PEFT's
/// `PeftModel.from_pretrained(base, dir)` loads them. See [`write_adapter`] for how.
pub fn save_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    weights: &LoraWeights,
    dtype: DType,
    overwrite: bool,
) -> Result<()> {
    let files = adapter_files(cfg, weights, dtype)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_adapter(dir, &files, overwrite)
}

/// Writes an adapter's files into the existing folder `dir` through [`crate::durable`]. Atomic
/// per file: both files are first written and `fsync`ed as hidden temporary files in `dir`, then
/// renamed into place, config first and weights last, so `adapter_model.safetensors` appears
/// only once everything has been written, and the folder is synced; on any failure the
/// temporary files are removed and the files already there are untouched. Refuses (an
/// `AlreadyExists` I/O error naming the file) when `dir` already holds an adapter
/// (`adapter_model.safetensors` or `adapter_config.json`) unless `overwrite` is true.
pub fn write_adapter(dir: &Path, files: &AdapterFiles, overwrite: bool) -> Result<()> {
    use crate::durable;
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
    let (tmp_weights, tmp_config) = (
        durable::temp_path(&weights_path),
        durable::temp_path(&config_path),
    );
    let r = durable::write_file(&tmp_weights, &files.weights)
        .and_then(|_| durable::write_file(&tmp_config, &files.config))
        .and_then(|_| durable::rename(&tmp_config, &config_path))
        .and_then(|_| durable::rename(&tmp_weights, &weights_path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp_weights);
        let _ = std::fs::remove_file(&tmp_config);
    }
    r?;
    durable::sync_dir(dir)
}

/// Serializes an adapter with its weights stored as `dtype` (F32, BF16 or F16), after checking
/// that the weights match the config, are finite and are not empty.
pub fn adapter_files(
    cfg: &LoraConfig,
    weights: &LoraWeights,
    dtype: DType,
) -> Result<AdapterFiles> {
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

    Ok(AdapterFiles {
        weights: st_bytes,
        config: cfg_text.into_bytes(),
    })
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
