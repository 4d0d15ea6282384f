//! `qlora train --config run.toml`: the settings of a TOML file as `qlora train` flags.
//!
//! Each key is a long flag with `_` or `-` (`learning_rate = 1e-4`, `target_modules = ["q_proj",
//! "v_proj"]`, `packing = true`). The caller says which flags exist and whether they take a
//! value (the binary asks clap), so this stays a pure function of the text: parsed once, in
//! bounded time and memory, tested by the fuzz target `run_config_toml` in `tests/fuzz/`. The
//! `toml` crate parses nested arrays and inline tables recursively with no depth limit (the fuzz
//! target overflowed the stack with 20,000 `[`), so the nesting depth is checked first.

use crate::error::{Error, Result};

/// The deepest nesting of arrays and inline tables accepted (a run config needs 1).
pub const MAX_NESTING: usize = 64;

/// The deepest nesting of `[` / `{` in TOML `text` outside strings and comments (table headers
/// count for their line). Conservative: never less than what the parser recurses on.
fn nesting_depth(text: &str) -> usize {
    let b = text.as_bytes();
    // The end of the string starting at `i` (quote `q`, tripled when `multi`).
    let skip_string = |mut i: usize, q: u8, multi: bool| -> usize {
        i += if multi { 3 } else { 1 };
        while i < b.len() {
            if b[i] == b'\\' && q == b'"' {
                i += 2;
            } else if !multi && b[i] == b'\n' {
                return i;
            } else if b[i] == q && (!multi || b[i..].starts_with(&[q, q, q])) {
                return i + if multi { 3 } else { 1 };
            } else {
                i += 1;
            }
        }
        i
    };
    let (mut i, mut depth, mut max) = (0, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            q @ (b'"' | b'\'') => {
                let multi = b[i..].starts_with(&[q, q, q]);
                i = skip_string(i, q, multi);
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    max
}

/// What a known long flag is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagKind {
    /// An on/off switch: `true` adds it, `false` leaves it out.
    Switch,
    /// A flag with a value: strings, integers and floats as written; a list of strings joined
    /// with commas.
    Value,
}

/// The flags `text` (the TOML file `path`, for messages) stands for, sorted by key
/// (the order does not matter to clap). `kind`
/// names the flags that exist (by their long name, with dashes); the key `config` is refused (a
/// config file cannot name another).
pub fn config_flags(
    path: &str,
    text: &str,
    kind: impl Fn(&str) -> Option<FlagKind>,
) -> Result<Vec<String>> {
    let bad = |msg: String| Error::bad_file(path, msg);
    let depth = nesting_depth(text);
    if depth > MAX_NESTING {
        return Err(bad(format!(
            "arrays or tables nested {depth} deep (the limit is {MAX_NESTING})"
        )));
    }
    let table: toml::Table =
        toml::from_str(text).map_err(|e| bad(format!("not valid TOML: {e}")))?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(kind) = kind(&long) else {
            return Err(bad(format!(
                "unknown setting `{key}` (settings are the long flags of `qlora train`, e.g. learning_rate = 1e-4)"
            )));
        };
        if long == "config" {
            return Err(bad("a config file cannot name another config file".into()));
        }
        let takes_value = kind == FlagKind::Value;
        let flag = format!("--{long}");
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    flags.push(flag);
                }
            }
            toml::Value::String(s) if takes_value => flags.extend([flag, s.clone()]),
            toml::Value::Integer(n) if takes_value => flags.extend([flag, n.to_string()]),
            toml::Value::Float(x) if takes_value => flags.extend([flag, x.to_string()]),
            toml::Value::Array(items) if takes_value => {
                let parts = items
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(s) => Ok(s.clone()),
                        other => Err(bad(format!(
                            "`{key}` must be a list of strings, found a {}",
                            other.type_str()
                        ))),
                    })
                    .collect::<Result<Vec<String>>>()?;
                flags.extend([flag, parts.join(",")]);
            }
            other => {
                return Err(bad(format!(
                    "`{key}` has the wrong type ({}): {}",
                    other.type_str(),
                    if takes_value {
                        "expected a string, number or list"
                    } else {
                        "expected true or false"
                    }
                )))
            }
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(long: &str) -> Option<FlagKind> {
        match long {
            "packing" => Some(FlagKind::Switch),
            "learning-rate" | "target-modules" | "lora-r" | "config" => Some(FlagKind::Value),
            _ => None,
        }
    }

    #[test]
    fn settings_become_flags() {
        let flags = config_flags(
            "run.toml",
            "learning_rate = 1e-4\ntarget_modules = [\"q_proj\", \"v_proj\"]\npacking = true\nlora-r = 16\n",
            kind,
        )
        .unwrap();
        assert_eq!(
            flags,
            [
                "--learning-rate",
                "0.0001",
                "--lora-r",
                "16",
                "--packing",
                "--target-modules",
                "q_proj,v_proj",
            ]
        );
    }

    #[test]
    fn nesting_is_counted_outside_strings_and_comments() {
        assert_eq!(nesting_depth("a = [[1], [2]]\n[t]\nb = {c = [1]}"), 2);
        assert_eq!(nesting_depth("a = \"[[[\\\"[[\"\nb = '[[[' # [[[[\n"), 0);
        assert_eq!(nesting_depth("a = \"\"\"\n[[[\n\"\"\" \nb = '''[[\n'''"), 0);
    }

    #[test]
    fn bad_files_are_clean_errors() {
        for (text, want) in [
            ("learning_rate = ", "not valid TOML"),
            ("nope = 1", "unknown setting `nope`"),
            ("config = \"x.toml\"", "cannot name another config file"),
            ("packing = 1", "expected true or false"),
            ("target_modules = [1]", "must be a list of strings"),
            ("learning_rate = {a = 1}", "wrong type (table)"),
            (&format!("x = {}", "[".repeat(20_000)), "nested 20000 deep"),
        ] {
            let e = config_flags("run.toml", text, kind)
                .unwrap_err()
                .to_string();
            assert!(e.contains("run.toml: ") && e.contains(want), "{text}: {e}");
        }
    }
}
