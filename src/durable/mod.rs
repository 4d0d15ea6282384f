//! Durable file output. Every file a training run writes (checkpoints, the final adapter,
//! `metrics.jsonl`, `loss_curve.svg`) goes through these functions, which
//!
//! - write a file's bytes and `fsync` it before it is renamed anywhere ([`write_file`]);
//! - replace a file atomically: a hidden temporary file in the same folder, `fsync`, `rename`,
//!   then `fsync` of the folder so the rename itself survives a power loss ([`write_atomic`]);
//! - never create a missing parent folder behind the caller's back ([`create_dir`] makes one
//!   level), so a run whose output folder was removed stops instead of recreating it empty.
//!
//! Each step is a numbered *fault point* (see [`fault`]): tests set `QLORA_FAULT=kind@N` to kill
//! the process or fail the write at point `N`, which is how the crash and disk-full behaviour is
//! tested without root or a full disk. [`manifest`] writes whole folders (checkpoints) atomically
//! with a manifest of sizes and checksums, and verifies them; [`lock`] holds the
//! one-writer-per-folder lock.

pub mod fault;
pub mod lock;
pub mod manifest;

use crate::error::{Error, Result};
use fault::point;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Marks the temporary names this module creates: `.{name}.tmp-{pid}`. Anything carrying it in
/// an output folder is a leftover of an interrupted write (see [`remove_stale_temps`]).
const TMP_TAG: &str = ".tmp-";

/// The hidden temporary name beside `path` that [`write_atomic`] writes first.
pub fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    dir.join(format!(".{name}{TMP_TAG}{}", std::process::id()))
}

/// Creates (or truncates) `path`, writes `bytes` and `fsync`s the file. The file may be
/// partially written when this fails; callers write to temporary names.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| Error::io(path, e);
    point("create", path).map_err(io)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io)?;
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    f.write_all(head).map_err(io)?;
    point("write", path).map_err(io)?;
    f.write_all(tail).map_err(io)?;
    point("fsync", path).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Renames `from` to `to` (atomic on one file system). The caller syncs the folder.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    point("rename", to).map_err(|e| Error::io(to, e))?;
    std::fs::rename(from, to).map_err(|e| Error::io(to, e))
}

/// `fsync`s a folder, making the renames and creations inside it durable. File systems that
/// cannot sync a folder (some network and FUSE ones answer `EINVAL`) are accepted as they are.
pub fn sync_dir(dir: &Path) -> Result<()> {
    point("dirsync", dir).map_err(|e| Error::io(dir, e))?;
    #[cfg(unix)]
    {
        let r = std::fs::File::open(dir).and_then(|d| d.sync_all());
        match r {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
                ) => {}
            other => other.map_err(|e| Error::io(dir, e))?,
        }
    }
    Ok(())
}

/// Creates the folder `dir`, whose parent must exist.
pub fn create_dir(dir: &Path) -> Result<()> {
    point("mkdir", dir).map_err(|e| Error::io(dir, e))?;
    std::fs::create_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Removes a folder and everything in it; a folder that is already gone is fine.
pub fn remove_dir_all(dir: &Path) -> Result<()> {
    point("remove", dir).map_err(|e| Error::io(dir, e))?;
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir, e)),
        _ => Ok(()),
    }
}

/// Replaces `path` by a file holding `bytes`: written and synced under a temporary name in the
/// same folder, renamed over `path`, then the folder synced. A crash at any moment leaves either
/// the old file or the new one, never a mix; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let r = write_file(&tmp, bytes).and_then(|_| rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Appends `bytes` to an open file (a log line) and flushes it to the OS. Not synced: callers
/// sync at checkpoints ([`std::fs::File::sync_data`]).
pub fn append(file: &mut std::fs::File, path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| Error::io(path, e);
    let (head, tail) = bytes.split_at(bytes.len() / 2);
    file.write_all(head).map_err(io)?;
    point("append", path).map_err(io)?;
    file.write_all(tail).and_then(|_| file.flush()).map_err(io)
}

/// Removes the leftovers of interrupted writes in `dir` (hidden `.NAME.tmp-PID` files and
/// folders). Only safe while holding the folder's [`lock::OutputLock`]: then no other process
/// is writing there. Returns the names removed.
pub fn remove_stale_temps(dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.contains(TMP_TAG)) {
            continue;
        }
        let p = entry.path();
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::io(&p, e))?;
        removed.push(name);
    }
    Ok(removed)
}
