//! Writing model folders in transformers' layout, streaming: `model.safetensors` (or shards
//! `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`), `config.json`, and the
//! tokenizer files, into a temporary folder renamed into place at the end. Used by
//! `qlora quantize` (`quant::bnb::write`) and `qlora merge` (`crate::merge`).

use super::{Checkpoint, DType, INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Tokenizer and generation files copied from the source model folder.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Where the bytes of an output tensor come from.
pub enum Data {
    Owned(Vec<u8>),
    /// Copied from the source checkpoint's memory map.
    Source(String),
    /// Computed when its turn comes to be written, by the producer passed to
    /// [`write_model_folder`] (called with the tensor's name), so only one is in memory at a time.
    Produce,
}

/// One tensor of the output.
pub struct OutTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Byte length of the data.
    pub len: usize,
    pub data: Data,
}

/// Computes the bytes of a [`Data::Produce`] tensor.
pub type Producer<'a> = dyn FnMut(&OutTensor) -> Result<Vec<u8>> + 'a;

/// The safetensors dtype of a checkpoint dtype.
pub fn to_safetensors_dtype(d: DType) -> Option<safetensors::Dtype> {
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

/// Refuses an output that is a file, or a non-empty folder unless `overwrite`.
pub fn check_output(out: &Path, overwrite: bool) -> Result<()> {
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
        if non_empty && !overwrite {
            return Err(Error::InvalidArg(format!(
                "output folder {} exists and is not empty; pass --overwrite to replace it",
                out.display()
            )));
        }
    }
    Ok(())
}

fn tmp_dir(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::InvalidArg(format!("output {} has no folder name", out.display())))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    Ok(out.with_file_name(tmp_name))
}

/// Writes `v` as pretty JSON with a trailing newline.
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON value serializes");
    s.push('\n');
    fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// Writes the model folder `out` from `groups` of tensors (a group is never split across
/// shards; a new shard starts when the next group would pass `max_shard_bytes`), `config`, and
/// the [`COPIED_FILES`] found in `src`. Everything goes to `<out>.tmp-<pid>` first, which replaces
/// `out` at the end (call [`check_output`] before). Returns the bytes of safetensors written.
pub fn write_model_folder(
    src: &Path,
    out: &Path,
    groups: Vec<Vec<OutTensor>>,
    config: &Value,
    max_shard_bytes: u64,
    ckpt: &Checkpoint,
    produce: &mut Producer,
) -> Result<u64> {
    let mut shards: Vec<Vec<OutTensor>> = vec![Vec::new()];
    let mut cur = 0usize;
    for g in groups {
        let size: usize = g.iter().map(|t| t.len).sum();
        let last = shards.last_mut().expect("one shard");
        if !last.is_empty() && (cur + size) as u64 > max_shard_bytes {
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
            bytes_out += write_safetensors(&tmp.join(&file), shard, ckpt, produce)?;
        }
        if nshards > 1 {
            let index = json!({
                "metadata": {"total_size": total_size},
                "weight_map": weight_map,
            });
            write_json(&tmp.join(INDEX_FILE), &index)?;
        }
        write_json(&tmp.join("config.json"), config)?;
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
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Writes one safetensors file the way the `safetensors` library lays it out (what
/// transformers' `save_pretrained` produces): tensors sorted by dtype (descending, the crate's
/// order, so widest alignment first) then name, `{"__metadata__":{"format":"pt"}}` first in the
/// header, the header padded with spaces to a multiple of 8. The header is written first (the
/// offsets follow from the byte lengths), then each tensor, streaming; source tensors are copied
/// from the memory map and their pages released. Returns the file size.
fn write_safetensors(
    path: &Path,
    tensors: &mut [OutTensor],
    ckpt: &Checkpoint,
    produce: &mut Producer,
) -> Result<u64> {
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
            Data::Produce => {
                let bytes = produce(t)?;
                if bytes.len() != t.len {
                    return Err(Error::InvalidArg(format!(
                        "{}: tensor {} produced {} bytes, expected {}",
                        path.display(),
                        t.name,
                        bytes.len(),
                        t.len
                    )));
                }
                w.write_all(&bytes).map_err(io)?;
            }
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(8 + header.len() as u64 + offset as u64)
}
