//! The fuzz harness: real fixture files as seeds, structure-aware mutations of them generated
//! (and, on a failure, shrunk) by bolero, and the three checks of every case:
//!
//! - **no panic**: bolero runs each case under `catch_unwind` and fails the test with the case
//!   (and its seed, `BOLERO_RANDOM_SEED=…`, to replay it);
//! - **no hang**: a watchdog thread aborts the process, printing the case, when one case runs
//!   longer than [`HANG_LIMIT`];
//! - **no unbounded allocation**: the test binary's global allocator counts the bytes live on the
//!   fuzzing thread; a case whose peak exceeds [`case_memory_limit`] of its input fails, and a
//!   single request above [`HARD_LIMIT`] is refused outright (the process aborts naming the case)
//!   before it can take the machine's memory.
//!
//! Budget: `QLORA_FUZZ_CASES` cases per target (default: each target's CI budget, 400 to 2,000;
//! the README's long run sets 100000) and at most `QLORA_FUZZ_SECONDS` seconds per target
//! (default 20). bolero's own `BOLERO_RANDOM_ITERATIONS` / `BOLERO_RANDOM_TEST_TIME_MS` /
//! `BOLERO_RANDOM_SEED` take precedence. With `QLORA_FUZZ_REPORT=FILE` each target appends one
//! JSON line with its figures.

use bolero::generator::TypeGenerator;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Allocation accounting

/// A single allocation larger than this is refused: no input of a few MB may ask for it.
pub const HARD_LIMIT: usize = 2 << 30;

/// The most a case may hold live at once on the fuzzing thread, above what was live when it
/// started: 256 MiB plus 64 bytes per input byte (parsed JSON and tokenizers take a few tens of
/// bytes per input byte; anything sized by a number *in* the input rather than by the input is
/// what this catches).
pub fn case_memory_limit(input_len: usize) -> usize {
    (256 << 20) + 64 * input_len
}

/// The global allocator of the fuzz binary: `System`, counting per thread.
pub struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    /// What the thread is fuzzing, for the message when an allocation is refused.
    static CURRENT: RefCell<String> = const { RefCell::new(String::new()) };
}

fn add(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + n as isize;
        l.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

fn sub(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get() - n as isize));
}

/// Prints why the process is about to abort (the allocator returns null, and Rust then aborts
/// with "memory allocation of N bytes failed"), without allocating.
fn refuse(size: usize) {
    let mut err = std::io::stderr();
    let _ = writeln!(
        err,
        "\nfuzz: refusing an allocation of {size} bytes (limit {HARD_LIMIT}): an input asked for unbounded memory"
    );
    let _ = CURRENT.try_with(|c| {
        if let Ok(c) = c.try_borrow() {
            let _ = err.write_all(c.as_bytes());
            let _ = err.write_all(b"\n");
        }
    });
}

// SAFETY: every method forwards to `System` with the same arguments (or returns null, which the
// contract allows); the bookkeeping touches only const-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_LIMIT {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > HARD_LIMIT {
            refuse(layout.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > HARD_LIMIT {
            refuse(new_size);
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            sub(layout.size());
            add(new_size);
        }
        p
    }
}

/// Starts measuring this thread's peak; returns the baseline.
fn peak_reset() -> isize {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(live));
    live
}

fn peak_since(base: isize) -> usize {
    (PEAK.with(Cell::get) - base).max(0) as usize
}

/// Runs `f` and returns its result with the most bytes it held live at once on this thread
/// (above what was live before it started).
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = peak_reset();
    let r = f();
    (r, peak_since(base))
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// A JSON / TOML / Jinja fragment inserted somewhere: structure that parsers branch on.
#[derive(Debug, Clone, Copy, TypeGenerator)]
pub enum Token {
    OpenBrace,
    CloseBrace,
    OpenBracket,
    CloseBracket,
    Quote,
    Comma,
    Colon,
    Null,
    True,
    EscapedNul,
    LoneSurrogate,
    Bom,
    Newline,
    Metadata,
    HugeShape,
    HugeOffsets,
    DtypeF64,
    JinjaOpen,
    JinjaLoop,
    JinjaRecursion,
    JinjaRepeat,
    JinjaSelfConcat,
    TomlTable,
    TomlArrayTable,
}

