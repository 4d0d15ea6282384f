//! Writing bitsandbytes 4-bit checkpoints in transformers' exact layout (`qlora quantize`).

use super::{
    is_quantized_linear, quantization_config_json, DEFAULT_MAX_SHARD_BYTES, QUANT_STATE_NF4,
};
use crate::error::{Error, Result};
use crate::quant::nf4::{check_blocksize, quantize_nf4, Absmax, Nf4Tensor, NF4_TABLE};
use crate::weights::write::{
    check_output, to_safetensors_dtype, write_model_folder, Data, OutTensor,
};
use crate::weights::{is_rotary_inv_freq, Checkpoint, DType, TensorInfo};
use serde_json::Value;
use std::fs;
use std::path::Path;
use std::time::Instant;

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
/// ([`COPIED_FILES`](crate::weights::write::COPIED_FILES)) are copied.
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
    let mut config = read_source_config(src)?;
    check_output(out, opts.overwrite)?;
    let ckpt = Checkpoint::open(src)?;
    let compute_dtype = compute_dtype(&config);

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
            groups.push(quantized_group(&ckpt, info, opts)?);
            quantized += 1;
        } else {
            groups.push(vec![copied_tensor(info, nbytes)?]);
        }
        progress(i + 1, total);
    }

    let obj = config.as_object_mut().expect("checked object");
    obj.insert(
        "quantization_config".into(),
        quantization_config_json(opts.double_quant, &compute_dtype),
    );
    let no_producer = &mut |t: &OutTensor| {
        Err(Error::InvalidArg(format!(
            "no producer for tensor {}",
            t.name
        )))
    };
    let bytes_out = write_model_folder(
        src,
        out,
        groups,
        &config,
        opts.max_shard_bytes,
        &ckpt,
        no_producer,
    )?;
    Ok(QuantizeReport {
        tensors_quantized: quantized,
        bytes_in,
        bytes_out,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The source's `config.json`: a JSON object without a `quantization_config`.
fn read_source_config(src: &Path) -> Result<Value> {
    let config_path = src.join("config.json");
    if !config_path.is_file() {
        return Err(Error::NotFound(format!(
            "{}: no config.json in the source model folder {}",
            config_path.display(),
            src.display()
        )));
    }
    let text = fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config: Value = serde_json::from_str(&text)
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
    Ok(config)
}

/// The model's compute dtype (`dtype` or `torch_dtype`; float32 when neither is a float type).
fn compute_dtype(config: &Value) -> String {
    ["dtype", "torch_dtype"]
        .iter()
        .filter_map(|k| config.get(*k).and_then(Value::as_str))
        .find_map(|s| match s.strip_prefix("torch.").unwrap_or(s) {
            d @ ("float32" | "float16" | "bfloat16") => Some(d.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "float32".into())
}

/// The bitsandbytes tensors of linear weight `info`, quantized to NF4 (its f32 copy dropped
/// before the next one is read).
fn quantized_group(
    ckpt: &Checkpoint,
    info: &TensorInfo,
    opts: &QuantizeOptions,
) -> Result<Vec<OutTensor>> {
    let bad = |msg: String| Error::BadTensor {
        path: info.file.clone(),
        name: info.name.clone(),
        msg,
    };
    let original = match info.dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        d => {
            return Err(bad(format!(
                "dtype {d}: only F32, F16 or BF16 linear weights can be quantized"
            )))
        }
    };
    if info.shape.len() != 2 {
        return Err(bad(format!(
            "shape {:?}: a linear weight must be 2-D",
            info.shape
        )));
    }
    let w = ckpt.load_f32(&info.name, &info.shape)?;
    ckpt.release(&info.name);
    let t = quantize_nf4(&w, &info.shape, opts.blocksize, opts.double_quant)
        .map_err(|e| bad(e.to_string()))?;
    drop(w);
    Ok(bnb_entries(&info.name, &t, original)
        .into_iter()
        .map(|(name, dtype, shape, bytes)| OutTensor {
            name,
            dtype,
            shape,
            len: bytes.len(),
            data: Data::Owned(bytes),
        })
        .collect())
}

/// Tensor `info` (`nbytes`) copied from the source as it is.
fn copied_tensor(info: &TensorInfo, nbytes: usize) -> Result<OutTensor> {
    let dtype = to_safetensors_dtype(info.dtype).ok_or_else(|| Error::BadTensor {
        path: info.file.clone(),
        name: info.name.clone(),
        msg: "dtype not supported for copying".into(),
    })?;
    Ok(OutTensor {
        name: info.name.clone(),
        dtype,
        shape: info.shape.clone(),
        len: nbytes,
        data: Data::Source(info.name.clone()),
    })
}
