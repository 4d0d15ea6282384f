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
//! save in `tests/bnb.rs`); [`load_prequantized`] reads it back into an [`Nf4Tensor`], validating
//! every part.

use super::nf4::{check_blocksize, quantize_nf4, Absmax, Nf4Tensor, NF4_TABLE};
use crate::error::{Error, Result};
use crate::weights::{is_rotary_inv_freq, Checkpoint, DType, TensorInfo, INDEX_FILE, SINGLE_FILE};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Suffix of the quant_state entry of an NF4 weight (`<m>.weight.` + this).
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";
/// Suffix of the quant_state entry of an FP4 weight, which we recognise only to refuse it.
pub const QUANT_STATE_FP4: &str = "quant_state.bitsandbytes__fp4";

/// Files copied verbatim from the source folder by [`quantize_checkpoint`], when present.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

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
    let bad = |msg: String| Error::bad_file(path, msg);
    let unsupported = |msg: String| Error::Unsupported(format!("{}: {msg}", path.display()));
    let get_str = |key: &str| -> Result<Option<String>> {
        match qc.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(bad(format!(
                "quantization_config.{key} must be a string, found {v}"
            ))),
        }
    };
    let get_bool = |keys: &[&str]| -> Result<Option<bool>> {
        for key in keys {
            match qc.get(*key) {
                None | Some(Value::Null) => continue,
                Some(Value::Bool(b)) => return Ok(Some(*b)),
                Some(v) => {
                    return Err(bad(format!(
                        "quantization_config.{key} must be true or false, found {v}"
                    )))
                }
            }
        }
        Ok(None)
    };

    let method = get_str("quant_method")?;
    match method.as_deref() {
        Some("bitsandbytes") => {}
        None if qc.contains_key("load_in_4bit") || qc.contains_key("_load_in_4bit") => {}
        Some(m) => {
            return Err(unsupported(format!(
                "quantization_config.quant_method is {m:?}; only bitsandbytes 4-bit (nf4) checkpoints are supported"
            )))
        }
        None => {
            return Err(unsupported(
                "quantization_config has no quant_method; only bitsandbytes 4-bit (nf4) checkpoints are supported".into(),
            ))
        }
    }
    if get_bool(&["load_in_8bit", "_load_in_8bit"])? == Some(true) {
        return Err(unsupported(
            "bitsandbytes 8-bit (load_in_8bit) checkpoints are not supported; only 4-bit nf4"
                .into(),
        ));
    }
    if get_bool(&["load_in_4bit", "_load_in_4bit"])? != Some(true) {
        return Err(unsupported(
            "quantization_config is bitsandbytes but not load_in_4bit; only 4-bit nf4 is supported"
                .into(),
        ));
    }
    // BitsAndBytesConfig's default quant type is fp4.
    let quant_type = get_str("bnb_4bit_quant_type")?.unwrap_or_else(|| "fp4".into());
    match quant_type.as_str() {
        "nf4" => {}
        "fp4" => {
            return Err(unsupported(
                "bnb_4bit_quant_type is \"fp4\": fp4 is not supported; only nf4".into(),
            ))
        }
        other => {
            return Err(unsupported(format!(
                "bnb_4bit_quant_type {other:?} is not supported; only nf4"
            )))
        }
    }
    let quant_storage = get_str("bnb_4bit_quant_storage")?.unwrap_or_else(|| "uint8".into());
    if quant_storage
        .strip_prefix("torch.")
        .unwrap_or(&quant_storage)
        != "uint8"
    {
        return Err(unsupported(format!(
            "bnb_4bit_quant_storage {quant_storage:?} is not supported; only uint8"
        )));
    }
    let compute = get_str("bnb_4bit_compute_dtype")?.unwrap_or_else(|| "float32".into());
    let compute_dtype = match compute.strip_prefix("torch.").unwrap_or(&compute) {
        "float32" | "float" => "float32",
        "float16" | "half" => "float16",
        "bfloat16" => "bfloat16",
        other => {
            return Err(unsupported(format!(
                "bnb_4bit_compute_dtype {other:?} is not supported (float32, float16 or bfloat16)"
            )))
        }
    };
    let skip_modules = match qc.get("llm_int8_skip_modules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    bad(format!(
                        "quantization_config.llm_int8_skip_modules must hold strings, found {v}"
                    ))
                })
            })
            .collect::<Result<_>>()?,
        Some(v) => {
            return Err(bad(format!(
                "quantization_config.llm_int8_skip_modules must be a list or null, found {v}"
            )))
        }
    };
    Ok(Some(BnbConfig {
        quant_type,
        double_quant: get_bool(&["bnb_4bit_use_double_quant"])?.unwrap_or(false),
        compute_dtype: compute_dtype.to_string(),
        quant_storage: "uint8".into(),
        skip_modules,
    }))
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

