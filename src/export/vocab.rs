//! Tokenizer metadata (`tokenizer.ggml.*`) from a Hugging Face `tokenizer.json` and
//! `tokenizer_config.json`.
//!
//! Two kinds of BPE vocabulary are written, as llama.cpp's converter names them:
//! - `llama` (SentencePiece BPE with byte fallback, Llama 2): tokens, scores and token types.
//!   `<0xXX>` tokens are BYTE, the unknown token UNKNOWN, special added tokens CONTROL, other
//!   added tokens USER_DEFINED. llama.cpp's SentencePiece tokenizer merges the adjacent pair
//!   whose result has the highest score; without `tokenizer.model` (which holds the original
//!   scores) the score of a token made by a merge is minus the rank of its first merge in
//!   `tokenizer.json`, which gives the same merge priority as the Hugging Face tokenizer. Tokens
//!   no merge produces (single symbols, bytes, specials) never compete and score 0.
//! - `gpt2` (byte-level BPE, e.g. SmolLM2, Llama 3): tokens, token types and merges.
//!   `tokenizer.ggml.pre` selects llama.cpp's pre-tokenizer regex, identified as the converter does
//!   by hashing a tokenization ([`super::pre`]); `default` when unknown.
//!
//! Ids missing from the vocabulary up to the model's `vocab_size` become `[PAD<i>]` (UNUSED), as
//! in the converter; added tokens that are special or look special (`<|...|>`) are CONTROL, other
//! added tokens USER_DEFINED (with `▁` written as a space in byte-level vocabularies). Special ids (bos, eos, unk, pad) come from the token
//! strings in `tokenizer_config.json`, else from `config.json`.

use super::gguf::{Array, GgufWriter, Value};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's `llama_token_type`.
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("malformed JSON: {e}")))
}

/// `"a b"` or `["a", "b"]` → `("a", "b")`; a space inside a pair part is written `Ġ` (U+0120),
/// as gguf-py's `SpecialVocab` does.
fn merge_pair(m: &Json) -> Option<(String, String)> {
    match m {
        Json::String(s) => s
            .split_once(' ')
            .map(|(a, b)| (a.to_string(), b.to_string())),
        Json::Array(v) if v.len() == 2 => {
            let part = |x: &Json| x.as_str().map(|s| s.replace(' ', "\u{120}"));
            Some((part(&v[0])?, part(&v[1])?))
        }
        _ => None,
    }
}

/// A special token named in `tokenizer_config.json` (a string or `{"content": ...}`).
fn config_token(tc: &Json, key: &str) -> Option<String> {
    match tc.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The chat template: `tokenizer_config.json`'s string, the `default` one of a named list,
/// `chat_template.json`'s, or `chat_template.jinja`.
fn chat_template(dir: &Path, tc: &Json) -> Option<String> {
    let alt = read_json(&dir.join("chat_template.json"))
        .ok()
        .and_then(|j| j.get("chat_template").cloned());
    match tc.get("chat_template").or(alt.as_ref()) {
        Some(Json::String(s)) => return Some(s.clone()),
        Some(Json::Array(list)) => {
            let t = list
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str());
            if let Some(t) = t {
                return Some(t.to_string());
            }
        }
        _ => {}
    }
    std::fs::read_to_string(dir.join("chat_template.jinja")).ok()
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>')
}

/// Text and llama.cpp token type of id `i` (`t`: text, added, special), as the converter writes it.
fn token_entry(
    i: usize,
    t: Option<&(String, bool, bool)>,
    unk: Option<usize>,
    kind: &str,
) -> (String, i32) {
    let Some((s, added, special)) = t else {
        return (format!("[PAD{i}]"), token_type::UNUSED);
    };
    let looks_special = s.starts_with("<|") && s.ends_with("|>");
    if Some(i) == unk && kind == "llama" {
        (s.clone(), token_type::UNKNOWN)
    } else if *special || (*added && looks_special) {
        (s.clone(), token_type::CONTROL)
    } else if *added && kind == "gpt2" {
        // The converter pre-normalizes user-defined spaces.
        (s.replace('\u{2581}', " "), token_type::USER_DEFINED)
    } else if *added {
        (s.clone(), token_type::USER_DEFINED)
    } else if kind == "llama" && is_byte_token(s) {
        (s.clone(), token_type::BYTE)
    } else {
        (s.clone(), token_type::NORMAL)
    }
}

