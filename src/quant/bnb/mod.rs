//! bitsandbytes 4-bit (NF4) checkpoints in the exact layout transformers + bitsandbytes write.
//!
//! # Layout (transformers 5.23, bitsandbytes 0.50.2, `save_pretrained` of a model loaded with
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)`)
//!
//! Every decoder linear projection (`model.layers.*.self_attn.{q,k,v,o}_proj`,
//! `model.layers.*.mlp.{gate,up,down}_proj`) is a `Linear4bit`; for such a weight `W` named
//! `<m>.weight` of shape `[out, in]` with `n = out * in` elements, blocksize `B`:
//!
//! | key                                          | dtype | shape              | content |
//! |----------------------------------------------|-------|--------------------|---------|
//! | `<m>.weight`                                 | U8    | `[ceil(n/2), 1]`   | packed codes, element `2i` in the high nibble |
//! | `<m>.weight.absmax`                          | F32 / U8 (double quant) | `[ceil(n/B)]` | per-block absmax, or its 8-bit codes |
//! | `<m>.weight.quant_map`                       | F32   | `[16]`             | the NF4 code |
//! | `<m>.weight.nested_absmax` (double quant)    | F32   | `[ceil(n/B/256)]`  | absmax of the absmax blocks |
//! | `<m>.weight.nested_quant_map` (double quant) | F32   | `[256]`            | bnb's signed dynamic 8-bit map |
//! | `<m>.weight.quant_state.bitsandbytes__nf4`   | U8    | `[len]`            | UTF-8 JSON, below |
//!
//! The quant_state JSON is Python's `json.dumps` of (in this key order)
//! `{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 172],
//! "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.524174690246582}`
//! (the `nested_*` keys only with double quant; `dtype` is the weight's dtype before quantization;
//! `nested_offset` is the f32 offset printed as a Python float). Everything else
//! (`embed_tokens`, norms, `lm_head`, which transformers never quantizes) is stored as loaded.
//! The file's header is `{"__metadata__":{"format":"pt"}, ...}` with tensors laid out by dtype
//! (widest first, safetensors' order) then name, the header padded with spaces to 8 bytes.
//!
//! `config.json` gains
//! ```json
//! "quantization_config": {
//!   "_load_in_4bit": true, "_load_in_8bit": false, "bnb_4bit_compute_dtype": "float32",
//!   "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
//!   "bnb_4bit_use_double_quant": true, "llm_int8_enable_fp32_cpu_offload": false,
//!   "llm_int8_has_fp16_weight": false, "llm_int8_skip_modules": null,
//!   "llm_int8_threshold": 6.0, "load_in_4bit": true, "load_in_8bit": false,
//!   "quant_method": "bitsandbytes"
//! }
//! ```
//!
//! [`quantize_checkpoint`] writes this layout byte for byte (checked against transformers' own
//! save in `tests/bnb.rs`); [`load_prequantized`] reads it back into an [`Nf4Tensor`](crate::quant::Nf4Tensor), validating
//! every part.

mod read;
mod write;

pub use read::load_prequantized;
pub use write::{
    bnb_entries, python_float_repr, quant_state_json, quantize_checkpoint,
    quantize_checkpoint_with, QuantizeOptions, QuantizeReport,
};

use crate::error::{Error, Result};
use crate::weights::{Checkpoint, DType};
use serde_json::{json, Value};
use std::path::Path;

/// Suffix of the quant_state entry of an NF4 weight (`<m>.weight.` + this).
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";
/// Suffix of the quant_state entry of an FP4 weight, which we recognise only to refuse it.
pub const QUANT_STATE_FP4: &str = "quant_state.bitsandbytes__fp4";

/// Files copied verbatim from the source folder, when present.
pub use crate::weights::write::COPIED_FILES;

/// Largest shard [`quantize_checkpoint`] writes (transformers 5's `max_shard_size="50GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 50_000_000_000;

