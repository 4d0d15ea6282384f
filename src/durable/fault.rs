//! Fault injection for tests; inert unless its environment variables are set.
//!
//! Every step of the writers in [`super`] is a numbered *fault point* (1, 2, 3, … in the order
//! the process reaches them): `create`, `write` (half of the bytes written), `fsync`, `rename`,
//! `dirsync`, `mkdir`, `remove`, `append` (half of a log line written). Two variables, read once
//! per process:
//!
//! - `QLORA_FAULT=KIND@N` strikes at point `N`:
//!   - `kill`: the process sends itself `SIGKILL`, a crash at that exact moment (mid-file, before
//!     an `fsync`, between a rename and the folder sync, …);
//!   - `enospc`, `erofs`, `eio`: the step fails with "no space left on device", "read-only file
//!     system" or an I/O error, and so does every later step that modifies the file system
//!     (a full disk stays full, a read-only folder stays read-only);
//!   - `term`, `term2`: the process sends itself `SIGTERM` once (a preemption notice arriving
//!     at that moment), or twice (the impatient second notice), and waits until the handler
//!     has acted on each ([`note_signal_handled`]; 10 s at most);
//!   - `gone`: the output folder (the nearest ancestor of the path holding the run's
//!     [`super::lock::LOCK_FILE`]) is moved away to `FOLDER.gone`, as if someone removed it, and
//!     the step goes on and fails as it then must.
//! - `QLORA_FAULT_LOG=FILE` appends `N<TAB>step<TAB>path` for every point reached, so a test can
//!   count a run's points and choose where to strike.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// What happens at the chosen point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Kill,
    NoSpace,
    ReadOnly,
    Io,
    Gone,
    Term,
    Term2,
}

/// A parsed `QLORA_FAULT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub kind: Kind,
    /// The 1-based point it strikes at.
    pub at: u64,
}

impl std::str::FromStr for Plan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, at) = s
            .split_once('@')
            .ok_or_else(|| format!("`{s}`: expected KIND@N, e.g. kill@12"))?;
        let kind = match kind {
            "kill" => Kind::Kill,
            "enospc" => Kind::NoSpace,
            "erofs" => Kind::ReadOnly,
            "eio" => Kind::Io,
            "gone" => Kind::Gone,
            "term" => Kind::Term,
            "term2" => Kind::Term2,
            k => {
                return Err(format!(
                    "`{k}`: unknown fault (kill, enospc, erofs, eio, gone, term, term2)"
                ))
            }
        };
        let at = at
            .parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("`{at}`: the point must be a number from 1"))?;
        Ok(Plan { kind, at })
    }
}

static POINTS: AtomicU64 = AtomicU64::new(0);

fn plan() -> Option<Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    *PLAN.get_or_init(|| {
        let spec = std::env::var("QLORA_FAULT").ok()?;
        spec.parse()
            .map_err(|e| eprintln!("warning: QLORA_FAULT ignored: {e}"))
            .ok()
    })
}

fn log_file() -> Option<&'static Path> {
    static LOG: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    LOG.get_or_init(|| std::env::var_os("QLORA_FAULT_LOG").map(Into::into))
        .as_deref()
}

/// Points reached so far by this process.
pub fn points_reached() -> u64 {
    POINTS.load(Ordering::SeqCst)
}

/// Steps that modify the file system: a sticky error keeps failing them.
fn modifies(step: &str) -> bool {
    matches!(step, "create" | "write" | "append" | "mkdir" | "rename")
}

/// Fault point `step` on `path`: counts it, logs it when asked, and strikes when it is the one.
pub(crate) fn point(step: &'static str, path: &Path) -> std::io::Result<()> {
    let n = POINTS.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(log) = log_file() {
        let line = format!("{n}\t{step}\t{}\n", path.display());
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    let Some(p) = plan() else { return Ok(()) };
    let sticky = matches!(p.kind, Kind::NoSpace | Kind::ReadOnly | Kind::Io);
    let strikes = n == p.at || (n > p.at && modifies(step) && sticky);
    if !strikes {
        return Ok(());
    }
    let os = |code| Err(std::io::Error::from_raw_os_error(code));
    match p.kind {
        Kind::Kill => kill_self(),
        Kind::NoSpace => os(libc::ENOSPC),
        Kind::ReadOnly => os(libc::EROFS),
        Kind::Io => os(libc::EIO),
        Kind::Gone => {
            move_output_away(path);
            Ok(())
        }
        Kind::Term | Kind::Term2 => {
            let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
            signals_handled(1);
            if p.kind == Kind::Term2 {
                let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
                signals_handled(2);
            }
            Ok(())
        }
    }
}

static SIGNALS_HANDLED: AtomicU64 = AtomicU64::new(0);

/// Called by the binary's signal handler thread once it has acted on a stop signal, so that a
/// `term` fault point can wait for that instead of guessing a delay.
pub fn note_signal_handled() {
    SIGNALS_HANDLED.fetch_add(1, Ordering::SeqCst);
}

/// Waits (10 s at most) until `n` stop signals have been handled.
fn signals_handled(n: u64) {
    let t0 = std::time::Instant::now();
    while SIGNALS_HANDLED.load(Ordering::SeqCst) < n && t0.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

fn kill_self() -> ! {
    // Flush nothing, run no destructor: exactly what `kill -9` does from outside.
    let _ = signal_hook::low_level::raise(signal_hook::consts::SIGKILL);
    loop {
        std::thread::park();
    }
}

/// Moves the output folder holding `path` to `FOLDER.gone` (kept so tests can inspect it).
fn move_output_away(path: &Path) {
    let out = path
        .ancestors()
        .find(|a| a.join(super::lock::LOCK_FILE).is_file());
    match out {
        Some(out) => {
            let mut to = out.as_os_str().to_owned();
            to.push(".gone");
            if let Err(e) = std::fs::rename(out, &to) {
                eprintln!("warning: QLORA_FAULT gone: {}: {e}", out.display());
            }
        }
        None => eprintln!(
            "warning: QLORA_FAULT gone: no output folder above {}",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse() {
        assert_eq!(
            "kill@3".parse::<Plan>(),
            Ok(Plan {
                kind: Kind::Kill,
                at: 3
            })
        );
        assert_eq!("enospc@12".parse::<Plan>().unwrap().kind, Kind::NoSpace);
        assert_eq!("term2@5".parse::<Plan>().unwrap().kind, Kind::Term2);
        for bad in ["kill", "kill@0", "kill@x", "boom@3", ""] {
            assert!(bad.parse::<Plan>().is_err(), "{bad}");
        }
    }
}
