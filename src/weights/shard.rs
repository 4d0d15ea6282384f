//! One safetensors file: memory-mapped, header validated.

use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The largest header we accept; the `safetensors` crate's own limit.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// A tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
pub(crate) struct ShardTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range within the whole file (header included), validated to lie inside it.
    pub range: Range<usize>,
}

/// A mapped safetensors file whose header has been validated.
pub(crate) struct Shard {
    pub path: PathBuf,
    pub mmap: Mmap,
    pub tensors: BTreeMap<String, ShardTensor>,
}

impl Shard {
    /// Maps `path` and validates its header; the data is not read.
    pub(crate) fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::bad_file(
                path,
                format!("file is {len} bytes, too short for a safetensors header"),
            ));
        }
        // SAFETY: the map is read-only and private to us. Like every memory-mapped loader, we
        // rely on the checkpoint not being modified or truncated by another process while it is
        // open; that is outside what Rust can check.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let tensors = parse_header(&mmap).map_err(|msg| Error::bad_file(path, msg))?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            tensors,
        })
    }
}

/// Validates the header of a whole safetensors file (`buf.len() >= 8`) and returns its tensors
/// with absolute byte ranges. The error is a message without the file name.
fn parse_header(buf: &[u8]) -> std::result::Result<BTreeMap<String, ShardTensor>, String> {
    let file_len = buf.len() as u64;
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&buf[..8]);
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_LEN {
        return Err(format!(
            "header length {n} is absurd (limit {MAX_HEADER_LEN} bytes): not a safetensors file, or corrupted"
        ));
    }
    if 8 + n > file_len {
        return Err(format!(
            "header length {n} exceeds the file size ({file_len} bytes): truncated, or not a safetensors file"
        ));
    }
    let header = &buf[8..8 + n as usize];
    let (n, meta) = SafeTensors::read_metadata(buf).map_err(|e| explain(e, header, buf.len()))?;
    let base = 8 + n;
    Ok(meta
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            let t = ShardTensor {
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: base + s..base + e,
            };
            (name, t)
        })
        .collect())
}

/// Turns a `safetensors` validation error into a message that names the offending tensor where
/// the crate does not.
fn explain(e: SafeTensorError, header: &[u8], file_len: usize) -> String {
    use SafeTensorError as E;
    match e {
        E::InvalidHeader(e) => format!("header is not valid UTF-8: {e}"),
        E::InvalidHeaderDeserialization(e) => format!("header is not valid safetensors JSON: {e}"),
        E::InvalidOffset(name) => format!(
            "tensor `{name}`: data_offsets overlap another tensor, are out of order, or leave a gap"
        ),
        E::TensorInvalidInfo => match size_mismatch(header) {
            Some(msg) => msg,
            None => "a tensor's data_offsets do not match its dtype × shape".to_string(),
        },
        E::ValidationOverflow => "a tensor's shape is too large (size overflows)".to_string(),
        E::MisalignedSlice => "a tensor's size is not a whole number of bytes".to_string(),
        E::MetadataIncompleteBuffer => {
            // The header is self-consistent, but the data section has the wrong length.
            let have = file_len - 8 - header.len();
            match serde_json::from_slice::<Metadata>(header) {
                Ok(meta) if meta.data_len() > have => format!(
                    "tensor data runs past the end of the file: the header describes {} bytes of data, the file holds {have} (truncated?)",
                    meta.data_len()
                ),
                Ok(meta) => format!(
                    "{} unexpected bytes after the last tensor: the header describes {} bytes of data, the file holds {have}",
                    have - meta.data_len(),
                    meta.data_len()
                ),
                Err(_) => "data section length does not match the header".to_string(),
            }
        }
        other => format!("invalid safetensors header: {other}"),
    }
}

/// Finds the first tensor (by name) whose byte range disagrees with `dtype × shape`.
fn size_mismatch(header: &[u8]) -> Option<String> {
    let Value::Object(map) = serde_json::from_slice::<Value>(header).ok()? else {
        return None;
    };
    let mut names: Vec<&String> = map.keys().filter(|k| *k != "__metadata__").collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let info: safetensors::tensor::TensorInfo =
            serde_json::from_value(map[name].clone()).ok()?;
        let (s, e) = info.data_offsets;
        let numel = info
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))?;
        let want = numel.checked_mul(info.dtype.bitsize())? / 8;
        (e.checked_sub(s)? != want).then(|| {
            format!(
                "tensor `{name}`: data_offsets [{s}, {e}] span {} bytes, but {} {:?} needs {want}",
                e - s,
                info.dtype,
                info.shape
            )
        })
    })
}
