//! Model configuration: Hugging Face `config.json` for `LlamaForCausalLM`, parsed and validated.
//!
//! Handles both the transformers 4.x layout (`rope_theta`, `rope_scaling`, `torch_dtype`) and the
//! 5.x layout (`rope_parameters`, `dtype`). Anything we cannot run faithfully is rejected with an
//! error naming the file and the field, rather than silently approximated.

use crate::error::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// How RoPE frequencies are adjusted for long context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// The most parameters a config may describe (10 T; the largest published models are about 2 T).
pub const MAX_PARAMS: f64 = 1e13;
/// The most decoder layers (the largest Llama has 126).
pub const MAX_LAYERS: usize = 10_000;
/// The largest hidden / intermediate / vocabulary size (16 M).
pub const MAX_WIDTH: usize = 1 << 24;
/// The most attention heads, KV heads, and the largest head_dim.
pub const MAX_HEADS: usize = 1 << 16;
/// The longest context (`max_position_embeddings`, 268 M; Llama 4 has 10 M).
pub const MAX_POSITIONS: usize = 1 << 28;

/// Bytes with a decimal unit, e.g. `13.5 GB`; scientific notation past exabytes.
fn fmt_bytes(b: f64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut x = b;
    for unit in UNITS {
        if x < 1000.0 {
            return format!("{x:.1} {unit}");
        }
        x /= 1000.0;
    }
    format!("{b:.2e} bytes")
}

/// The architecture hyper-parameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// All end-of-sequence ids (Llama 3 lists several).
    pub eos_token_ids: Vec<u32>,
    /// `torch_dtype` / `dtype` as written, e.g. `float16`; informational.
    pub torch_dtype: Option<String>,
}

#[derive(Deserialize)]
struct Raw {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

fn token_ids(v: &Option<Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| Error::bad_file(path, msg))
    }

    /// Parses a config from JSON text; the error is a message without the file name.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
        let archs = raw.architectures.clone().unwrap_or_default();
        let is_llama = archs.iter().any(|a| a == "LlamaForCausalLM")
            || (archs.is_empty() && raw.model_type.as_deref() == Some("llama"));
        if !is_llama {
            let what = if archs.is_empty() {
                format!(
                    "model_type {:?}",
                    raw.model_type.as_deref().unwrap_or("<missing>")
                )
            } else {
                format!("architectures {archs:?}")
            };
            return Err(format!(
                "unsupported architecture ({what}); qlora supports LlamaForCausalLM"
            ));
        }
        let req = |v: Option<usize>, name: &str| -> std::result::Result<usize, String> {
            match v {
                Some(0) => Err(format!("`{name}` must be positive")),
                Some(x) => Ok(x),
                None => Err(format!("missing required field `{name}`")),
            }
        };
        let hidden_size = req(raw.hidden_size, "hidden_size")?;
        let intermediate_size = req(raw.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = req(raw.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = req(raw.num_attention_heads, "num_attention_heads")?;
        let vocab_size = req(raw.vocab_size, "vocab_size")?;
        let num_key_value_heads = req(
            raw.num_key_value_heads.or(Some(num_attention_heads)),
            "num_key_value_heads",
        )?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => req(Some(d), "head_dim")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given"
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!("head_dim ({head_dim}) must be even for RoPE"));
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "unsupported hidden_act {act:?}; only \"silu\" (SwiGLU) is supported"
                ));
            }
        }
        if raw.attention_bias == Some(true) || raw.mlp_bias == Some(true) {
            return Err("attention_bias / mlp_bias = true is not supported".into());
        }
        // transformers 5 nests rope_theta and the scaling in `rope_parameters`.
        let rope_params = raw.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_theta = raw
            .rope_theta
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        let scaling_value = match (&raw.rope_scaling, rope_params) {
            (Some(v), _) if !v.is_null() => Some(v.clone()),
            (_, Some(p)) => Some(p.clone()),
            _ => None,
        };
        let rope_scaling = parse_rope_scaling(scaling_value.as_ref())?;
        let eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(eps > 0.0 && eps.is_finite()) {
            return Err(format!("rms_norm_eps must be positive, got {eps}"));
        }
        let cfg = ModelConfig {
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: eps as f32,
            rope_theta: rope_theta as f32,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            torch_dtype: raw.torch_dtype.or(raw.dtype),
        };
        cfg.check_sizes()?;
        Ok(cfg)
    }

    /// Parameters this config implies, in floating point (no overflow for any input): the
    /// embedding, per layer two norms, q/k/v/o and gate/up/down, the final norm, `lm_head` unless
    /// tied. Returns `(total, in decoder linear layers)`.
    pub fn param_count(&self) -> (f64, f64) {
        let (h, f, v) = (
            self.hidden_size as f64,
            self.intermediate_size as f64,
            self.vocab_size as f64,
        );
        let q = self.num_attention_heads as f64 * self.head_dim as f64;
        let kv = self.num_key_value_heads as f64 * self.head_dim as f64;
        let linear_per_layer = 2.0 * q * h + 2.0 * kv * h + 3.0 * f * h;
        let layers = self.num_hidden_layers as f64;
        let linear = layers * linear_per_layer;
        let head = if self.tie_word_embeddings { 0.0 } else { v * h };
        (v * h + linear + layers * 2.0 * h + h + head, linear)
    }

    /// The resource guard: refuses sizes no real model has, before anything is allocated from
    /// them, with the memory the config would need. Every later product of two dimensions
    /// (`heads × head_dim`, `vocab × hidden`, per-layer tensor lists) is then far from overflow.
    fn check_sizes(&self) -> std::result::Result<(), String> {
        let (params, linear) = self.param_count();
        let width = self
            .torch_dtype
            .as_deref()
            .and_then(crate::weights::DType::from_torch_dtype)
            .and_then(crate::weights::DType::size_in_bytes)
            .unwrap_or(2);
        // NF4: half a byte per linear weight plus an f32 absmax per block of 64; the rest 16-bit.
        let nf4 = linear * (0.5 + 4.0 / 64.0) + (params - linear) * 2.0;
        let needs = format!(
            "{params:.3e} parameters: {} as stored ({width}-byte weights), about {} with NF4 base weights",
            fmt_bytes(params * width as f64),
            fmt_bytes(nf4)
        );
        if params > MAX_PARAMS {
            return Err(format!(
                "the sizes describe {needs}; refusing a model over {MAX_PARAMS:.0e} parameters \
                 (hidden_size {}, intermediate_size {}, num_hidden_layers {}, vocab_size {})",
                self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
            ));
        }
        let limits = [
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("vocab_size", self.vocab_size, MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEADS),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ];
        for (name, value, limit) in limits {
            if value > limit {
                return Err(format!(
                    "`{name}` = {value} is beyond any Llama model (limit {limit}); the config describes {needs}"
                ));
            }
        }
        if let RopeScaling::Llama3 {
            original_max_position_embeddings: o,
            ..
        } = self.rope_scaling
        {
            if o > MAX_POSITIONS {
                return Err(format!(
                    "rope_scaling.original_max_position_embeddings = {o} is beyond any Llama model (limit {MAX_POSITIONS})"
                ));
            }
        }
        Ok(())
    }

    /// Query projection width: heads × head_dim.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Key/value projection width: kv heads × head_dim.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// RoPE inverse frequencies (head_dim / 2 values), computed in f32 exactly as transformers does
    /// (`1 / theta^(2i/d)`), then adjusted by the configured scaling.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