/// llama.cpp's name for the byte-level pre-tokenizer of the tokenizer in `dir` ([`super::pre`]),
/// `default` (with a warning) when the hash is unknown.
fn pre_tokenizer(dir: &Path) -> &'static str {
    match super::pre::chkhsh(dir) {
        Ok(h) => super::pre::name_of(&h).unwrap_or_else(|| {
            tracing::warn!(chkhsh = %h, "pre-tokenizer unknown to llama.cpp's converter: tokenizer.ggml.pre = default");
            "default"
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot hash the pre-tokenizer: tokenizer.ggml.pre = default");
            "default"
        }
    }
}

/// Adds the `tokenizer.ggml.*` keys for the tokenizer in `dir`; returns the kind written.
pub fn add_tokenizer(g: &mut GgufWriter, dir: &Path, cfg: &ModelConfig) -> Result<&'static str> {
    let tj_path = dir.join("tokenizer.json");
    let tj = read_json(&tj_path)?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.exists() {
        read_json(&tc_path)?
    } else {
        Json::Null
    };
    let (model, kind) = bpe_model(&tj, &tj_path)?;
    let tokens = token_slots(&tj, model, &tj_path, cfg.vocab_size)?;
    let merges: Vec<(String, String)> = model
        .get("merges")
        .and_then(Json::as_array)
        .map(|m| m.iter().filter_map(merge_pair).collect())
        .unwrap_or_default();

    let id_of: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.as_ref().map(|(s, _, _)| (s.as_str(), i)))
        .collect();
    let unk = special_id(&tc, &id_of, "unk_token");

    let (texts, types): (Vec<String>, Vec<i32>) = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| token_entry(i, t.as_ref(), unk, kind))
        .unzip();

    add_vocab(g, dir, kind, texts, types, &merges, &id_of);
    for (name, id) in special_ids(&tc, &id_of, cfg, unk) {
        if let Some(id) = id {
            g.add(
                &format!("tokenizer.ggml.{name}_token_id"),
                Value::U32(id as u32),
            );
        }
    }
    add_config_flags(g, dir, &tc);
    Ok(kind)
}

/// `tokenizer.json`'s `model` and its BPE kind (`llama` or `gpt2`); anything else is refused.
fn bpe_model<'a>(tj: &'a Json, tj_path: &Path) -> Result<(&'a Json, &'static str)> {
    let model = tj
        .get("model")
        .ok_or_else(|| Error::bad_file(tj_path, "no `model`"))?;
    let mtype = model.get("type").and_then(Json::as_str).unwrap_or("");
    if mtype != "BPE" {
        return Err(Error::Unsupported(format!(
            "{}: tokenizer model {mtype:?}; GGUF export handles BPE vocabularies \
             (SentencePiece BPE with byte fallback, byte-level BPE)",
            tj_path.display()
        )));
    }
    let byte_level = |k: &str| {
        tj.get(k)
            .is_some_and(|v| v.to_string().contains("ByteLevel"))
    };
    let kind = if model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        "llama"
    } else if byte_level("pre_tokenizer") || byte_level("decoder") {
        "gpt2"
    } else {
        return Err(Error::Unsupported(format!(
            "{}: a BPE tokenizer that is neither byte-fallback (SentencePiece) nor byte-level",
            tj_path.display()
        )));
    };
    Ok((model, kind))
}

/// id → (text, added, special) for ids `0..n` from `model.vocab` and `added_tokens` (None: no token).
fn token_slots(
    tj: &Json,
    model: &Json,
    tj_path: &Path,
    n: usize,
) -> Result<Vec<Option<(String, bool, bool)>>> {
    let mut tokens: Vec<Option<(String, bool, bool)>> = vec![None; n];
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| Error::bad_file(tj_path, "model.vocab is not an object"))?;
    let mut put = |id: u64, text: &str, added: bool, special: bool| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            Error::bad_file(
                tj_path,
                format!("token {text:?} has id {id}, beyond the model's vocab_size {n}"),
            )
        })?;
        *slot = Some((text.to_string(), added, special));
        Ok(())
    };
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| Error::bad_file(tj_path, format!("vocab id of {text:?}")))?;
        put(id, text, false, false)?;
    }
    for t in tj
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(text)) = (
            t.get("id").and_then(Json::as_u64),
            t.get("content").and_then(Json::as_str),
        ) else {
            return Err(Error::bad_file(tj_path, "added token without id/content"));
        };
        let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
        put(id, text, true, special)?;
    }
    Ok(tokens)
}

