//! Crash consistency of `qlora train` (issue 12): `kill -9` at any moment, SIGTERM / SIGINT,
//! corrupt checkpoints, failed writes and a second writer never lose or corrupt an output.
//!
//! Every test trains the tiny GQA fixture on 16 rows of guanaco for 6 steps with a checkpoint
//! after each (`--save-steps 1`), and compares with one uninterrupted reference run. Moments
//! inside the writers are reached through the fault-injection points of `qlora::durable`
//! (`QLORA_FAULT=kill@N`, `enospc@N`, …; `QLORA_FAULT_LOG` lists a run's points), other moments
//! by a `SIGKILL` after a random delay.
//!
//! `QLORA_CRASH_KILLS=N` (default 12) sets how many kills the harness survives; `QLORA_CRASH_SEED`
//! its seed; `QLORA_CRASH_CORRUPT=all` corrupts every byte offset instead of a sample. The long
//! run recorded in the README is `scripts/crash_harness.sh`.

#![cfg(unix)]

use qlora::train::checkpoint::{resume_dir, verify_checkpoint};
use qlora::train::config::Resume;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const STEPS: usize = 6;
const WEIGHTS: &str = "adapter_model.safetensors";
const CONFIG: &str = "adapter_config.json";

fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--model",
        &format!("{ROOT}/tests/fixtures/tiny/gqa"),
        "--dataset",
        &format!("{ROOT}/tests/fixtures/guanaco-llama2-1k"),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-rows",
        "16",
        "--max-seq-len",
        "64",
        "--max-steps",
        &STEPS.to_string(),
        "--save-steps",
        "1",
        "--logging-steps",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn command(out: &Path, extra: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qlora"));
    c.args(train_args(out, extra))
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_LOG", "warn")
        .env_remove("QLORA_FAULT")
        .env_remove("QLORA_FAULT_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// How a `qlora train` process ended.
#[derive(Debug)]
struct Ended {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
}

impl Ended {
    fn killed(&self) -> bool {
        self.signal == Some(9)
    }
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

fn finish(child: Child) -> Ended {
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "a panic:\n{stderr}");
    Ended {
        code: out.status.code(),
        signal: out.status.signal(),
        stderr,
    }
}

fn run(out: &Path, extra: &[&str], env: &[(&str, String)]) -> Ended {
    finish(command(out, extra, env).spawn().unwrap())
}

/// Fault points of a run: `(step, path)` in the order reached.
fn read_log(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, '\t');
            let (_, step, p) = (f.next()?, f.next()?, f.next()?);
            Some((step.to_string(), p.to_string()))
        })
        .collect()
}

/// The uninterrupted run every test compares with.
struct Reference {
    _tmp: tempfile::TempDir,
    out: PathBuf,
    weights: Vec<u8>,
    config: Vec<u8>,
    /// Its fault points.
    points: Vec<(String, String)>,
    wall: Duration,
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ref");
        let log = tmp.path().join("points.log");
        let t0 = Instant::now();
        let e = run(&out, &[], &[("QLORA_FAULT_LOG", log.display().to_string())]);
        let wall = t0.elapsed();
        assert!(e.ok(), "reference run failed:\n{}", e.stderr);
        Reference {
            weights: std::fs::read(out.join(WEIGHTS)).unwrap(),
            config: std::fs::read(out.join(CONFIG)).unwrap(),
            points: read_log(&log),
            out,
            _tmp: tmp,
            wall,
        }
    })
}

/// The 1-based index of the first reference point of `step` whose path satisfies `pick`.
fn point(r: &Reference, step: &str, pick: impl Fn(&str) -> bool) -> u64 {
    let i = r
        .points
        .iter()
        .position(|(s, p)| s == step && pick(p))
        .unwrap_or_else(|| panic!("no {step} point found in {:?}", r.points));
    i as u64 + 1
}

fn in_checkpoint(p: &str, n: usize) -> bool {
    p.contains(&format!("/.checkpoint-{n}.tmp-")) || p.ends_with(&format!("/checkpoint-{n}"))
}

fn is_final_adapter(p: &str) -> bool {
    !p.contains("checkpoint-") && (p.contains(WEIGHTS) || p.contains(CONFIG))
}

fn has_checkpoint(out: &Path) -> bool {
    !qlora::train::checkpoint::list_checkpoints(out)
        .unwrap()
        .is_empty()
}