/// The parsed quant_state JSON of one weight.
struct QuantState {
    blocksize: usize,
    shape: Vec<usize>,
    /// `(nested_blocksize, nested_offset)` with double quant.
    nested: Option<(usize, f32)>,
}

/// Reads a pre-quantized NF4 weight `name` of `expected_shape` (`[out, in]`) into an
/// [`Nf4Tensor`], validating every part: the quant_state JSON (quant_type nf4 — fp4 is refused
/// with [`Error::Unsupported`] —, blocksize, dtype, shape equal to `expected_shape`, the nested
/// fields present exactly when the nested tensors are), the packed codes (U8, `ceil(n/2)` bytes),
/// the absmax (`ceil(n/blocksize)` values: F32, or U8 codes with double quant), the quant_map
/// (exactly bitsandbytes' NF4 code), the nested absmax (`ceil(nblocks/nested_blocksize)` F32) and
/// nested quant_map (256 F32), and that no statistic is NaN or infinite. Errors are
/// [`Error::BadTensor`] naming the file and the offending tensor.
pub fn load_prequantized(
    ckpt: &Checkpoint,
    name: &str,
    expected_shape: &[usize],
) -> Result<Nf4Tensor> {
    let weight = ckpt.get(name).ok_or_else(|| Error::MissingTensor {
        path: ckpt.source().to_path_buf(),
        name: name.to_string(),
    })?;
    let bad = |info: &TensorInfo, msg: String| Error::BadTensor {
        path: info.file.clone(),
        name: info.name.clone(),
        msg,
    };
    let part =
        |suffix: &str| -> Result<(&TensorInfo, &[u8])> { ckpt.bytes(&format!("{name}.{suffix}")) };

    // quant_state
    let fp4 = format!("{name}.{QUANT_STATE_FP4}");
    if let Some(info) = ckpt.get(&fp4) {
        return Err(Error::Unsupported(format!(
            "{}: tensor `{name}` is bitsandbytes fp4 (`{fp4}`): fp4 is not supported; only nf4",
            info.file.display()
        )));
    }
    let qs_name = format!("{name}.{QUANT_STATE_NF4}");
    if !ckpt.contains(&qs_name) {
        return Err(bad(
            weight,
            format!(
                "no `{qs_name}` beside it: not a bitsandbytes nf4 weight (dtype {}, shape {:?})",
                weight.dtype, weight.shape
            ),
        ));
    }
    let (qs_info, qs_bytes) = ckpt.bytes(&qs_name)?;
    if qs_info.dtype != DType::U8 {
        return Err(bad(
            qs_info,
            format!("dtype {}, expected U8 (UTF-8 JSON bytes)", qs_info.dtype),
        ));
    }
    let qs = parse_quant_state(qs_bytes).map_err(|msg| bad(qs_info, msg))?;
    if qs.shape != expected_shape {
        return Err(bad(
            qs_info,
            format!(
                "quant_state shape {:?} does not match the expected shape {expected_shape:?} of `{name}`",
                qs.shape
            ),
        ));
    }
    let n: usize = expected_shape.iter().product();
    if n == 0 {
        return Err(bad(qs_info, format!("empty shape {expected_shape:?}")));
    }
    let nblocks = n.div_ceil(qs.blocksize);

    // packed codes
    let (w_info, w_bytes) = ckpt.bytes(name)?;
    if w_info.dtype != DType::U8 {
        return Err(bad(
            w_info,
            format!(
                "packed 4-bit weight has dtype {}; only uint8 storage (bnb_4bit_quant_storage=uint8) is supported",
                w_info.dtype
            ),
        ));
    }
    if w_bytes.len() != n.div_ceil(2) {
        return Err(bad(
            w_info,
            format!(
                "packed 4-bit weight has {} bytes (shape {:?}); shape {expected_shape:?} needs ceil({n}/2) = {}",
                w_bytes.len(),
                w_info.shape,
                n.div_ceil(2)
            ),
        ));
    }

    // quant_map
    let (qm_info, qm_bytes) = part("quant_map")?;
    let qm = read_f32(qm_info, qm_bytes, 16)?;
    if qm
        .iter()
        .zip(NF4_TABLE.iter())
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(bad(
            qm_info,
            format!("quant_map {qm:?} is not bitsandbytes' NF4 code {NF4_TABLE:?}"),
        ));
    }

    // absmax
    let (am_info, am_bytes) = part("absmax")?;
    let nested_present = ckpt.contains(&format!("{name}.nested_absmax"))
        || ckpt.contains(&format!("{name}.nested_quant_map"));
    let absmax = match qs.nested {
        None => {
            if nested_present {
                return Err(bad(
                    qs_info,
                    "quant_state has no nested_* fields but nested_absmax / nested_quant_map tensors are present".into(),
                ));
            }
            if am_info.dtype != DType::F32 {
                return Err(bad(
                    am_info,
                    format!(
                        "dtype {}, expected F32 (no double quant in quant_state)",
                        am_info.dtype
                    ),
                ));
            }
            let a = read_f32(am_info, am_bytes, nblocks).map_err(|e| {
                with_context(
                    e,
                    &format!(
                        "{nblocks} blocks of {} for shape {expected_shape:?}",
                        qs.blocksize
                    ),
                )
            })?;
            check_finite(am_info, &a)?;
            Absmax::F32(a)
        }
        Some((nested_blocksize, offset)) => {
            if am_info.dtype != DType::U8 {
                return Err(bad(
                    am_info,
                    format!(
                        "dtype {}, expected U8 (double quant: 8-bit codes of the absmax)",
                        am_info.dtype
                    ),
                ));
            }
            if am_bytes.len() != nblocks {
                return Err(bad(
                    am_info,
                    format!(
                        "expected {nblocks} absmax codes ({nblocks} blocks of {} for shape {expected_shape:?}), found {}",
                        qs.blocksize,
                        am_bytes.len()
                    ),
                ));
            }
            let (na_info, na_bytes) = part("nested_absmax")?;
            let nested_absmax = read_f32(na_info, na_bytes, nblocks.div_ceil(nested_blocksize))?;
            check_finite(na_info, &nested_absmax)?;
            let (nc_info, nc_bytes) = part("nested_quant_map")?;
            let nested_code = read_f32(nc_info, nc_bytes, 256)?;
            check_finite(nc_info, &nested_code)?;
            Absmax::Double {
                q: am_bytes.to_vec(),
                offset,
                nested_absmax,
                nested_code,
                nested_blocksize,
            }
        }
    };
    let t = Nf4Tensor {
        shape: expected_shape.to_vec(),
        blocksize: qs.blocksize,
        packed: w_bytes.to_vec(),
        absmax,
    };
    t.validate().map_err(|e| bad(w_info, e.to_string()))?;
    Ok(t)
}