/// The `quantization_config` of a bitsandbytes 4-bit checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BnbConfig {
    /// Always `"nf4"` (anything else is refused by [`parse_quantization_config`]).
    pub quant_type: String,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype` without a `torch.` prefix: `float32`, `float16` or `bfloat16`.
    pub compute_dtype: String,
    /// `bnb_4bit_quant_storage`: always `"uint8"` (the only storage we read).
    pub quant_storage: String,
    /// `llm_int8_skip_modules` (module names kept unquantized; empty when `null`).
    pub skip_modules: Vec<String>,
}

/// Parses the `quantization_config` of a `config.json` (`path` is only for messages). `None` when
/// the config has none (or `null`). Refuses, with a message naming the file: a `quant_method`
/// other than `bitsandbytes`, 8-bit (`load_in_8bit`), FP4 (`bnb_4bit_quant_type: "fp4"`, also
/// bitsandbytes' default when the key is absent), a storage dtype other than `uint8`, and a
/// compute dtype that is not a float type.
pub fn parse_quantization_config(config_json: &Value, path: &Path) -> Result<Option<BnbConfig>> {
    let qc = match config_json.get("quantization_config") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(Error::bad_file(
                path,
                format!("quantization_config must be an object, found {other}"),
            ))
        }
    };
    let qc = Qc { qc, path };
    qc.check_bnb_4bit()?;
    let quant_type = qc.nf4_quant_type()?;
    qc.check_uint8_storage()?;
    let compute_dtype = qc.compute_dtype()?;
    let skip_modules = qc.skip_modules()?;
    Ok(Some(BnbConfig {
        quant_type,
        double_quant: qc
            .get_bool(&["bnb_4bit_use_double_quant"])?
            .unwrap_or(false),
        compute_dtype: compute_dtype.to_string(),
        quant_storage: "uint8".into(),
        skip_modules,
    }))
}

/// A `quantization_config` object and the file it came from (for messages).
struct Qc<'a> {
    qc: &'a serde_json::Map<String, Value>,
    path: &'a Path,
}

impl Qc<'_> {
    /// A malformed-file error naming the file.
    fn bad(&self, msg: String) -> Error {
        Error::bad_file(self.path, msg)
    }

    /// An unsupported-checkpoint error naming the file.
    fn unsupported(&self, msg: String) -> Error {
        Error::Unsupported(format!("{}: {msg}", self.path.display()))
    }

    /// The string at `key`; `None` when absent or null.
    fn get_str(&self, key: &str) -> Result<Option<String>> {
        match self.qc.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.bad(format!(
                "quantization_config.{key} must be a string, found {v}"
            ))),
        }
    }

    /// The boolean at the first of `keys` present and not null; `None` when there is none.
    fn get_bool(&self, keys: &[&str]) -> Result<Option<bool>> {
        for key in keys {
            match self.qc.get(*key) {
                None | Some(Value::Null) => continue,
                Some(Value::Bool(b)) => return Ok(Some(*b)),
                Some(v) => {
                    return Err(self.bad(format!(
                        "quantization_config.{key} must be true or false, found {v}"
                    )))
                }
            }
        }
        Ok(None)
    }

    /// `Ok` when the config is bitsandbytes with `load_in_4bit` (and not `load_in_8bit`).
    fn check_bnb_4bit(&self) -> Result<()> {
        let method = self.get_str("quant_method")?;
        match method.as_deref() {
            Some("bitsandbytes") => {}
            None if self.qc.contains_key("load_in_4bit") || self.qc.contains_key("_load_in_4bit") => {}
            Some(m) => {
                return Err(self.unsupported(format!(
                    "quantization_config.quant_method is {m:?}; only bitsandbytes 4-bit (nf4) checkpoints are supported"
                )))
            }
            None => {
                return Err(self.unsupported(
                    "quantization_config has no quant_method; only bitsandbytes 4-bit (nf4) checkpoints are supported".into(),
                ))
            }
        }
        if self.get_bool(&["load_in_8bit", "_load_in_8bit"])? == Some(true) {
            return Err(self.unsupported(
                "bitsandbytes 8-bit (load_in_8bit) checkpoints are not supported; only 4-bit nf4"
                    .into(),
            ));
        }
        if self.get_bool(&["load_in_4bit", "_load_in_4bit"])? != Some(true) {
            return Err(self.unsupported(
                "quantization_config is bitsandbytes but not load_in_4bit; only 4-bit nf4 is supported"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `bnb_4bit_quant_type`, which must be `"nf4"`.
    fn nf4_quant_type(&self) -> Result<String> {
        // BitsAndBytesConfig's default quant type is fp4.
        let quant_type = self
            .get_str("bnb_4bit_quant_type")?
            .unwrap_or_else(|| "fp4".into());
        match quant_type.as_str() {
            "nf4" => {}
            "fp4" => {
                return Err(self.unsupported(
                    "bnb_4bit_quant_type is \"fp4\": fp4 is not supported; only nf4".into(),
                ))
            }
            other => {
                return Err(self.unsupported(format!(
                    "bnb_4bit_quant_type {other:?} is not supported; only nf4"
                )))
            }
        }
        Ok(quant_type)
    }

    /// `Ok` when `bnb_4bit_quant_storage` is `uint8` (or absent).
    fn check_uint8_storage(&self) -> Result<()> {
        let quant_storage = self
            .get_str("bnb_4bit_quant_storage")?
            .unwrap_or_else(|| "uint8".into());
        if quant_storage
            .strip_prefix("torch.")
            .unwrap_or(&quant_storage)
            != "uint8"
        {
            return Err(self.unsupported(format!(
                "bnb_4bit_quant_storage {quant_storage:?} is not supported; only uint8"
            )));
        }
        Ok(())
    }

    /// `bnb_4bit_compute_dtype` as `float32`, `float16` or `bfloat16` (default `float32`).
    fn compute_dtype(&self) -> Result<&'static str> {
        let compute = self
            .get_str("bnb_4bit_compute_dtype")?
            .unwrap_or_else(|| "float32".into());
        let compute_dtype = match compute.strip_prefix("torch.").unwrap_or(&compute) {
            "float32" | "float" => "float32",
            "float16" | "half" => "float16",
            "bfloat16" => "bfloat16",
            other => {
                return Err(self.unsupported(format!(
                "bnb_4bit_compute_dtype {other:?} is not supported (float32, float16 or bfloat16)"
            )))
            }
        };
        Ok(compute_dtype)
    }

    /// `llm_int8_skip_modules` (empty when absent or null).
    fn skip_modules(&self) -> Result<Vec<String>> {
        let skip_modules = match self.qc.get("llm_int8_skip_modules") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        self.bad(format!(
                            "quantization_config.llm_int8_skip_modules must hold strings, found {v}"
                        ))
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => {
                return Err(self.bad(format!(
                    "quantization_config.llm_int8_skip_modules must be a list or null, found {v}"
                )))
            }
        };
        Ok(skip_modules)
    }
}

/// The `quantization_config` transformers writes for `BitsAndBytesConfig(load_in_4bit=True,
/// bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
/// bnb_4bit_compute_dtype=compute_dtype)`.
pub fn quantization_config_json(double_quant: bool, compute_dtype: &str) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// Whether `name` (`…_proj.weight`) is one of the decoder linear projections transformers
/// quantizes: `model.layers.<i>.self_attn.{q,k,v,o}_proj.weight` or
/// `model.layers.<i>.mlp.{gate,up,down}_proj.weight`.
pub fn is_quantized_linear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    matches!(
        rest,
        "self_attn.q_proj.weight"
            | "self_attn.k_proj.weight"
            | "self_attn.v_proj.weight"
            | "self_attn.o_proj.weight"
            | "mlp.gate_proj.weight"
            | "mlp.up_proj.weight"
            | "mlp.down_proj.weight"
    )
}