/// What must hold after any interruption: every `checkpoint-N` verifies against its manifest,
/// and a final adapter, when present, is exactly the reference's.
fn check_invariants(out: &Path, r: &Reference) {
    for n in qlora::train::checkpoint::list_checkpoints(out).unwrap() {
        let d = out.join(format!("checkpoint-{n}"));
        verify_checkpoint(&d).unwrap_or_else(|e| panic!("half-written checkpoint taken: {e}"));
    }
    if out.join(WEIGHTS).exists() {
        assert_eq!(std::fs::read(out.join(WEIGHTS)).unwrap(), r.weights);
        assert_eq!(std::fs::read(out.join(CONFIG)).unwrap(), r.config);
    }
}

/// Runs (resuming when there is a checkpoint) until a run ends cleanly; the final adapter must
/// be the reference's.
fn resume_to_end(out: &Path, r: &Reference) {
    let resume: &[&str] = if has_checkpoint(out) {
        &["--resume"]
    } else {
        &[]
    };
    let e = run(out, resume, &[]);
    assert!(e.ok(), "resume failed: {e:?}");
    check_invariants(out, r);
    assert!(out.join(WEIGHTS).exists(), "no final adapter");
}

/// A splitmix64 stream: reproducible choices from `QLORA_CRASH_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// `SIGKILL` from inside at fault point `N` of the process.
    Point(u64),
    /// `SIGKILL` from outside after this delay.
    After(Duration),
}

/// Counts of the harness, for its report.
#[derive(Default)]
struct Tally {
    kills: usize,
    campaigns: usize,
    runs: usize,
    /// Where the kills struck.
    at: BTreeMap<&'static str, usize>,
}

fn place(step: &str, path: &str) -> &'static str {
    if path.contains("checkpoint-") {
        "checkpoint write"
    } else if is_final_adapter(path) {
        "final adapter write"
    } else if path.contains("metrics.jsonl") && step == "append" {
        "metrics append"
    } else if path.contains("metrics.jsonl") {
        "metrics rewrite"
    } else {
        "loss curve write"
    }
}

/// One run of the harness, killed as `kill` says (unless it ends first).
fn run_killed(out: &Path, kill: Option<Kill>, tally: &mut Tally) -> Ended {
    let resume: &[&str] = if has_checkpoint(out) {
        &["--resume"]
    } else {
        &[]
    };
    let log = out.with_extension("points.log");
    let _ = std::fs::remove_file(&log);
    let mut env = vec![("QLORA_FAULT_LOG", log.display().to_string())];
    if let Some(Kill::Point(n)) = kill {
        env.push(("QLORA_FAULT", format!("kill@{n}")));
    }
    let mut child = command(out, resume, &env).spawn().unwrap();
    if let Some(Kill::After(d)) = kill {
        std::thread::sleep(d);
        let _ = child.kill();
    }
    let e = finish(child);
    tally.runs += 1;
    if e.killed() {
        tally.kills += 1;
        let points = read_log(&log);
        let at = match (kill, points.last()) {
            (Some(Kill::Point(_)), Some((s, p))) => place(s, p),
            _ => "random moment (outside kill)",
        };
        *tally.at.entry(at).or_default() += 1;
    }
    e
}

/// One campaign: a fresh run killed as `first`, then resumed (killed again at random, half of
/// the time) until a run ends cleanly; then the final adapter must be bit-identical.
fn campaign(r: &Reference, first: Kill, rng: &mut Rng, tally: &mut Tally) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let mut kill = Some(first);
    for _ in 0..64 {
        let e = run_killed(&out, kill, tally);
        if !e.killed() {
            assert!(e.ok(), "{e:?}");
            break;
        }
        check_invariants(&out, r);
        kill = match rng.below(4) {
            0 | 1 => None,
            2 => Some(Kill::Point(1 + rng.below(r.points.len() as u64))),
            _ => Some(random_delay(r, rng)),
        };
    }
    assert!(out.join(WEIGHTS).exists(), "the campaign never finished");
    check_invariants(&out, r);
    tally.campaigns += 1;
}

fn random_delay(r: &Reference, rng: &mut Rng) -> Kill {
    let max = r.wall.as_micros() as u64 * 5 / 4;
    Kill::After(Duration::from_micros(rng.below(max)))
}

