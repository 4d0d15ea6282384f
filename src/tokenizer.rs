//! Tokenizer: `tokenizer.json` through the `tokenizers` crate, plus the special tokens and chat
//! template from `tokenizer_config.json` (rendered with minijinja, Python-compatible methods on).
//!
//! Special-token rule (the one transformers users expect): text is encoded with the tokenizer's
//! own post-processor (for Llama-2 that prepends `<s>`), special-token strings written in the text
//! (`<s>`, `</s>`) map to their ids, and when the text itself already began with BOS the
//! post-processor's extra BOS is dropped, so a guanaco row `<s>[INST] …` never gets a double BOS.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One chat message, as `apply_chat_template` expects it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A token's byte span `[start, end)` in the encoded text.
pub type TokenSpan = (usize, usize);

/// A loaded tokenizer with its special tokens and optional chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    chat_template: Option<String>,
}

/// Special tokens in tokenizer_config.json are either plain strings or AddedToken objects.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required) and `tokenizer_config.json` (optional) from a model folder.
    /// A separate `chat_template.jinja` is used when the config has no template.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::NotFound(format!(
                "{}: tokenizer.json not found (qlora needs the Hugging Face fast-tokenizer file)",
                path.display()
            )));
        }
        let inner = load_tokenizer_json(&path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::bad_file(&cfg_path, format!("malformed JSON: {e}")))?
        } else {
            Value::Null
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.is_file() {
            chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        let bos_token = token_str(cfg.get("bos_token"));
        let eos_token = token_str(cfg.get("eos_token"));
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(Tokenizer {
            inner,
            path,
            bos_token,
            eos_token,
            bos_id,
            eos_id,
            chat_template,
        })
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of ids the tokenizer can produce, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes with the tokenizer's own special-token rules, without a double BOS (see module doc).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_raw(text, true)?;
        if let Some(bos) = self.bos_id {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0);
            }
        }
        Ok(ids)
    }

    /// [`Tokenizer::encode`] with each token's byte span `[start, end)` in `text` (special tokens
    /// added by the post-processor, such as BOS, have an empty span).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<TokenSpan>)> {
        let enc = self.guarded("encode", || self.inner.encode(text, true))?;
        let mut ids = enc.get_ids().to_vec();
        let mut offsets = enc.get_offsets().to_vec();
        if let Some(bos) = self.bos_id {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0);
                offsets.remove(0);
            }
        }
        Ok((ids, offsets))
    }

    /// Plain `tokenizers` encode; `add_special` runs the post-processor.
    pub fn encode_raw(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.guarded("encode", || self.inner.encode(text, add_special))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.guarded("decode", || self.inner.decode(ids, skip_special))
    }

    /// Runs a `tokenizers` call, turning its error, or its panic, into [`Error::Tokenizer`]. The
    /// crate panics on some malformed files that it loads without complaint (a template
    /// post-processor naming a special token it does not define: "no entry found for key" in
    /// `processors/template.rs`, found by the fuzz target `tokenizer_json`). Unwind-safe: the
    /// tokenizer is only read.
    fn guarded<T>(&self, what: &str, f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
        let fail = |msg: String| {
            Error::Tokenizer(format!("{}: {what} failed: {msg}", self.path.display()))
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => r.map_err(|e| fail(e.to_string())),
            Err(panic) => Err(fail(format!(
                "the tokenizer file is malformed (the tokenizers library panicked: {})",
                panic_message(&*panic)
            ))),
        }
    }

    /// Incremental detokenizer for streaming output: feed ids, get text once it forms whole characters.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tok: self,
            ids: Vec::new(),
            printed: 0,
        }
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template, as transformers' `apply_chat_template`
    /// (variables `messages`, `bos_token`, `eos_token`, `add_generation_prompt`; `raise_exception`).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{}: no chat_template in tokenizer_config.json (or chat_template.jinja); use a plain prompt without --chat",
                self.path.parent().unwrap_or(Path::new(".")).display()
            ))
        })?;
        render_chat_template(
            template,
            messages,
            self.bos_token.as_deref().unwrap_or_default(),
            self.eos_token.as_deref().unwrap_or_default(),
            add_generation_prompt,
        )
    }
}

/// Parses `tokenizer.json`. The `tokenizers` crate panics on some malformed files (a decoder
/// entry that fits none of its forms: `expect("Helper")` in `decoders/mod.rs`, found by the fuzz
/// target `tokenizer_json`), so its parser runs under `catch_unwind` and a panic becomes an error.
fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bad = |msg: String| Error::bad_file(path, format!("cannot load tokenizer: {msg}"));
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    // Unwind-safe: the closure only reads `text`; no state it touches outlives a panic.
    let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>());
    match parsed {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(bad(e.to_string())),
        Err(panic) => Err(bad(format!(
            "the file is malformed (the tokenizers library panicked: {})",
            panic_message(&*panic)
        ))),
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}