fn with_context(e: Error, ctx: &str) -> Error {
    match e {
        Error::BadTensor { path, name, msg } => Error::BadTensor {
            path,
            name,
            msg: format!("{msg} ({ctx})"),
        },
        e => e,
    }
}

/// `len` little-endian f32 values of an F32 tensor (any 1-element-per-value shape).
fn read_f32(info: &TensorInfo, bytes: &[u8], len: usize) -> Result<Vec<f32>> {
    let bad = |msg: String| Error::BadTensor {
        path: info.file.clone(),
        name: info.name.clone(),
        msg,
    };
    if info.dtype != DType::F32 {
        return Err(bad(format!("dtype {}, expected F32", info.dtype)));
    }
    if bytes.len() != 4 * len {
        return Err(bad(format!(
            "expected {len} values, found {} (shape {:?})",
            bytes.len() / 4,
            info.shape
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn check_finite(info: &TensorInfo, v: &[f32]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::BadTensor {
            path: info.file.clone(),
            name: info.name.clone(),
            msg: format!("value {i} is {} (statistics must be finite)", v[i]),
        });
    }
    Ok(())
}

/// Parses a quant_state JSON blob; the error is the message (the caller names file and tensor).
fn parse_quant_state(bytes: &[u8]) -> std::result::Result<QuantState, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("quant_state is not UTF-8: {e}"))?;
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("quant_state is not JSON ({e}): {text}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("quant_state is not a JSON object: {text}"))?;
    let field = |k: &str| {
        obj.get(k)
            .ok_or_else(|| format!("quant_state has no `{k}`: {text}"))
    };
    let uint = |k: &str| -> std::result::Result<usize, String> {
        field(k)?
            .as_u64()
            .map(|u| u as usize)
            .ok_or_else(|| format!("quant_state `{k}` is not a non-negative integer: {text}"))
    };
    let quant_type = field("quant_type")?
        .as_str()
        .ok_or_else(|| format!("quant_state `quant_type` is not a string: {text}"))?;
    if quant_type != "nf4" {
        return Err(format!(
            "quant_state quant_type is {quant_type:?}; only nf4 is supported"
        ));
    }
    let blocksize = uint("blocksize")?;
    check_blocksize(blocksize).map_err(|e| format!("quant_state: {e}"))?;
    let dtype = field("dtype")?
        .as_str()
        .ok_or_else(|| format!("quant_state `dtype` is not a string: {text}"))?;
    if !matches!(dtype, "float32" | "float16" | "bfloat16") {
        return Err(format!(
            "quant_state dtype {dtype:?} is not float32, float16 or bfloat16"
        ));
    }
    let shape = field("shape")?
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().map(|u| u as usize))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| format!("quant_state `shape` is not a list of integers: {text}"))?;
    let nested_keys = ["nested_blocksize", "nested_dtype", "nested_offset"];
    let present = nested_keys.iter().filter(|k| obj.contains_key(**k)).count();
    let nested = match present {
        0 => None,
        3 => {
            let nb = uint("nested_blocksize")?;
            if nb == 0 {
                return Err("quant_state nested_blocksize is 0".into());
            }
            let nd = field("nested_dtype")?.as_str().unwrap_or("");
            if nd != "float32" {
                return Err(format!(
                    "quant_state nested_dtype is {:?}; only float32 is supported",
                    field("nested_dtype")?
                ));
            }
            let off = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| format!("quant_state `nested_offset` is not a number: {text}"))?;
            let off32 = off as f32;
            if !off32.is_finite() {
                return Err(format!(
                    "quant_state nested_offset {off} is not a finite f32"
                ));
            }
            Some((nb, off32))
        }
        _ => {
            return Err(format!(
                "quant_state has only some of {nested_keys:?}: {text}"
            ))
        }
    };
    Ok(QuantState {
        blocksize,
        shape,
        nested,
    })
}