impl Token {
    fn text(self) -> &'static str {
        match self {
            Token::OpenBrace => "{",
            Token::CloseBrace => "}",
            Token::OpenBracket => "[",
            Token::CloseBracket => "]",
            Token::Quote => "\"",
            Token::Comma => ",",
            Token::Colon => ":",
            Token::Null => "null",
            Token::True => "true",
            Token::EscapedNul => "\\u0000",
            Token::LoneSurrogate => "\\ud800",
            Token::Bom => "\u{feff}",
            Token::Newline => "\n",
            Token::Metadata => "\"__metadata__\":{\"format\":\"pt\"},",
            Token::HugeShape => "\"shape\":[4294967296,4294967296],",
            Token::HugeOffsets => "\"data_offsets\":[0,18446744073709551615],",
            Token::DtypeF64 => "\"dtype\":\"F64\",",
            Token::JinjaOpen => "{%",
            Token::JinjaLoop => "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            Token::JinjaRecursion => "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
            Token::JinjaRepeat => "{{ 'x' * 1000000000 }}",
            // Linear growth, quadratic copying: stopped by fuel. (Doubling a string in a loop,
            // `s.v ~ s.v`, is not here: minijinja bounds instructions, not bytes, so that
            // exhausts memory with little fuel; see the README, "Fuzzing and input guards".)
            Token::JinjaSelfConcat => "{% set s = namespace(v='') %}{% for i in range(1000000) %}{% set s.v = s.v ~ 'xxxxxxxx' %}{% endfor %}{{ s.v|length }}",
            Token::TomlTable => "\n[a]\n",
            Token::TomlArrayTable => "\n[[a]]\n",
        }
    }
}

/// A number written in place of one already in the text: sizes, counts, offsets, ids.
#[derive(Debug, Clone, Copy, TypeGenerator)]
pub enum Number {
    Zero,
    MinusOne,
    One,
    Two,
    Odd,
    U8Max,
    U16Max,
    I32Max,
    U32Max,
    U32Over,
    F64Exact,
    I64Max,
    I64Min,
    U64Max,
    U64Over,
    Billion,
    Million,
    Tiny,
    Huge,
    NegHuge,
    Half,
    Long,
    NaN,
    Infinity,
}

impl Number {
    fn text(self) -> &'static str {
        match self {
            Number::Zero => "0",
            Number::MinusOne => "-1",
            Number::One => "1",
            Number::Two => "2",
            Number::Odd => "7",
            Number::U8Max => "255",
            Number::U16Max => "65535",
            Number::I32Max => "2147483647",
            Number::U32Max => "4294967295",
            Number::U32Over => "4294967296",
            Number::F64Exact => "9007199254740993",
            Number::I64Max => "9223372036854775807",
            Number::I64Min => "-9223372036854775808",
            Number::U64Max => "18446744073709551615",
            Number::U64Over => "18446744073709551616",
            Number::Billion => "1000000000",
            Number::Million => "1000000",
            Number::Tiny => "1e-320",
            Number::Huge => "1e308",
            Number::NegHuge => "-1e308",
            Number::Half => "0.5",
            Number::Long => "123456789012345678901234567890",
            Number::NaN => "NaN",
            Number::Infinity => "Infinity",
        }
    }
}

/// A binary integer written over the bytes at a position (lengths, offsets, counts of binary
/// formats: the safetensors header length, Parquet's footer length, thrift fields).
#[derive(Debug, Clone, Copy, TypeGenerator)]
pub enum Int {
    Zero,
    One,
    U32Max,
    U32Over,
    I64Max,
    U64Max,
    HundredMillion,
    Gib,
    Tib,
}

