//! One writer per output folder: `FOLDER/.qlora.lock`, held with an exclusive `flock(2)` for as
//! long as a run writes there, and holding the writer's pid for the messages.
//!
//! The kernel releases an `flock` when its holder exits, however it exits (`kill -9`, OOM killer,
//! power loss on reboot), so a lock left by a crash is *stale by construction*: the file is
//! still there with the dead run's pid in it, but nobody holds it, and the next run takes it
//! over (and says so). A clean exit removes the file. Locking uses the `fs4` crate (`flock` on
//! Unix, `LockFileEx` on Windows) rather than hand-written `libc` calls; `std::fs::File::try_lock`
//! would do the same but needs Rust 1.89, above this crate's `rust-version`.

use crate::error::{Error, Result};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file inside an output folder.
pub const LOCK_FILE: &str = ".qlora.lock";

/// A held output-folder lock; released (and its file removed) on drop.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    /// `None` when the file system cannot lock (the run goes on unguarded, with a warning).
    file: Option<std::fs::File>,
    /// What the lock file held when this run took it over from a run that had died.
    pub stale: Option<String>,
}

fn unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP)
        )
}

impl OutputLock {
    /// Takes the lock of the existing folder `dir`, or fails naming the run that holds it.
    pub fn acquire(dir: &Path) -> Result<OutputLock> {
        let path = dir.join(LOCK_FILE);
        // The file may be unlinked by its previous holder between our open and our lock: then
        // we locked a file nobody else can see, so start over (a few times at most).
        for _ in 0..8 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match fs4::FileExt::try_lock(&file) {
                Ok(()) => {}
                Err(fs4::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    return Err(Error::InvalidArg(format!(
                        "{}: another `qlora train` is writing to this folder ({}); wait for it to end, stop it, or choose another --output",
                        dir.display(),
                        describe(&holder)
                    )));
                }
                Err(fs4::TryLockError::Error(e)) if unsupported(&e) => {
                    tracing::warn!(
                        "{}: this file system cannot lock files ({e}); nothing stops a second run from writing here",
                        dir.display()
                    );
                    return Ok(OutputLock {
                        path,
                        file: None,
                        stale: None,
                    });
                }
                Err(fs4::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            if !still_linked(&file, &path) {
                continue;
            }
            let mut previous = String::new();
            let _ = file.read_to_string(&mut previous);
            let me = format!("pid {}\n", std::process::id());
            file.set_len(0)
                .and_then(|_| file.rewind())
                .and_then(|_| file.write_all(me.as_bytes()))
                .map_err(|e| Error::io(&path, e))?;
            return Ok(OutputLock {
                path,
                file: Some(file),
                stale: (!previous.trim().is_empty()).then(|| describe(&previous)),
            });
        }
        Err(Error::InvalidArg(format!(
            "{}: the lock file keeps being replaced; is another run starting here?",
            path.display()
        )))
    }
}

/// Whether `path` still names the file we opened (not unlinked or replaced since).
fn still_linked(file: &std::fs::File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// The lock file's content for a message ("pid 1234"), or that it was empty.
fn describe(content: &str) -> String {
    match content.trim() {
        "" => "pid unknown".to_string(),
        s => s.to_string(),
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            // Unlink while still holding the lock, then release it by closing.
            let _ = std::fs::remove_file(&self.path);
            drop(file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = OutputLock::acquire(dir.path()).unwrap();
        assert!(a.stale.is_none());
        let err = OutputLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("another `qlora train`") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        drop(a);
        assert!(!dir.path().join(LOCK_FILE).exists());
        let b = OutputLock::acquire(dir.path()).unwrap();
        assert!(b.stale.is_none());
    }

    #[test]
    fn stale_lock_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "pid 4194999\n").unwrap();
        let l = OutputLock::acquire(dir.path()).unwrap();
        assert_eq!(l.stale.as_deref(), Some("pid 4194999"));
        let now = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(now, format!("pid {}\n", std::process::id()));
    }
}