/// Issue 12, item 1: `kill -9` at many moments (inside every kind of write and anywhere else),
/// then `--resume` until done: every final adapter is bit-identical to the uninterrupted run's
/// and no checkpoint is ever half-written or taken for complete.
#[test]
fn kill_9_anywhere_then_resume_is_bit_identical() {
    let r = reference();
    let target = env_num("QLORA_CRASH_KILLS", 12) as usize;
    let mut rng = Rng(env_num("QLORA_CRASH_SEED", 12));
    // First the moments that matter most, then random ones.
    let n = r.points.len() as u64;
    let mut firsts = vec![
        Kill::Point(point(r, "write", |p| {
            in_checkpoint(p, 2) && p.contains("optimizer")
        })),
        Kill::Point(point(r, "write", |p| {
            in_checkpoint(p, 3) && p.contains("manifest")
        })),
        Kill::Point(point(r, "rename", |p| in_checkpoint(p, 3))),
        Kill::Point(point(r, "dirsync", |p| in_checkpoint(p, 4)) + 2),
        Kill::Point(point(r, "write", is_final_adapter)),
        Kill::Point(point(r, "rename", |p| p.ends_with(WEIGHTS))),
        Kill::Point(n),
    ];
    let mut tally = Tally::default();
    let t0 = Instant::now();
    while tally.kills < target {
        let first = if !firsts.is_empty() {
            firsts.remove(0)
        } else if rng.below(3) == 0 {
            random_delay(r, &mut rng)
        } else {
            Kill::Point(1 + rng.below(n))
        };
        campaign(r, first, &mut rng, &mut tally);
    }
    let at: Vec<String> = tally.at.iter().map(|(k, v)| format!("{v} {k}")).collect();
    eprintln!(
        "crash harness: {} SIGKILLs survived ({}) in {} campaigns, {} runs, {:.1} s; \
         {} fault points per uninterrupted run; every final adapter bit-identical, \
         every checkpoint verified after every kill, no panic",
        tally.kills,
        at.join(", "),
        tally.campaigns,
        tally.runs,
        t0.elapsed().as_secs_f64(),
        n
    );
    assert!(tally.at.contains_key("checkpoint write"));
    assert!(tally.at.contains_key("final adapter write"));
}

/// Reads stderr lines of a child as they come.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line containing `needle`; returns everything read so far.
fn wait_for(rx: &std::sync::mpsc::Receiver<String>, needle: &str, seen: &mut String) {
    let t0 = Instant::now();
    while !seen.contains(needle) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {needle:?}:\n{seen}"
        );
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push_str(&l);
            seen.push('\n');
        }
    }
}