fn parse_rope_scaling(v: Option<&Value>) -> std::result::Result<RopeScaling, String> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> std::result::Result<f32, String> {
        let x = v
            .get(k)
            .and_then(Value::as_f64)
            .map(|x| x as f32)
            .ok_or_else(|| format!("rope_scaling of type {kind:?} needs a numeric `{k}`"))?;
        if !(x.is_finite() && x > 0.0) {
            return Err(format!(
                "rope_scaling `{k}` must be a positive number, got {x}"
            ));
        }
        Ok(x)
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => {
            let r = RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor,
                high_freq_factor,
                ..
            } = r
            {
                if high_freq_factor <= low_freq_factor {
                    return Err("rope_scaling: high_freq_factor must exceed low_freq_factor".into());
                }
            }
            Ok(r)
        }
        other => Err(format!(
            "unsupported rope_scaling type {other:?}; supported: default, linear, llama3"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama2_7b_config() {
        let c = ModelConfig::from_json_str(include_str!(
            "../tests/fixtures/llama-2-7b-chat-hf/config.json"
        ))
        .unwrap();
        assert_eq!(c.hidden_size, 4096);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.num_key_value_heads, 32);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn llama3_scaling_matches_reference_values() {
        let c = ModelConfig::from_json_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,
            "rope_theta":500000.0,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"}}"#,
        )
        .unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        // Highest frequency untouched, lowest divided by the factor.
        assert_eq!(f[0], 1.0);
        let base_last = 1.0 / 500000f32.powf(126.0 / 128.0);
        assert!((f[63] - base_last / 8.0).abs() <= 1e-12);
    }

    #[test]
    fn rejects_unknown_architecture_and_scaling() {
        let e = ModelConfig::from_json_str(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(e.contains("unsupported architecture"), "{e}");
        let e = ModelConfig::from_json_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"vocab_size":8,"rope_scaling":{"type":"yarn","factor":2.0}}"#,
        )
        .unwrap_err();
        assert!(e.contains("yarn"), "{e}");
    }
}