/// The largest chat template accepted (real ones are a few kB; the longest known are ~20 kB).
pub const MAX_CHAT_TEMPLATE_BYTES: usize = 1 << 20;
/// The longest line of a chat template, in characters: minijinja counts columns in a `u16` and
/// overflows past it on a syntax error (a panic, found by the fuzz target `chat_template`).
pub const MAX_CHAT_TEMPLATE_LINE: usize = 60_000;

/// Refuses a template too large for the renderer's limits (see the constants).
fn check_template_size(template: &str) -> Result<()> {
    if template.len() > MAX_CHAT_TEMPLATE_BYTES {
        return Err(Error::Tokenizer(format!(
            "chat template is {} bytes, more than the limit of {MAX_CHAT_TEMPLATE_BYTES}",
            template.len()
        )));
    }
    for (i, line) in template.split('\n').enumerate() {
        if line.len() > MAX_CHAT_TEMPLATE_LINE && line.chars().count() > MAX_CHAT_TEMPLATE_LINE {
            return Err(Error::Tokenizer(format!(
                "chat template line {} is longer than {MAX_CHAT_TEMPLATE_LINE} characters",
                i + 1
            )));
        }
    }
    Ok(())
}

/// Instructions one chat-template render may execute (minijinja fuel): a base allowance plus an
/// allowance per message. Real templates spend far less (measured in the tests: Llama-2's ~25,
/// ChatML's ~15, Llama-3's ~30 per message, plus a few dozen), so a template that loops (a
/// `range(100000)` nested in another) stops with an error in well under a second instead of
/// running for hours.
pub const CHAT_TEMPLATE_FUEL_BASE: u64 = 100_000;
/// See [`CHAT_TEMPLATE_FUEL_BASE`].
pub const CHAT_TEMPLATE_FUEL_PER_MESSAGE: u64 = 2_000;
/// Nesting depth of macro calls, includes, loops and conditions in a chat template render (real
/// templates stay below 10; minijinja's own cap is 500).
pub const CHAT_TEMPLATE_RECURSION_LIMIT: usize = 100;
/// Largest rendered conversation: the messages' own bytes plus this allowance for the template's
/// markup, times [`CHAT_TEMPLATE_OUTPUT_FACTOR`].
pub const CHAT_TEMPLATE_OUTPUT_BASE: usize = 1 << 20;
/// See [`CHAT_TEMPLATE_OUTPUT_BASE`].
pub const CHAT_TEMPLATE_OUTPUT_FACTOR: usize = 4;

/// Renders a chat template as transformers' `apply_chat_template` does (variables `messages`,
/// `bos_token`, `eos_token`, `add_generation_prompt`; `raise_exception`; Python string methods),
/// in bounded time and memory: the render runs on [fuel](CHAT_TEMPLATE_FUEL_BASE), with a
/// [recursion limit](CHAT_TEMPLATE_RECURSION_LIMIT), and its output is capped
/// ([`CHAT_TEMPLATE_OUTPUT_BASE`]); a template that exceeds any of them is an error saying which.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    let fuel = CHAT_TEMPLATE_FUEL_BASE
        .saturating_add(CHAT_TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64));
    env.set_fuel(Some(fuel));
    env.set_recursion_limit(CHAT_TEMPLATE_RECURSION_LIMIT);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    check_template_size(template)?;
    env.add_template("chat", template)
        .map_err(|e| Error::Tokenizer(format!("chat template does not parse: {e}")))?;
    let tmpl = env.get_template("chat").expect("template was just added");
    let content: usize = messages
        .iter()
        .map(|m| m.role.len() + m.content.len())
        .sum();
    let limit = content
        .saturating_add(CHAT_TEMPLATE_OUTPUT_BASE)
        .saturating_mul(CHAT_TEMPLATE_OUTPUT_FACTOR);
    let mut out = CappedWriter {
        buf: Vec::new(),
        limit,
        hit: false,
    };
    let rendered = tmpl.render_captured_to(
        minijinja::context! {
            messages => messages,
            bos_token => bos_token,
            eos_token => eos_token,
            add_generation_prompt => add_generation_prompt,
        },
        &mut out,
    );
    match rendered {
        Ok(_) => String::from_utf8(out.buf)
            .map_err(|e| Error::Tokenizer(format!("chat template output is not UTF-8: {e}"))),
        Err(e) if out.hit => Err(Error::Tokenizer(format!(
            "chat template failed: its output exceeds {limit} bytes ({e})"
        ))),
        Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::Tokenizer(format!(
            "chat template failed: it runs more than {fuel} instructions for {} message(s) (a loop that does not end?): {e}",
            messages.len()
        ))),
        Err(e) => Err(Error::Tokenizer(format!("chat template failed: {e}"))),
    }
}

/// An output buffer that fails once it would pass `limit` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    limit: usize,
    /// The limit was reached (minijinja reports only a generic write error).
    hit: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.hit = true;
            return Err(std::io::Error::other("output limit reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streaming detokenizer: re-decodes the pending tail so multi-byte characters split across
/// tokens are printed only once complete.
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl TokenStream<'_> {
    /// Adds one id; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.printed
            || !text.is_char_boundary(self.printed)
        {
            return Ok(None);
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(Some(new))
    }
}