fn kill(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// A run long enough to be signalled or locked against while it trains.
fn long_run(out: &Path) -> (Child, std::sync::mpsc::Receiver<String>, String) {
    let mut c = command(out, &[], &[]);
    // The flags given later win: many steps, no scheduled checkpoint.
    c.args(["--max-steps", "1000000", "--save-steps", "1000000"]);
    let mut child = c.spawn().unwrap();
    let rx = stderr_lines(&mut child);
    let mut seen = String::new();
    wait_for(&rx, "training on", &mut seen);
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(true, |s| s.is_empty()) {
        assert!(t0.elapsed() < Duration::from_secs(60), "no step:\n{seen}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, rx, seen)
}

fn rest(rx: std::sync::mpsc::Receiver<String>, mut seen: String) -> String {
    for l in rx.iter() {
        seen.push_str(&l);
        seen.push('\n');
    }
    assert!(!seen.contains("panicked"), "{seen}");
    seen
}

/// Issue 12, item 2: SIGTERM and SIGINT finish the step, write a checkpoint and exit 0 with a
/// message; a second signal exits at once, and nothing is corrupted either way.
#[test]
fn sigterm_and_sigint_checkpoint_and_exit_0_a_second_exits_at_once() {
    let r = reference();
    for sig in ["-TERM", "-INT"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        let (mut child, rx, seen) = long_run(&out);
        kill(&child, sig);
        let status = child.wait().unwrap();
        let err = rest(rx, seen);
        assert!(status.success(), "{sig}: {status:?}\n{err}");
        let name = if sig == "-TERM" { "SIGTERM" } else { "SIGINT" };
        assert!(
            err.contains(name) && err.contains("finishing this step"),
            "{err}"
        );
        assert!(err.contains("continue with --resume"), "{err}");
        let steps = qlora::train::checkpoint::list_checkpoints(&out).unwrap();
        assert_eq!(steps.len(), 1, "{err}");
        verify_checkpoint(&out.join(format!("checkpoint-{}", steps[0]))).unwrap();
        assert!(!out.join(qlora::durable::lock::LOCK_FILE).exists());
    }
    // Deterministic moments through the fault points: a notice after step 2 of a run that saves
    // only at the end finishes step 2, saves it, exits 0, and the resumed run ends bit-identical.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let sparse = ["--save-steps", "100"];
    let log = tmp.path().join("log");
    let probe = run(
        &out,
        &sparse,
        &[("QLORA_FAULT_LOG", log.display().to_string())],
    );
    assert!(probe.ok());
    let appends: Vec<usize> = read_log(&log)
        .iter()
        .enumerate()
        .filter(|(_, (s, _))| s == "append")
        .map(|(i, _)| i + 1)
        .collect();
    std::fs::remove_dir_all(&out).unwrap();
    let e = run(
        &out,
        &sparse,
        &[("QLORA_FAULT", format!("term@{}", appends[1]))],
    );
    assert!(
        e.ok() && e.stderr.contains("SIGTERM: finishing this step"),
        "{e:?}"
    );
    assert_eq!(
        qlora::train::checkpoint::list_checkpoints(&out).unwrap(),
        [2]
    );
    let e = run(&out, &["--save-steps", "100", "--resume"], &[]);
    assert!(e.ok(), "{e:?}");
    check_invariants(&out, r);
    // Two notices in the middle of writing checkpoint-3: exit at once (143), nothing damaged.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let at = point(r, "write", |p| {
        in_checkpoint(p, 3) && p.contains("optimizer")
    });
    let e = run(&out, &[], &[("QLORA_FAULT", format!("term2@{at}"))]);
    assert_eq!(e.code, Some(143), "{e:?}");
    assert!(e.stderr.contains("SIGTERM again: exiting now"), "{e:?}");
    assert_eq!(
        qlora::train::checkpoint::list_checkpoints(&out).unwrap(),
        [1, 2]
    );
    check_invariants(&out, r);
    resume_to_end(&out, r);
}

/// Copies the reference output (checkpoints 1–6, final adapter) to a fresh folder.
fn copy_reference(r: &Reference, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(&r.out).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), dst.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// Byte offsets to damage in a file of `len` bytes: all of them for small files (and with
/// `QLORA_CRASH_CORRUPT=all`), else the first 256, the last 64 and 128 random ones.
fn offsets(len: usize, rng: &mut Rng) -> Vec<usize> {
    let all = std::env::var("QLORA_CRASH_CORRUPT").is_ok_and(|v| v == "all");
    if all || len <= 2048 {
        return (0..len).collect();
    }
    let mut v: Vec<usize> = (0..256).chain(len - 64..len).collect();
    v.extend((0..128).map(|_| rng.below(len as u64) as usize));
    v
}

/// Issue 12, item 3: bit flips, truncations at any offset and missing files in the newest
/// checkpoint: `--resume` never trains from it, and names the bad file and `checkpoint-5`.
#[test]
fn corrupt_checkpoints_are_refused_naming_the_file_and_the_newest_valid_one() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    copy_reference(r, &out);
    let ck = out.join("checkpoint-6");
    let mut rng = Rng(env_num("QLORA_CRASH_SEED", 12));
    let files = [
        CONFIG,
        WEIGHTS,
        "optimizer.safetensors",
        "trainer_state.json",
        "manifest.json",
    ];
    let mut tried: BTreeMap<&str, usize> = BTreeMap::new();
    let refused = |what: &str, file: &str| {
        let e = resume_dir(&out, &Resume::Latest)
            .expect_err(&format!("{what} of {file} resumed"))
            .to_string();
        assert!(
            e.contains("checkpoint-6")
                && e.contains(&out.join("checkpoint-5").display().to_string()),
            "{what} of {file}: {e}"
        );
        if file != "manifest.json" {
            assert!(e.contains(file), "{what} of {file}: {e}");
        }
    };
    for file in files {
        let path = ck.join(file);
        let good = std::fs::read(&path).unwrap();
        for off in offsets(good.len(), &mut rng) {
            let mut bad = good.clone();
            bad[off] ^= 1 << (off % 8);
            std::fs::write(&path, &bad).unwrap();
            refused("bit flip", file);
            std::fs::write(&path, &good[..off]).unwrap();
            refused("truncation", file);
            *tried.entry("bit flips").or_default() += 1;
            *tried.entry("truncations").or_default() += 1;
        }
        std::fs::remove_file(&path).unwrap();
        refused("removal", file);
        *tried.entry("missing files").or_default() += 1;
        std::fs::write(&path, &good).unwrap();
        resume_dir(&out, &Resume::Latest).unwrap();
    }
    eprintln!("corrupt checkpoints refused: {tried:?}");
    // Through the command line, as the issue reports it: flipped bytes inside the optimizer
    // state no longer resume silently; the error names the file and where to resume instead.
    let opt = ck.join("optimizer.safetensors");
    let good = std::fs::read(&opt).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 7] ^= 0x10;
    std::fs::write(&opt, &bad).unwrap();
    let before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let e = run(&out, &["--resume"], &[]);
    assert_eq!(e.code, Some(1), "{e:?}");
    assert!(
        e.stderr.contains(&opt.display().to_string())
            && e.stderr.contains("SHA-256")
            && e.stderr.contains("--resume")
            && e.stderr
                .contains(&out.join("checkpoint-5").display().to_string()),
        "{}",
        e.stderr
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), before);
    // Following the advice resumes from checkpoint-5 and ends bit-identical.
    let five = out.join("checkpoint-5").display().to_string();
    let e = run(&out, &["--resume", &five], &[]);
    assert!(e.ok(), "{e:?}");
    check_invariants(&out, r);
}