/// Python's `repr(float(x))` of an f32 widened to f64: the shortest round-trip digits, fixed
/// notation for exponents -4..16, otherwise `1e-05` style.
pub fn python_float_repr(x: f32) -> String {
    let x = x as f64;
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` prints the shortest round-trip digits, e.g. "5.24174690246582e-1".
    let e = format!("{x:e}");
    let (mant, exp) = e.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let nd = digits.len() as i32;
        let s = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= nd {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - nd) as usize))
        } else {
            let (a, b) = digits.split_at((exp + 1) as usize);
            format!("{a}.{b}")
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() == 1 {
            digits.clone()
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let es = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// The quant_state JSON bitsandbytes writes (`json.dumps(QuantState.as_dict(packed=True)`'s
/// non-tensor part)), byte for byte.
pub fn quant_state_json(t: &Nf4Tensor, original_dtype: &str) -> String {
    let shape = t
        .shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{original_dtype}\", \"shape\": [{shape}]",
        t.blocksize
    );
    if let Absmax::Double {
        offset,
        nested_blocksize,
        ..
    } = &t.absmax
    {
        s.push_str(&format!(
            ", \"nested_blocksize\": {nested_blocksize}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            python_float_repr(*offset)
        ));
    }
    s.push('}');
    s
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One safetensors entry: name, dtype, shape, little-endian bytes.
pub type Entry = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// The safetensors entries transformers writes for one quantized weight `name` (`<m>.weight`):
/// the packed codes, absmax, quant_map, the nested tensors with double quant, and the quant_state
/// JSON. `original_dtype` is the weight's dtype before quantization (`float16`, `bfloat16`,
/// `float32`), recorded in the quant_state.
pub fn bnb_entries(name: &str, t: &Nf4Tensor, original_dtype: &str) -> Vec<Entry> {
    use safetensors::Dtype as D;
    let mut out = vec![(
        name.to_string(),
        D::U8,
        vec![t.packed.len(), 1],
        t.packed.clone(),
    )];
    match &t.absmax {
        Absmax::F32(a) => out.push((
            format!("{name}.absmax"),
            D::F32,
            vec![a.len()],
            f32_bytes(a),
        )),
        Absmax::Double {
            q,
            nested_absmax,
            nested_code,
            ..
        } => {
            out.push((format!("{name}.absmax"), D::U8, vec![q.len()], q.clone()));
            out.push((
                format!("{name}.nested_absmax"),
                D::F32,
                vec![nested_absmax.len()],
                f32_bytes(nested_absmax),
            ));
            out.push((
                format!("{name}.nested_quant_map"),
                D::F32,
                vec![nested_code.len()],
                f32_bytes(nested_code),
            ));
        }
    }
    out.push((
        format!("{name}.quant_map"),
        D::F32,
        vec![16],
        f32_bytes(&NF4_TABLE),
    ));
    let qs = quant_state_json(t, original_dtype).into_bytes();
    out.push((
        format!("{name}.{QUANT_STATE_NF4}"),
        D::U8,
        vec![qs.len()],
        qs,
    ));
    out
}

/// What [`quantize_checkpoint`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    /// Linear weights quantized to NF4.
    pub tensors_quantized: usize,
    /// Bytes of tensor data read from the source.
    pub bytes_in: u64,
    /// Bytes of the safetensors file(s) written (headers included).
    pub bytes_out: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Options of [`quantize_checkpoint_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizeOptions {
    /// NF4 block size (bitsandbytes / transformers use 64).
    pub blocksize: usize,
    /// Double quantization of the absmax (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    /// Replace a non-empty `out` folder.
    pub overwrite: bool,
    /// Largest shard; above it the output is sharded with an index, as transformers does.
    pub max_shard_bytes: u64,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            blocksize: 64,
            double_quant: true,
            overwrite: false,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
        }
    }
}