impl Int {
    fn value(self) -> u64 {
        match self {
            Int::Zero => 0,
            Int::One => 1,
            Int::U32Max => u32::MAX as u64,
            Int::U32Over => 1 << 32,
            Int::I64Max => i64::MAX as u64,
            Int::U64Max => u64::MAX,
            Int::HundredMillion => 100_000_000,
            Int::Gib => 1 << 30,
            Int::Tib => 1 << 40,
        }
    }
}

#[derive(Debug, Clone, Copy, TypeGenerator)]
pub enum Bracket {
    Square,
    Curly,
    Jinja,
}

/// One edit of a seed. Positions are taken modulo the data length; when their top bit is clear
/// they fall in the seed's focus region (e.g. a safetensors header), so most edits hit the
/// bytes that are parsed rather than tensor data.
#[derive(Debug, Clone, TypeGenerator)]
pub enum Mutation {
    FlipBit {
        at: u32,
        bit: u8,
    },
    SetByte {
        at: u32,
        value: u8,
    },
    Truncate {
        at: u32,
    },
    Remove {
        at: u32,
        len: u16,
    },
    Insert {
        at: u32,
        #[generator(Vec::<u8>::produce().with().len(1usize..16))]
        bytes: Vec<u8>,
    },
    Token {
        at: u32,
        token: Token,
    },
    Number {
        nth: u16,
        number: Number,
    },
    Int {
        at: u32,
        value: Int,
        wide: bool,
    },
    Nest {
        at: u32,
        depth: u16,
        open: Bracket,
    },
    Duplicate {
        from: u32,
        len: u16,
        at: u32,
    },
    Splice {
        seed: u8,
        from: u32,
        len: u16,
        at: u32,
    },
}

/// One fuzz case: which seed, and the edits applied to it in order.
#[derive(Debug, Clone, TypeGenerator)]
pub struct Case {
    pub seed: u8,
    #[generator(Vec::<Mutation>::produce().with().len(1usize..6))]
    pub mutations: Vec<Mutation>,
}

/// A seed file: its name (for messages), bytes, and the prefix most edits go to.
#[derive(Clone)]
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
    pub focus: usize,
}

impl Seed {
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> Seed {
        let focus = bytes.len();
        Seed {
            name: name.into(),
            bytes,
            focus,
        }
    }

    /// A seed file from `tests/fixtures/<rel>`.
    pub fn fixture(rel: &str) -> Seed {
        Seed::new(rel, crate::fixture(rel))
    }

    /// A safetensors file: edits focus on the 8-byte length and the JSON header.
    pub fn safetensors(name: impl Into<String>, bytes: Vec<u8>) -> Seed {
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        Seed {
            focus: (8 + n + 16).min(bytes.len()),
            ..Seed::new(name, bytes)
        }
    }
}

fn pos(at: u32, len: usize, focus: usize) -> usize {
    if at & 0x8000_0000 == 0 && focus > 0 {
        (at as usize) % (focus.min(len) + 1)
    } else {
        ((at & 0x7fff_ffff) as usize) % (len + 1)
    }
}

/// Byte ranges of the numbers in `data` (`-`, digits, `.`, `e`, `+` after a digit).
fn numbers(data: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let starts = data[i].is_ascii_digit()
            || (data[i] == b'-' && data.get(i + 1).is_some_and(u8::is_ascii_digit));
        if starts && (i == 0 || !data[i - 1].is_ascii_alphanumeric()) {
            let s = i;
            i += 1;
            while i < data.len() && (data[i].is_ascii_digit() || b".eE+-".contains(&data[i])) {
                i += 1;
            }
            out.push((s, i));
        } else {
            i += 1;
        }
    }
    out
}