/// The id of the special token `key` of `tokenizer_config.json`, if it is in the vocabulary.
fn special_id(tc: &Json, id_of: &HashMap<&str, usize>, key: &str) -> Option<usize> {
    config_token(tc, key).and_then(|s| id_of.get(s.as_str()).copied())
}

/// (name, id) of bos, eos, unknown, padding: `tokenizer_config.json`'s tokens, else `config.json`.
fn special_ids(
    tc: &Json,
    id_of: &HashMap<&str, usize>,
    cfg: &ModelConfig,
    unk: Option<usize>,
) -> [(&'static str, Option<usize>); 4] {
    let special_id = |key: &str| special_id(tc, id_of, key);
    [
        (
            "bos",
            special_id("bos_token").or(cfg.bos_token_id.map(|x| x as usize)),
        ),
        (
            "eos",
            special_id("eos_token").or(cfg.eos_token_ids.first().map(|&x| x as usize)),
        ),
        ("unknown", unk),
        ("padding", special_id("pad_token")),
    ]
}

/// Per-token scores of a `llama` vocabulary: −1 − rank of the first merge making it, else 0.
fn merge_scores(
    merges: &[(String, String)],
    id_of: &HashMap<&str, usize>,
    types: &[i32],
) -> Vec<f32> {
    let n = types.len();
    let mut scores = vec![0f32; n];
    let mut seen = vec![false; n];
    for (rank, (a, b)) in merges.iter().enumerate() {
        if let Some(&id) = id_of.get(format!("{a}{b}").as_str()) {
            if !seen[id] && types[id] == token_type::NORMAL {
                seen[id] = true;
                scores[id] = -(rank as f32) - 1.0;
            }
        }
    }
    scores
}

/// Adds model, pre-tokenizer, tokens, token types, and scores (`llama`) or merges (`gpt2`).
fn add_vocab(
    g: &mut GgufWriter,
    dir: &Path,
    kind: &'static str,
    texts: Vec<String>,
    types: Vec<i32>,
    merges: &[(String, String)],
    id_of: &HashMap<&str, usize>,
) {
    g.add("tokenizer.ggml.model", Value::Str(kind.into()));
    let pre = if kind == "gpt2" {
        pre_tokenizer(dir)
    } else {
        "default"
    };
    g.add("tokenizer.ggml.pre", Value::Str(pre.into()));
    if kind == "llama" {
        let scores = merge_scores(merges, id_of, &types);
        g.add("tokenizer.ggml.tokens", Value::Array(Array::Str(texts)));
        g.add("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
        g.add("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
    } else {
        g.add("tokenizer.ggml.tokens", Value::Array(Array::Str(texts)));
        g.add("tokenizer.ggml.token_type", Value::Array(Array::I32(types)));
        if !merges.is_empty() {
            let m = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
            g.add("tokenizer.ggml.merges", Value::Array(Array::Str(m)));
        }
    }
}

/// Adds `tokenizer_config.json`'s add-bos/eos/space-prefix flags and the chat template, if present.
fn add_config_flags(g: &mut GgufWriter, dir: &Path, tc: &Json) {
    for key in ["add_bos_token", "add_eos_token"] {
        if let Some(b) = tc.get(key).and_then(Json::as_bool) {
            g.add(&format!("tokenizer.ggml.{key}"), Value::Bool(b));
        }
    }
    if let Some(b) = tc.get("add_prefix_space").and_then(Json::as_bool) {
        g.add("tokenizer.ggml.add_space_prefix", Value::Bool(b));
    }
    if let Some(t) = chat_template(dir, tc) {
        g.add("tokenizer.chat_template", Value::Str(t));
    }
}
