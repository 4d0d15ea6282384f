//! Reading bitsandbytes 4-bit weights saved by transformers into validated [`Nf4Tensor`]s.

use super::QUANT_STATE_FP4;
use super::QUANT_STATE_NF4;
use crate::error::{Error, Result};
use crate::quant::nf4::{check_blocksize, Absmax, Nf4Tensor, NF4_TABLE};
use crate::weights::{Checkpoint, DType, TensorInfo};
use serde_json::Value;

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
    let (qs_info, qs) = read_quant_state(ckpt, name, weight, expected_shape)?;
    let n: usize = expected_shape.iter().product();
    if n == 0 {
        return Err(bad(qs_info, format!("empty shape {expected_shape:?}")));
    }
    let (w_info, packed) = read_packed(ckpt, name, n, expected_shape)?;
    let (qm_info, qm_bytes) = ckpt.bytes(&format!("{name}.quant_map"))?;
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
    let absmax = read_absmax(ckpt, name, (qs_info, &qs), n.div_ceil(qs.blocksize))?;
    let t = Nf4Tensor {
        shape: expected_shape.to_vec(),
        blocksize: qs.blocksize,
        packed: packed.to_vec(),
        absmax,
    };
    t.validate().map_err(|e| bad(w_info, e.to_string()))?;
    Ok(t)
}

/// [`Error::BadTensor`] for `info`'s tensor.
fn bad(info: &TensorInfo, msg: String) -> Error {
    Error::BadTensor {
        path: info.file.clone(),
        name: info.name.clone(),
        msg,
    }
}

/// The quant_state of weight `name` (fp4 refused), its shape checked against `expected_shape`.
fn read_quant_state<'c>(
    ckpt: &'c Checkpoint,
    name: &str,
    weight: &TensorInfo,
    expected_shape: &[usize],
) -> Result<(&'c TensorInfo, QuantState)> {
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
    Ok((qs_info, qs))
}

/// The packed 4-bit codes of weight `name`: U8, `ceil(n / 2)` bytes.
fn read_packed<'c>(
    ckpt: &'c Checkpoint,
    name: &str,
    n: usize,
    expected_shape: &[usize],
) -> Result<(&'c TensorInfo, &'c [u8])> {
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
    Ok((w_info, w_bytes))
}

/// The `nblocks` absmax of weight `name`: F32, or with double quant (the quant_state's nested
/// fields) U8 codes with the nested absmax and quant_map; the nested tensors must be present
/// exactly when the quant_state has nested fields.
fn read_absmax(
    ckpt: &Checkpoint,
    name: &str,
    (qs_info, qs): (&TensorInfo, &QuantState),
    nblocks: usize,
) -> Result<Absmax> {
    let part = |suffix: &str| ckpt.bytes(&format!("{name}.{suffix}"));
    let (am_info, am_bytes) = part("absmax")?;
    let nested_present = ckpt.contains(&format!("{name}.nested_absmax"))
        || ckpt.contains(&format!("{name}.nested_quant_map"));
    let shape = || {
        format!(
            "{nblocks} blocks of {} for shape {:?}",
            qs.blocksize, qs.shape
        )
    };
    let Some((nested_blocksize, offset)) = qs.nested else {
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
        let a = read_f32(am_info, am_bytes, nblocks).map_err(|e| with_context(e, &shape()))?;
        check_finite(am_info, &a)?;
        return Ok(Absmax::F32(a));
    };
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
                "expected {nblocks} absmax codes ({}), found {}",
                shape(),
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
    Ok(Absmax::Double {
        q: am_bytes.to_vec(),
        offset,
        nested_absmax,
        nested_code,
        nested_blocksize,
    })
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