/// `seeds[case.seed]` with the case's edits applied (the result is at most a few MB larger).
pub fn mutate(seeds: &[Seed], case: &Case) -> (usize, Vec<u8>) {
    let which = case.seed as usize % seeds.len();
    let seed = &seeds[which];
    let mut d = seed.bytes.clone();
    let focus = seed.focus;
    for m in &case.mutations {
        let len = d.len();
        match m {
            Mutation::FlipBit { at, bit } => {
                if len > 0 {
                    let p = pos(*at, len - 1, focus);
                    d[p] ^= 1 << (bit % 8);
                }
            }
            Mutation::SetByte { at, value } => {
                if len > 0 {
                    let p = pos(*at, len - 1, focus);
                    d[p] = *value;
                }
            }
            Mutation::Truncate { at } => d.truncate(pos(*at, len, focus)),
            Mutation::Remove { at, len: n } => {
                let p = pos(*at, len, focus);
                let end = (p + *n as usize).min(len);
                d.drain(p..end);
            }
            Mutation::Insert { at, bytes } => {
                let p = pos(*at, len, focus);
                d.splice(p..p, bytes.iter().copied());
            }
            Mutation::Token { at, token } => {
                let p = pos(*at, len, focus);
                d.splice(p..p, token.text().bytes());
            }
            Mutation::Number { nth, number } => {
                let found = numbers(&d[..focus.min(len)]);
                if !found.is_empty() {
                    let (s, e) = found[*nth as usize % found.len()];
                    d.splice(s..e, number.text().bytes());
                }
            }
            Mutation::Int { at, value, wide } => {
                let bytes = value.value().to_le_bytes();
                let n = if *wide { 8 } else { 4 };
                if len >= n {
                    let p = pos(*at, len - n, focus);
                    d[p..p + n].copy_from_slice(&bytes[..n]);
                }
            }
            Mutation::Nest { at, depth, open } => {
                let p = pos(*at, len, focus);
                let unit: &[u8] = match open {
                    Bracket::Square => b"[",
                    Bracket::Curly => b"{\"a\":",
                    Bracket::Jinja => b"{% if x %}",
                };
                let n = *depth as usize % 20_000;
                d.splice(p..p, unit.iter().copied().cycle().take(n * unit.len()));
            }
            Mutation::Duplicate { from, len: n, at } => {
                let s = pos(*from, len, focus);
                let e = (s + *n as usize).min(len);
                let chunk = d[s..e].to_vec();
                let p = pos(*at, len, focus);
                d.splice(p..p, chunk);
            }
            Mutation::Splice {
                seed,
                from,
                len: n,
                at,
            } => {
                let other = &seeds[*seed as usize % seeds.len()];
                let olen = other.bytes.len();
                let s = pos(*from, olen, other.focus);
                let e = (s + *n as usize).min(olen);
                let p = pos(*at, len, focus);
                d.splice(p..p, other.bytes[s..e].iter().copied());
            }
        }
    }
    (which, d)
}

// ---------------------------------------------------------------------------------------------
// Running a target

/// Longest a single case may run before the watchdog calls it a hang. The slowest case of the
/// long run took under 1 s; the margin is for a case that panics, whose report (a symbolized
/// backtrace of this large debug binary, on a loaded machine) once took over 30 s and was
/// reported as a hang.
pub const HANG_LIMIT: Duration = Duration::from_secs(120);

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

/// What a target's check says about one input.
pub enum Outcome {
    /// The parser accepted it.
    Accepted,
    /// The parser refused it with a clean error (the message, for the report's examples).
    Refused(String),
}

impl<T, E: std::fmt::Display> From<Result<T, E>> for Outcome {
    fn from(r: Result<T, E>) -> Self {
        match r {
            Ok(_) => Outcome::Accepted,
            Err(e) => Outcome::Refused(e.to_string()),
        }
    }
}