/// Writes a bitsandbytes NF4 checkpoint of the model folder `src` into `out`, in exactly the
/// layout transformers' `save_pretrained` of a 4-bit model writes (see the module docs). Each
/// decoder linear projection is quantized (see [`is_quantized_linear`]); every other tensor is
/// copied as stored (transformers keeps embeddings, norms and `lm_head` unquantized, in the dtype
/// they were loaded in, which is the stored one when the stored dtype is the config's);
/// `*.rotary_emb.inv_freq` buffers are dropped, as transformers does. `config.json` gets the
/// `quantization_config` transformers writes, with `bnb_4bit_compute_dtype` the source's
/// `dtype`/`torch_dtype` when it is a float type (else `float32`). Tokenizer and generation files
/// ([`COPIED_FILES`]) are copied.
///
/// Memory: the quantized tensors are kept until written (≈ the output size) plus one source tensor
/// in f32; the source is read from its memory map and each tensor's pages are released after
/// use. The file is written streaming: the header first (offsets follow from the shapes), then
/// each tensor. Atomic: everything goes to `<out>.tmp-<pid>`, renamed to `out` at the end; a
/// non-empty `out` is refused unless `overwrite`. `progress(done, total)` counts source tensors.
pub fn quantize_checkpoint(
    src: &Path,
    out: &Path,
    blocksize: usize,
    double_quant: bool,
    overwrite: bool,
    progress: impl FnMut(usize, usize),
) -> Result<QuantizeReport> {
    let opts = QuantizeOptions {
        blocksize,
        double_quant,
        overwrite,
        ..QuantizeOptions::default()
    };
    quantize_checkpoint_with(src, out, &opts, progress)
}

/// Where the bytes of an output tensor come from.
enum Data {
    Owned(Vec<u8>),
    /// Copied from the source checkpoint's memory map.
    Source(String),
}

