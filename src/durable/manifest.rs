//! Folders written whole or not at all, and checked before they are trusted.
//!
//! [`write_folder`] writes a set of files into a hidden temporary folder beside the final name
//! (`.NAME.tmp-PID`), `fsync`s each file, writes `manifest.json` **last** (every file's size and
//! SHA-256, plus the SHA-256 of that list), `fsync`s the folder, renames it into place and
//! `fsync`s the parent folder. A crash at any moment therefore leaves either no `NAME` (only a
//! temporary folder, removed by the next run holding the output lock) or a complete one.
//!
//! [`verify_folder`] checks a folder against its manifest before anything in it is parsed: a
//! missing manifest, a missing file, a file of another size (truncated or extended) or other
//! bytes (bit flips) is an error naming that file. The manifest is itself untrusted input:
//! entry names must be plain file names, and the checksum of its list catches a flipped size
//! or digest in the manifest itself.
//!
//! ```text
//! {"format": 1, "files": [{"name": "trainer_state.json", "size": 812, "sha256": "9f…"}, …],
//!  "files_sha256": "4c…"}
//! ```

use super::{create_dir, remove_dir_all, rename, sync_dir, write_file, TMP_TAG};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Component, Path};

/// The manifest inside a folder written by [`write_folder`].
pub const MANIFEST_FILE: &str = "manifest.json";

/// The manifest format this code writes and reads.
const FORMAT: u32 = 1;

/// Largest manifest read (a manifest lists a handful of files).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the file's bytes.
    pub sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: u32,
    files: Vec<Entry>,
    /// SHA-256 of `files` serialized as compact JSON.
    files_sha256: String,
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn list_digest(files: &[Entry]) -> String {
    sha256_hex(&serde_json::to_vec(files).expect("manifest entries serialize"))
}

/// The manifest of `files` (name, bytes), as written by [`write_folder`].
pub fn manifest_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    let files: Vec<Entry> = files
        .iter()
        .map(|(name, bytes)| Entry {
            name: name.to_string(),
            size: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        })
        .collect();
    let m = Manifest {
        format: FORMAT,
        files_sha256: list_digest(&files),
        files,
    };
    // No trailing newline: a manifest cut at any offset loses its closing brace and fails.
    serde_json::to_vec_pretty(&m).expect("manifest serializes")
}

/// Writes `files` (name, bytes) as the folder `dir` (see the module docs). An existing `dir` is
/// replaced: moved aside first, so that a crash leaves the old folder, the new one, or neither
/// (never a mix), and removed once the new one is in place. The parent of `dir` must exist.
pub fn write_folder(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::InvalidArg(format!("{}: not a folder name", dir.display())))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}{TMP_TAG}{pid}"));
    let old = parent.join(format!(".{name}.old{TMP_TAG}{pid}"));
    remove_dir_all(&tmp)?;
    let r = (|| {
        create_dir(&tmp)?;
        for (file, bytes) in files {
            write_file(&tmp.join(file), bytes)?;
        }
        write_file(&tmp.join(MANIFEST_FILE), &manifest_bytes(files))?;
        sync_dir(&tmp)?;
        let replacing = dir.exists();
        if replacing {
            rename(dir, &old)?;
        }
        rename(&tmp, dir)?;
        sync_dir(parent)?;
        if replacing {
            remove_dir_all(&old)?;
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r
}

/// A plain file name: one normal path component (no `/`, `..`, root or drive).
fn plain_name(name: &str) -> bool {
    let mut c = Path::new(name).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(n)), None) if n == name)
}

/// Reads and checks the manifest of `dir` (not the files it lists).
fn read_manifest(dir: &Path) -> Result<Vec<Entry>> {
    let path = dir.join(MANIFEST_FILE);
    let bad = |msg: String| Error::bad_file(&path, msg);
    let meta =
        match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(bad(
                "missing: the folder is incomplete (or was written by a qlora without manifests)"
                    .into(),
            )),
            Err(e) => return Err(Error::io(&path, e)),
        };
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(bad(format!(
            "{} bytes: too large for a manifest",
            meta.len()
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(format!("corrupt: {e}")))?;
    if m.format != FORMAT {
        return Err(bad(format!(
            "format {} (this qlora reads format {FORMAT})",
            m.format
        )));
    }
    if list_digest(&m.files) != m.files_sha256 {
        return Err(bad("corrupt: its list does not match its checksum".into()));
    }
    if let Some(e) = m.files.iter().find(|e| !plain_name(&e.name)) {
        return Err(bad(format!("`{}` is not a plain file name", e.name)));
    }
    Ok(m.files)
}

/// Checks that every file the manifest of `dir` lists is there with its size and SHA-256.
/// Returns the entries; an error names the first bad file (the manifest included).
pub fn verify_folder(dir: &Path) -> Result<Vec<Entry>> {
    let files = read_manifest(dir)?;
    for e in &files {
        let path = dir.join(&e.name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::bad_file(&path, "missing (listed in the manifest)"))
            }
            Err(err) => return Err(Error::io(&path, err)),
        };
        if bytes.len() as u64 != e.size {
            return Err(Error::bad_file(
                &path,
                format!(
                    "truncated or damaged: {} bytes, the manifest says {}",
                    bytes.len(),
                    e.size
                ),
            ));
        }
        if sha256_hex(&bytes) != e.sha256 {
            return Err(Error::bad_file(
                &path,
                "corrupt: its SHA-256 does not match the manifest",
            ));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> (tempfile::TempDir, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("ck");
        write_folder(&d, &[("a.bin", b"hello world"), ("b.json", b"{}")]).unwrap();
        (t, d)
    }

    #[test]
    fn written_folder_verifies_and_replaces_atomically() {
        let (t, d) = folder();
        assert_eq!(verify_folder(&d).unwrap().len(), 2);
        write_folder(&d, &[("c.bin", b"new")]).unwrap();
        assert!(!d.join("a.bin").exists());
        assert_eq!(verify_folder(&d).unwrap()[0].name, "c.bin");
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary folder left");
    }

    #[test]
    fn every_kind_of_damage_names_the_file() {
        let (_t, d) = folder();
        std::fs::write(d.join("a.bin"), b"hello_world").unwrap();
        let e = verify_folder(&d).unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("SHA-256"), "{e}");
        std::fs::write(d.join("a.bin"), b"hello").unwrap();
        let e = verify_folder(&d).unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("truncated"), "{e}");
        std::fs::remove_file(d.join("a.bin")).unwrap();
        let e = verify_folder(&d).unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("missing"), "{e}");
        let m = std::fs::read_to_string(d.join(MANIFEST_FILE)).unwrap();
        std::fs::write(d.join(MANIFEST_FILE), m.replacen("11", "12", 1)).unwrap();
        let e = verify_folder(&d).unwrap_err().to_string();
        assert!(e.contains(MANIFEST_FILE) && e.contains("checksum"), "{e}");
        std::fs::remove_file(d.join(MANIFEST_FILE)).unwrap();
        let e = verify_folder(&d).unwrap_err().to_string();
        assert!(e.contains(MANIFEST_FILE) && e.contains("incomplete"), "{e}");
    }

    #[test]
    fn manifest_names_must_be_plain() {
        for (name, ok) in [
            ("a.bin", true),
            ("../x", false),
            ("/etc/passwd", false),
            ("a/b", false),
            ("", false),
            (".", false),
        ] {
            assert_eq!(plain_name(name), ok, "{name}");
        }
    }
}
