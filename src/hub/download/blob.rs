//! The cache side of a download: `<blob>.incomplete`, the hash check, the atomic rename and
//! snapshot link, `refs/`, and the per-blob lock.

use super::client::Announced;
use sha1::Digest as _;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long to wait for another process that holds a blob's lock.
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// `<blob>.incomplete`.
pub(super) fn incomplete_path(blob: &Path) -> PathBuf {
    let mut name = blob.file_name().expect("blob has a name").to_os_string();
    name.push(".incomplete");
    blob.with_file_name(name)
}

/// Checks `path` against the announced hashes; `Some(message)` on a mismatch.
pub(super) fn verify(path: &Path, announced: &Announced) -> std::io::Result<Option<String>> {
    if announced.sha256.is_none() && announced.git_sha1.is_none() {
        return Ok(None);
    }
    let len = std::fs::metadata(path)?.len();
    let mut sha256 = sha2::Sha256::new();
    let mut sha1 = sha1::Sha1::new();
    sha1.update(format!("blob {len}\0").as_bytes());
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if announced.sha256.is_some() {
            sha256.update(&buf[..n]);
        } else {
            sha1.update(&buf[..n]);
        }
    }
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    if let Some(want) = &announced.sha256 {
        let got = hex(&sha256.finalize());
        if &got != want {
            return Ok(Some(format!(
                "SHA-256 mismatch: the Hub announced {want}, the downloaded bytes hash to {got}"
            )));
        }
    } else if let Some(want) = &announced.git_sha1 {
        let got = hex(&sha1.finalize());
        if &got != want {
            return Ok(Some(format!(
                "git blob id mismatch: the Hub announced {want}, the downloaded bytes give {got}"
            )));
        }
    }
    Ok(None)
}

/// Points `pointer` (a snapshot file) at `blob` with a relative symlink, atomically replacing
/// whatever was there (a temporary link renamed into place). Copies where symlinks are not
/// available.
pub(super) fn link(blob: &Path, pointer: &Path, rel: &str) -> std::io::Result<()> {
    let parent = pointer.parent().expect("pointer has a parent");
    std::fs::create_dir_all(parent)?;
    let name = pointer
        .file_name()
        .expect("pointer has a name")
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    {
        let ups = "../".repeat(rel.split('/').count() + 1);
        let blob_name = blob.file_name().expect("blob has a name").to_string_lossy();
        std::os::unix::fs::symlink(format!("{ups}blobs/{blob_name}"), &tmp)?;
    }
    #[cfg(not(unix))]
    {
        let _ = rel;
        std::fs::copy(blob, &tmp)?;
    }
    std::fs::rename(&tmp, pointer)?;
    sync_dir(parent);
    Ok(())
}

/// Writes `refs/<revision>` = `commit` (temporary file renamed into place).
pub(super) fn write_ref(repo: &Path, revision: &str, commit: &str) -> std::io::Result<()> {
    let path = repo.join("refs").join(revision);
    if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    let parent = path.parent().expect("ref has a parent");
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".ref.tmp-{}", std::process::id()));
    std::fs::write(&tmp, commit)?;
    std::fs::rename(&tmp, &path)
}

/// fsyncs a directory so a rename in it survives a crash (best effort; a no-op off Unix).
pub(super) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// The snapshot folder holding `path`, which is `rel` inside it.
pub(super) fn snapshot_root(path: &Path, rel: &str) -> PathBuf {
    let mut root = path.to_path_buf();
    for _ in rel.split('/') {
        root.pop();
    }
    root
}

/// An exclusive `flock` on `<blob>.lock`, released on drop (and by the kernel if we die).
pub(super) struct BlobLock {
    #[cfg_attr(not(unix), allow(dead_code))]
    pub(super) file: File,
}

impl BlobLock {
    pub(super) fn acquire(blob: &Path) -> std::result::Result<BlobLock, String> {
        let mut name = blob.file_name().expect("blob has a name").to_os_string();
        name.push(".lock");
        let path = blob.with_file_name(name);
        let file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            let start = std::time::Instant::now();
            let mut told = false;
            loop {
                // SAFETY: flock on a descriptor we own; no memory is involved.
                let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                if r == 0 {
                    break;
                }
                if start.elapsed() > LOCK_WAIT {
                    return Err(format!(
                        "another process has been downloading {} for over {} s (lock {} held); try again later",
                        blob.display(),
                        LOCK_WAIT.as_secs(),
                        path.display()
                    ));
                }
                if !told {
                    tracing::info!("waiting for another process downloading {}", blob.display());
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Ok(BlobLock { file })
    }
}

impl Drop for BlobLock {
    fn drop(&mut self) {
        #[cfg(unix)]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: as in `acquire`.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_id_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        // `git hash-object` of "hello\n".
        let good = Announced {
            size: Some(6),
            sha256: None,
            git_sha1: Some("ce013625030ba8dba906f756967f9e9ca394464a".into()),
        };
        assert_eq!(verify(&p, &good).unwrap(), None);
        let bad = Announced {
            git_sha1: Some("0".repeat(40)),
            ..good
        };
        assert!(verify(&p, &bad).unwrap().unwrap().contains("mismatch"));
    }
}