struct OutTensor {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    len: usize,
    data: Data,
}

/// [`quantize_checkpoint`] with all options, including the shard size.
pub fn quantize_checkpoint_with(
    src: &Path,
    out: &Path,
    opts: &QuantizeOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizeReport> {
    let start = Instant::now();
    check_blocksize(opts.blocksize)?;
    if opts.max_shard_bytes == 0 {
        return Err(Error::InvalidArg("max_shard_bytes must be positive".into()));
    }

    // Source config.
    let config_path = src.join("config.json");
    if !config_path.is_file() {
        return Err(Error::NotFound(format!(
            "{}: no config.json in the source model folder {}",
            config_path.display(),
            src.display()
        )));
    }
    let text = fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let mut config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&config_path, format!("malformed JSON: {e}")))?;
    if !config.is_object() {
        return Err(Error::bad_file(
            &config_path,
            "config.json is not a JSON object",
        ));
    }
    if !matches!(config.get("quantization_config"), None | Some(Value::Null)) {
        return Err(Error::Unsupported(format!(
            "{}: the source is already quantized (it has a quantization_config); quantize an unquantized (f32/f16/bf16) checkpoint",
            config_path.display()
        )));
    }

    // Output folder.
    if out.exists() {
        if !out.is_dir() {
            return Err(Error::InvalidArg(format!(
                "output {} exists and is not a folder",
                out.display()
            )));
        }
        let non_empty = fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some();
        if non_empty && !opts.overwrite {
            return Err(Error::InvalidArg(format!(
                "output folder {} exists and is not empty; pass --overwrite to replace it",
                out.display()
            )));
        }
    }

    let ckpt = Checkpoint::open(src)?;
    let compute_dtype = ["dtype", "torch_dtype"]
        .iter()
        .filter_map(|k| config.get(*k).and_then(Value::as_str))
        .find_map(|s| match s.strip_prefix("torch.").unwrap_or(s) {
            d @ ("float32" | "float16" | "bfloat16") => Some(d.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "float32".into());

    // Quantize (in name order) and plan the output, grouped per source tensor.
    let infos: Vec<TensorInfo> = ckpt
        .tensors()
        .filter(|t| !is_rotary_inv_freq(&t.name))
        .cloned()
        .collect();
    let total = infos.len();
    let mut groups: Vec<Vec<OutTensor>> = Vec::with_capacity(total);
    let mut bytes_in = 0u64;
    let mut quantized = 0usize;
    for (i, info) in infos.iter().enumerate() {
        let nbytes = info
            .dtype
            .size_in_bytes()
            .map(|s| s * info.numel())
            .unwrap_or(0);
        bytes_in += nbytes as u64;
        if is_quantized_linear(&info.name) {
            let original = match info.dtype {
                DType::F32 => "float32",
                DType::F16 => "float16",
                DType::BF16 => "bfloat16",
                d => {
                    return Err(Error::BadTensor {
                        path: info.file.clone(),
                        name: info.name.clone(),
                        msg: format!(
                            "dtype {d}: only F32, F16 or BF16 linear weights can be quantized"
                        ),
                    })
                }
            };
            if info.shape.len() != 2 {
                return Err(Error::BadTensor {
                    path: info.file.clone(),
                    name: info.name.clone(),
                    msg: format!("shape {:?}: a linear weight must be 2-D", info.shape),
                });
            }
            let w = ckpt.load_f32(&info.name, &info.shape)?;
            ckpt.release(&info.name);
            let t =
                quantize_nf4(&w, &info.shape, opts.blocksize, opts.double_quant).map_err(|e| {
                    Error::BadTensor {
                        path: info.file.clone(),
                        name: info.name.clone(),
                        msg: e.to_string(),
                    }
                })?;
            drop(w);
            groups.push(
                bnb_entries(&info.name, &t, original)
                    .into_iter()
                    .map(|(name, dtype, shape, bytes)| OutTensor {
                        name,
                        dtype,
                        shape,
                        len: bytes.len(),
                        data: Data::Owned(bytes),
                    })
                    .collect(),
            );
            quantized += 1;
        } else {
            let dtype = to_safetensors_dtype(info.dtype).ok_or_else(|| Error::BadTensor {
                path: info.file.clone(),
                name: info.name.clone(),
                msg: "dtype not supported for copying".into(),
            })?;
            groups.push(vec![OutTensor {
                name: info.name.clone(),
                dtype,
                shape: info.shape.clone(),
                len: nbytes,
                data: Data::Source(info.name.clone()),
            }]);
        }
        progress(i + 1, total);
    }

    // Shards: groups in name order, a new shard when the next group would overflow.
    let mut shards: Vec<Vec<OutTensor>> = vec![Vec::new()];
    let mut cur = 0usize;
    for g in groups {
        let size: usize = g.iter().map(|t| t.len).sum();
        let last = shards.last_mut().expect("one shard");
        if !last.is_empty() && (cur + size) as u64 > opts.max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += size;
        shards.last_mut().expect("one shard").extend(g);
    }

    let tmp = tmp_dir(out)?;
    let result = (|| -> Result<u64> {
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let nshards = shards.len();
        let mut bytes_out = 0u64;
        let mut weight_map = BTreeMap::new();
        let mut total_size = 0u64;
        for (i, shard) in shards.iter_mut().enumerate() {
            let file = if nshards == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, nshards)
            };
            for t in shard.iter() {
                weight_map.insert(t.name.clone(), file.clone());
                total_size += t.len as u64;
            }
            bytes_out += write_safetensors(&tmp.join(&file), shard, &ckpt)?;
        }
        if nshards > 1 {
            let index = json!({
                "metadata": {"total_size": total_size},
                "weight_map": weight_map,
            });
            write_json(&tmp.join(INDEX_FILE), &index)?;
        }
        let obj = config.as_object_mut().expect("checked object");
        obj.insert(
            "quantization_config".into(),
            quantization_config_json(opts.double_quant, &compute_dtype),
        );
        write_json(&tmp.join("config.json"), &config)?;
        for f in COPIED_FILES {
            let from = src.join(f);
            if from.is_file() {
                let to = tmp.join(f);
                fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
            }
        }
        if out.exists() {
            fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
        }
        fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        Ok(bytes_out)
    })();
    match result {
        Ok(bytes_out) => Ok(QuantizeReport {
            tensors_quantized: quantized,
            bytes_in,
            bytes_out,
            seconds: start.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn tmp_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::InvalidArg(format!("output {} has no folder name", out.display())))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    Ok(out.with_file_name(tmp_name))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON value serializes");
    s.push('\n');
    fs::write(path, s).map_err(|e| Error::io(path, e))
}

fn to_safetensors_dtype(d: DType) -> Option<safetensors::Dtype> {
    use safetensors::Dtype as S;
    Some(match d {
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::F64 => S::F64,
        DType::I64 => S::I64,
        DType::I32 => S::I32,
        DType::I16 => S::I16,
        DType::I8 => S::I8,
        DType::U8 => S::U8,
        DType::Bool => S::BOOL,
        DType::Other => return None,
    })
}

/// Writes one safetensors file the way the `safetensors` library lays it out (what
/// transformers' `save_pretrained` produces): tensors sorted by dtype (descending, the crate's
/// order, so widest alignment first) then name, `{"__metadata__":{"format":"pt"}}` first in the
/// header, the header padded with spaces to a multiple of 8. The header is written first (the
/// offsets follow from the byte lengths), then each tensor, streaming; source tensors are copied
/// from the memory map and their pages released. Returns the file size.
fn write_safetensors(path: &Path, tensors: &mut [OutTensor], ckpt: &Checkpoint) -> Result<u64> {
    tensors.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0usize;
    for t in tensors.iter() {
        let shape = t
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",");
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":[{shape}],\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(&t.name).expect("string serializes"),
            t.dtype,
            offset + t.len
        ));
        offset += t.len;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let file = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    for t in tensors.iter_mut() {
        match std::mem::replace(&mut t.data, Data::Owned(Vec::new())) {
            Data::Owned(bytes) => w.write_all(&bytes).map_err(io)?,
            Data::Source(name) => {
                let (_, bytes) = ckpt.bytes(&name)?;
                w.write_all(bytes).map_err(io)?;
                ckpt.release(&name);
            }
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(8 + header.len() as u64 + offset as u64)
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