/// Fuzzes one target: every seed unmodified (each must be accepted unless `seeds_may_fail`),
/// then `ci_cases` mutated cases (see the module docs for the budget). `check(seed, bytes)` runs
/// the parser on one input.
pub fn fuzz(name: &str, seeds: &[Seed], ci_cases: usize, check: impl Fn(usize, &[u8]) -> Outcome) {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    for (i, s) in seeds.iter().enumerate() {
        if let Outcome::Refused(e) = check(i, &s.bytes) {
            panic!("{name}: the unmodified seed {} is refused: {e}", s.name);
        }
    }
    let cases = env_usize("QLORA_FUZZ_CASES").unwrap_or(ci_cases);
    let seconds = env_usize("QLORA_FUZZ_SECONDS").unwrap_or(20);

    let accepted = AtomicUsize::new(0);
    let refused = AtomicUsize::new(0);
    let max_peak = AtomicUsize::new(0);
    let max_micros = AtomicU64::new(0);
    let examples: Mutex<Vec<String>> = Mutex::new(Vec::new());

    // The watchdog: the current case's start and description.
    let current: Arc<Mutex<Option<(Instant, String)>>> = Arc::new(Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (current, done, name) = (current.clone(), done.clone(), name.to_owned());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if let Some((t, desc)) = &*current.lock().unwrap_or_else(|e| e.into_inner()) {
                    if t.elapsed() > HANG_LIMIT {
                        // Straight to stderr: `eprintln!` is captured by the test harness, and
                        // the capture is lost when the process aborts.
                        let _ = writeln!(
                            std::io::stderr(),
                            "\nfuzz {name}: a case has run for over {} s (a hang): {desc}",
                            HANG_LIMIT.as_secs()
                        );
                        std::process::abort();
                    }
                }
            }
        })
    };

    let check = std::panic::AssertUnwindSafe(&check);
    let started = Instant::now();
    bolero::check!()
        .with_type::<Case>()
        .with_iterations(cases)
        .with_test_time(Duration::from_secs(seconds as u64))
        .for_each(|case: &Case| {
            // Captures the whole `AssertUnwindSafe`, not just the closure inside it.
            let check = &check;
            let (which, input) = mutate(seeds, case);
            let desc = format!(
                "target {name}, seed {}, {} bytes, case {case:?}",
                seeds[which].name,
                input.len()
            );
            CURRENT.with(|c| *c.borrow_mut() = desc.clone());
            *current.lock().unwrap() = Some((Instant::now(), desc));
            let limit = case_memory_limit(input.len());
            let base = peak_reset();
            let t0 = Instant::now();
            let outcome = (check.0)(which, &input);
            let micros = t0.elapsed().as_micros() as u64;
            let peak = peak_since(base);
            *current.lock().unwrap() = None;
            max_micros.fetch_max(micros, Ordering::Relaxed);
            max_peak.fetch_max(peak, Ordering::Relaxed);
            match outcome {
                Outcome::Accepted => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Refused(e) => {
                    if refused.fetch_add(1, Ordering::Relaxed) < 3 {
                        let mut ex = examples.lock().unwrap();
                        ex.push(e.chars().take(160).collect());
                    }
                }
            }
            assert!(
                peak <= limit,
                "{name}: one case held {peak} bytes at its peak (limit {limit} for a {}-byte input)",
                input.len()
            );
        });
    done.store(true, Ordering::Relaxed);
    let _ = watchdog.join();

    let (a, r) = (accepted.into_inner(), refused.into_inner());
    let line = format!(
        "{{\"target\": \"{name}\", \"cases\": {}, \"accepted\": {a}, \"refused\": {r}, \"panics\": 0, \"hangs\": 0, \"seconds\": {:.1}, \"slowest_case_ms\": {:.1}, \"peak_case_mib\": {:.1}}}",
        a + r,
        started.elapsed().as_secs_f64(),
        max_micros.into_inner() as f64 / 1000.0,
        max_peak.into_inner() as f64 / (1 << 20) as f64
    );
    println!("fuzz {line}");
    for e in examples.into_inner().unwrap() {
        println!("  e.g. refused: {e}");
    }
    if let Ok(path) = std::env::var("QLORA_FUZZ_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}