/// Whether the checkpoint stores `name` (e.g. `model.layers.0.self_attn.q_proj.weight`)
/// pre-quantized by bitsandbytes: it has a `quant_state` entry (nf4, or fp4 so that
/// [`load_prequantized`] can refuse it clearly), or is a U8 tensor with an `.absmax` beside it.
pub fn is_prequantized(ckpt: &Checkpoint, name: &str) -> bool {
    ckpt.contains(&format!("{name}.{QUANT_STATE_NF4}"))
        || ckpt.contains(&format!("{name}.{QUANT_STATE_FP4}"))
        || (ckpt.get(name).is_some_and(|t| t.dtype == DType::U8)
            && ckpt.contains(&format!("{name}.absmax")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr() {
        assert_eq!(python_float_repr(0.524_174_7), "0.524174690246582");
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(-2.5), "-2.5");
        assert_eq!(python_float_repr(1e-5), "9.999999747378752e-06");
        assert_eq!(python_float_repr(1e-4), "9.999999747378752e-05");
        assert_eq!(python_float_repr(1e-3), "0.0010000000474974513");
        assert_eq!(python_float_repr(123456.0), "123456.0");
        assert_eq!(python_float_repr(1e16), "1.0000000272564224e+16");
        assert_eq!(python_float_repr(3e-38), "3.000000085396614e-38");
        assert_eq!(python_float_repr(1.5e20), "1.500000030061316e+20");
        assert_eq!(python_float_repr(0.0), "0.0");
    }

    #[test]
    fn linear_names() {
        assert!(is_quantized_linear(
            "model.layers.0.self_attn.q_proj.weight"
        ));
        assert!(is_quantized_linear("model.layers.31.mlp.down_proj.weight"));
        assert!(!is_quantized_linear(
            "model.layers.0.input_layernorm.weight"
        ));
        assert!(!is_quantized_linear("lm_head.weight"));
        assert!(!is_quantized_linear("model.layers.x.mlp.up_proj.weight"));
        assert!(!is_quantized_linear("model.layers.0.mlp.up_proj.bias"));
    }
}
