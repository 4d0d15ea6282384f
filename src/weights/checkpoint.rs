//! [`Checkpoint`]: an opened, memory-mapped checkpoint.

use super::convert::{widen, Float};
use super::shard::Shard;
use super::{DType, Index, Source, TensorInfo};
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An opened checkpoint: one `model.safetensors`, or `model.safetensors.index.json` and its
/// shards, all memory-mapped, every header validated at open.
pub struct Checkpoint {
    dir: PathBuf,
    /// `model.safetensors` or the index: what a missing tensor is reported against.
    source: PathBuf,
    maps: Vec<Mmap>,
    /// Sorted by name.
    entries: BTreeMap<String, Entry>,
}

struct Entry {
    info: TensorInfo,
    /// The dtype as the header names it (for messages about dtypes we fold into `Other`).
    raw_dtype: safetensors::Dtype,
    /// Index into `maps`.
    map: usize,
    range: Range<usize>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: maps each shard once and validates every header, and
    /// checks that each tensor the index lists is present in its shard. No tensor data is read.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let mut maps = Vec::new();
        let mut entries = BTreeMap::new();
        let source = match Source::locate(dir)? {
            Source::Single(path) => {
                let shard = Shard::open(&path)?;
                for name in shard.tensors.keys() {
                    entries.insert(name.clone(), entry(&shard, name, 0)?);
                }
                maps.push(shard.mmap);
                path
            }
            Source::Index(path) => {
                let index = Index::read(&path)?;
                for (shard_name, names) in index.shards() {
                    let shard_path = dir.join(shard_name);
                    if !shard_path.exists() {
                        return Err(Error::bad_file(
                            &path,
                            format!(
                                "shard `{shard_name}` is missing (expected at {}; {} tensor(s) map to it, e.g. `{}`)",
                                shard_path.display(),
                                names.len(),
                                names[0]
                            ),
                        ));
                    }
                    let shard = Shard::open(&shard_path)?;
                    for name in names {
                        entries.insert(name.to_string(), entry(&shard, name, maps.len())?);
                    }
                    maps.push(shard.mmap);
                }
                path
            }
        };
        tracing::debug!(
            "opened {}: {} tensors in {} file(s)",
            source.display(),
            entries.len(),
            maps.len()
        );
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            source,
            maps,
            entries,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file the checkpoint was opened from: `model.safetensors` or the index.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.entries.values().map(|e| &e.info)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.entries.get(name).map(|e| &e.info)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Raw little-endian bytes of a tensor, borrowed from the memory map.
    pub fn bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let e = self.entry(name)?;
        Ok((&e.info, &self.maps[e.map][e.range.clone()]))
    }

    /// Loads a float tensor (F32, F16 or BF16) widened to f32, checking it has exactly `shape`.
    pub fn load_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let bad = |msg: String| Error::BadTensor {
            path: e.info.file.clone(),
            name: name.to_string(),
            msg,
        };
        if e.info.shape != shape {
            return Err(bad(format!("expected {shape:?}, found {:?}", e.info.shape)));
        }
        let kind = match e.info.dtype {
            DType::F32 => Float::F32,
            DType::F16 => Float::F16,
            DType::BF16 => Float::BF16,
            _ => {
                return Err(bad(format!(
                    "dtype {}, expected F32, F16 or BF16",
                    e.raw_dtype
                )))
            }
        };
        Ok(widen(kind, &self.maps[e.map][e.range.clone()]))
    }

    /// Drops the resident pages of tensor `name` (`madvise(MADV_DONTNEED)` on its byte range),
    /// so that a pass that reads a large checkpoint tensor by tensor (quantization) does not keep
    /// every page it touched in RSS. The mapping stays valid: the maps are read-only views of the
    /// file, so a later read faults the pages back in from disk. Pages shared with a neighbouring
    /// tensor are dropped too (harmless, for the same reason). Best effort: a no-op for unknown
    /// names, off Unix, or if the kernel refuses.
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(e) = self.entries.get(name) {
            if !e.range.is_empty() {
                // SAFETY: the map is a read-only mapping of a file (`Mmap`, never written through),
                // so MADV_DONTNEED discards nothing that cannot be re-read from the file; no
                // borrowed slice observes different bytes afterwards.
                let _ = unsafe {
                    self.maps[e.map].unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        e.range.start,
                        e.range.len(),
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.source.clone(),
            name: name.to_string(),
        })
    }
}

/// The entry for tensor `name`, which the index says is in `shard`.
fn entry(shard: &Shard, name: &str, map: usize) -> Result<Entry> {
    let t = shard.tensors.get(name).ok_or_else(|| Error::BadTensor {
        path: shard.path.clone(),
        name: name.to_string(),
        msg: format!("listed in {} but absent from this shard", super::INDEX_FILE),
    })?;
    Ok(Entry {
        info: TensorInfo {
            name: name.to_string(),
            dtype: t.dtype.into(),
            shape: t.shape.clone(),
            file: shard.path.clone(),
        },
        raw_dtype: t.dtype,
        map,
        range: t.range.clone(),
    })
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("source", &self.source)
            .field("files", &self.maps.len())
            .field("tensors", &self.entries.len())
            .finish()
    }
}