/// Issue 12, item 4: disk full, read-only or removed output folder mid-run: an error naming the
/// last good checkpoint, nothing earlier damaged, and the run resumes to the same adapter.
#[test]
fn write_failures_name_the_last_good_checkpoint_and_damage_nothing() {
    let r = reference();
    let cases = [
        (
            "enospc",
            point(r, "write", |p| {
                in_checkpoint(p, 3) && p.contains("optimizer")
            }),
            "checkpoint-2",
            "No space left on device",
        ),
        (
            "erofs",
            point(r, "rename", |p| in_checkpoint(p, 5)),
            "checkpoint-4",
            "Read-only file system",
        ),
        (
            "eio",
            point(r, "append", |_| true),
            "written yet",
            "Input/output error",
        ),
        (
            "enospc",
            point(r, "create", is_final_adapter),
            "checkpoint-6",
            "No space left on device",
        ),
        (
            "gone",
            point(r, "mkdir", |p| in_checkpoint(p, 4)),
            "checkpoint-3",
            "output folder itself is gone",
        ),
    ];
    for (kind, at, last_good, why) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        let e = run(&out, &[], &[("QLORA_FAULT", format!("{kind}@{at}"))]);
        assert_eq!(e.code, Some(1), "{kind}@{at}: {e:?}");
        assert!(
            e.stderr.contains(last_good) && e.stderr.contains(why),
            "{kind}@{at}:\n{}",
            e.stderr
        );
        let out = if kind == "gone" {
            let gone = tmp.path().join("o.gone");
            assert!(!out.exists());
            std::fs::rename(&gone, &out).unwrap();
            out
        } else {
            out
        };
        check_invariants(&out, r);
        assert!(!out.join(WEIGHTS).exists());
        resume_to_end(&out, r);
    }
    // A finished run resumed again on a full disk keeps its adapter intact.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    copy_reference(r, &out);
    let log = tmp.path().join("log");
    let e = run(
        &out,
        &["--resume"],
        &[("QLORA_FAULT_LOG", log.display().to_string())],
    );
    assert!(e.ok(), "{e:?}");
    let points = read_log(&log);
    let at = 1 + points
        .iter()
        .position(|(s, p)| s == "write" && p.contains(WEIGHTS))
        .unwrap();
    let e = run(
        &out,
        &["--resume"],
        &[("QLORA_FAULT", format!("enospc@{at}"))],
    );
    assert_eq!(e.code, Some(1), "{e:?}");
    assert!(e.stderr.contains("checkpoint-6"), "{}", e.stderr);
    check_invariants(&out, r);
    assert!(out.join(WEIGHTS).exists());
}

/// Issue 12, item 5: one writer per output folder, with or without `--overwrite`; the lock is
/// released on exit, and one left by a killed run is taken over.
#[test]
fn a_second_writer_is_refused_and_a_stale_lock_is_taken_over() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let (mut child, rx, seen) = long_run(&out);
    let pid = child.id().to_string();
    for extra in [&[][..], &["--overwrite"][..], &["--resume"][..]] {
        let e = run(&out, extra, &[]);
        assert_eq!(e.code, Some(1), "{extra:?}: {e:?}");
        assert!(
            e.stderr.contains("another `qlora train` is writing") && e.stderr.contains(&pid),
            "{extra:?}: {}",
            e.stderr
        );
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first run was disturbed"
    );
    kill(&child, "-TERM");
    assert!(child.wait().unwrap().success(), "{}", rest(rx, seen));
    assert!(
        !out.join(qlora::durable::lock::LOCK_FILE).exists(),
        "lock left behind"
    );

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let e = run(&out, &[], &[("QLORA_FAULT", "kill@30".into())]);
    assert!(e.killed());
    let lock = std::fs::read_to_string(out.join(qlora::durable::lock::LOCK_FILE)).unwrap();
    assert!(lock.starts_with("pid "), "{lock}");
    let e = run(&out, &["--resume"], &[]);
    assert!(e.ok(), "{e:?}");
    assert!(
        e.stderr.contains("taking over the lock") && e.stderr.contains(lock.trim()),
        "{}",
        e.stderr
    );
    check_invariants(&out, r);
}
