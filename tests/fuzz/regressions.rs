//! One test per panic the fuzz targets found, with the input that caused it (reduced by hand to
//! the part that matters), so each fix stays fixed whatever bolero generates next time.

use crate::{fixture, model_config, scratch, write};
use qlora::tokenizer::{render_chat_template, Message, Tokenizer};

fn hello() -> Vec<Message> {
    vec![Message {
        role: "user".into(),
        content: "Hi".into(),
    }]
}

/// Found by `tokenizer_json`: a `decoder` entry that matches none of its forms made the
/// `tokenizers` crate panic (`expect("Helper")` in decoders/mod.rs) instead of returning an error.
#[test]
fn regression_tokenizer_json_with_a_malformed_decoder() {
    let text = String::from_utf8(fixture("tiny/tokenizer/tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = scratch();
    write(
        dir.path(),
        "tokenizer_config.json",
        &fixture("tiny/tokenizer/tokenizer_config.json"),
    );
    for decoder in [
        serde_json::json!(42),
        serde_json::json!("ByteLevel"),
        serde_json::json!({"type": 7}),
        serde_json::json!([1, 2]),
    ] {
        json["decoder"] = decoder.clone();
        write(dir.path(), "tokenizer.json", json.to_string().as_bytes());
        let err = Tokenizer::from_dir(dir.path()).err().unwrap_or_else(|| {
            panic!("decoder {decoder}: accepted");
        });
        let msg = err.to_string();
        assert!(
            msg.contains("tokenizer.json") && msg.contains("cannot load tokenizer"),
            "decoder {decoder}: {msg}"
        );
    }
}

/// Found by `chat_template`: minijinja counts columns in a `u16`; a syntax error past column
/// 65,535 overflowed it (a panic in builds with overflow checks, a wrong position without).
#[test]
fn regression_chat_template_with_a_very_long_line() {
    let template = format!("{}{{{{ 1 +", "x".repeat(70_000));
    let err = render_chat_template(&template, &hello(), "<s>", "</s>", false).unwrap_err();
    assert!(
        err.to_string()
            .contains("line 1 is longer than 60000 characters"),
        "{err}"
    );
    // Long, but within the limit, and on several lines: rendered.
    let ok = format!("{}\n{{{{ messages[0]['content'] }}}}", "y".repeat(50_000));
    let out = render_chat_template(&ok, &hello(), "<s>", "</s>", false).unwrap();
    assert!(out.ends_with("Hi"));
}

/// Found by `adapter_config`: a rank of 2^53 + 1 was accepted, and counting the adapter's
/// parameters (`r × (in + out)` summed over modules) overflowed.
#[test]
fn regression_adapter_config_with_a_huge_rank() {
    let model = model_config("tiny/gqa/config.json");
    let text = String::from_utf8(fixture("peft/gqa-lora/adapter_config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for r in [9007199254740993u64, 1 << 40, 65_537] {
        json["r"] = r.into();
        let err = qlora::lora::LoraConfig::from_json_str(&json.to_string())
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate_for(&model).map_err(|e| e.to_string()))
            .unwrap_err();
        assert!(err.contains("beyond any usable rank"), "r = {r}: {err}");
    }
    json["r"] = 65_536.into();
    let cfg = qlora::lora::LoraConfig::from_json_str(&json.to_string()).unwrap();
    cfg.validate_for(&model).unwrap();
    assert!(qlora::lora::trainable_params(&cfg, &model) > 0);
}

/// Found by `run_config_toml` in the long run: the `toml` crate parses nested arrays
/// recursively, and 20,000 `[` overflowed the stack (an abort no `catch_unwind` stops). The
/// nesting depth is now checked before parsing; this runs on a test thread's small stack.
#[test]
fn regression_run_config_nested_20000_deep() {
    use qlora::train::config_file::{config_flags, FlagKind};
    for text in [
        format!("lora_r = {}", "[".repeat(20_000)),
        format!("lora_r = {}1{}", "[".repeat(5_000), "]".repeat(5_000)),
        format!("lora_r = {}", "{a = ".repeat(20_000)),
    ] {
        let err = config_flags("run.toml", &text, |_| Some(FlagKind::Value)).unwrap_err();
        assert!(err.to_string().contains("deep (the limit is 64)"), "{err}");
    }
}

/// Found by `dataset_rows` in the long run: one flipped bit in a Parquet page made the `parquet`
/// crate index past a slice (`bit_util::read_num_bytes`) while decoding a dictionary page. The
/// case as bolero generated it, replayed on the same seed.
#[test]
fn regression_parquet_with_a_flipped_bit_in_a_dictionary_page() {
    use crate::harness::{mutate, Case, Mutation, Seed};
    let case = Case {
        seed: 0,
        mutations: vec![Mutation::FlipBit {
            at: 513335752,
            bit: 108,
        }],
    };
    let (_, bytes) = mutate(&[Seed::fixture("data/chat.parquet")], &case);
    let dir = scratch();
    let path = write(dir.path(), "rows.parquet", &bytes);
    let msg = qlora::data::load_rows(&path, None).unwrap_err().to_string();
    assert!(
        msg.contains("rows.parquet") && msg.contains("it is corrupt"),
        "{msg}"
    );
}

/// Found by `tokenizer_json` in the long run: 15,645 copies of `{% if x %}` inserted into a
/// special token's id in the template post-processor. The file loads, and then `encode` panicked
/// ("no entry found for key" in `processors/template.rs`); the case as bolero generated it.
#[test]
fn regression_tokenizer_json_post_processor_naming_an_unknown_token() {
    use crate::harness::{mutate, Bracket, Case, Mutation, Seed};
    let case = Case {
        seed: 0,
        mutations: vec![Mutation::Nest {
            at: 4271947288,
            depth: 35645,
            open: Bracket::Jinja,
        }],
    };
    let (_, bytes) = mutate(&[Seed::fixture("tiny/tokenizer/tokenizer.json")], &case);
    let dir = scratch();
    write(
        dir.path(),
        "tokenizer_config.json",
        &fixture("tiny/tokenizer/tokenizer_config.json"),
    );
    write(dir.path(), "tokenizer.json", &bytes);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let msg = tok.encode("<s>[INST] Hi [/INST]").unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer.json: encode failed") && msg.contains("malformed"),
        "{msg}"
    );
}
