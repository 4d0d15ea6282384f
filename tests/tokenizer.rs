//! Tokenizer vs. reference ids (`tokenizer_fixtures.json`, produced from the same tokenizer.json in
//! Python and cross-checked with sentencepiece), the no-double-BOS rule, and chat templates.

use qlora::tokenizer::{Message, Tokenizer};
use serde_json::Value;
use std::path::Path;

const LLAMA2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/llama-2-7b-chat-hf"
);

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn llama2_matches_reference_ids() {
    let tok = Tokenizer::from_dir(Path::new(LLAMA2)).unwrap();
    assert_eq!((tok.bos_id, tok.eos_id), (Some(1), Some(2)));
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{LLAMA2}/tokenizer_fixtures.json")).unwrap(),
    )
    .unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        assert_eq!(
            tok.encode_raw(text, false).unwrap(),
            ids(&c["ids"]),
            "{text:?}"
        );
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&c["ids_with_bos"]),
            "{text:?}"
        );
    }
    let rows = fx["guanaco_rows"].as_array().unwrap();
    let data = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/guanaco-llama2-1k/train.jsonl"
    ))
    .unwrap();
    let lines: Vec<&str> = data.lines().collect();
    for r in rows {
        let i = r["row"].as_u64().unwrap() as usize;
        let text: Value = serde_json::from_str(lines[i]).unwrap();
        let got = tok.encode(text["text"].as_str().unwrap()).unwrap();
        assert_eq!(got, ids(&r["ids"]), "guanaco row {i}");
        assert_eq!(got.len(), r["n_tokens"].as_u64().unwrap() as usize);
        // The row starts with a literal <s>: exactly one BOS.
        assert_eq!(&got[..2], &[1, 518]);
    }
}

#[test]
fn llama2_chat_template() {
    let tok = Tokenizer::from_dir(Path::new(LLAMA2)).unwrap();
    let m = |r: &str, c: &str| Message {
        role: r.into(),
        content: c.into(),
    };
    let s = tok
        .apply_chat_template(&[m("user", "Q?"), m("assistant", "A.")], false)
        .unwrap();
    assert_eq!(s, "<s>[INST] Q? [/INST] A. </s>");
    let s = tok
        .apply_chat_template(&[m("system", "S"), m("user", "Q?")], true)
        .unwrap();
    assert_eq!(s, "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ? [/INST]");
    // Roles must alternate: the template's raise_exception surfaces as an error.
    let e = tok
        .apply_chat_template(&[m("user", "a"), m("user", "b")], false)
        .unwrap_err();
    assert!(e.to_string().contains("alternate"), "{e}");
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer.json not found") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("cannot load tokenizer"),
        "{e}"
    );
}

/// All 1000 guanaco rows: our ids (tokenizer's own rules, no double BOS) equal the ids Python's
/// `tokenizers` produced from the same tokenizer.json (length + sha256 of the u32-LE ids).
#[test]
fn all_guanaco_rows_match_python() {
    use sha2::{Digest, Sha256};
    let tok = Tokenizer::from_dir(Path::new(LLAMA2)).unwrap();
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny/guanaco_llama2_ids.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let want = fx["rows"].as_array().unwrap();
    let data = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/guanaco-llama2-1k/train.jsonl"
    ))
    .unwrap();
    let lines: Vec<&str> = data.lines().collect();
    assert_eq!((lines.len(), want.len()), (1000, 1000));
    let mut total = 0;
    for (i, (line, w)) in lines.iter().zip(want).enumerate() {
        let row: Value = serde_json::from_str(line).unwrap();
        let got = tok.encode(row["text"].as_str().unwrap()).unwrap();
        assert_eq!(
            got.len() as u64,
            w["len"].as_u64().unwrap(),
            "row {i}: length"
        );
        assert_eq!(
            got[..16.min(got.len())],
            ids(&w["head"]),
            "row {i}: first ids"
        );
        let bytes: Vec<u8> = got.iter().flat_map(|x| x.to_le_bytes()).collect();
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hex, w["sha256"].as_str().unwrap(), "row {i}: ids differ");
        total += got.len();
    }
    assert_eq!(total, 461_907);
}
