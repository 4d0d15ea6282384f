//! Resource guards (issue 12, item 7): inputs that ask for absurd memory or time are refused with
//! a clear error, in bounded time and memory (measured with the fuzz binary's counting allocator).

use crate::harness::peak_of;
use crate::{fixture, fixtures, scratch, tiny_tokenizer, write};
use qlora::tokenizer::{render_chat_template, Message};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// `tests/fixtures/tiny/gqa/config.json` with `edits` applied.
fn tiny_config_with(edits: &[(&str, serde_json::Value)]) -> String {
    let mut v: serde_json::Value =
        serde_json::from_slice(&fixture("tiny/gqa/config.json")).unwrap();
    for (k, x) in edits {
        v[*k] = x.clone();
    }
    v.to_string()
}

#[test]
fn guard_config_with_absurd_sizes_is_refused_before_any_allocation() {
    let dir = scratch();
    for (edits, needles) in [
        (
            vec![("hidden_size", 1_000_000_000.into())],
            vec![
                "`hidden_size` = 1000000000 is beyond any Llama model",
                "2.189e12 parameters: 8.8 TB as stored (4-byte weights), about 2.3 TB with NF4",
            ],
        ),
        (
            vec![("num_hidden_layers", 1_000_000.into())],
            vec![
                "`num_hidden_layers` = 1000000 is beyond any Llama model",
                "parameters",
            ],
        ),
        (
            vec![
                ("hidden_size", 1_000_000_000.into()),
                ("num_hidden_layers", 1_000_000.into()),
                ("intermediate_size", 4_000_000_000u64.into()),
            ],
            vec![
                "refusing a model over 1e13 parameters",
                "with NF4 base weights",
            ],
        ),
        (
            vec![("vocab_size", 100_000_000.into())],
            vec!["`vocab_size` = 100000000 is beyond any Llama model"],
        ),
    ] {
        write(
            dir.path(),
            "config.json",
            tiny_config_with(&edits).as_bytes(),
        );
        let (r, peak) = peak_of(|| qlora::loader::read_config(dir.path()));
        let msg = r.unwrap_err().to_string();
        for n in needles {
            assert!(msg.contains(n), "{edits:?}: `{n}` not in: {msg}");
        }
        assert!(msg.contains("config.json"), "{msg}");
        assert!(peak < MIB, "{edits:?}: {peak} bytes held while refusing");
    }
    // The 7B config is fine, and its figure is right: 6.7 B parameters, 13.5 GB in f16.
    let cfg =
        qlora::config::ModelConfig::from_file(&fixtures().join("llama-2-7b-chat-hf/config.json"))
            .unwrap();
    let (params, _) = cfg.param_count();
    assert!((params - 6.738e9).abs() < 0.01e9, "{params}");
}

#[test]
fn guard_dataset_rows_of_many_megabytes() {
    let max = qlora::data::MAX_ROW_BYTES;
    let dir = scratch();
    let big = "x".repeat(max + 1000);
    // JSONL: the line over the limit is named, and no more than the limit is read of it (its
    // buffer grows by doubling, so up to twice that is held).
    let jsonl =
        format!("{{\"text\": \"small\"}}\n{{\"text\": \"{big}\"}}\n{{\"text\": \"never read\"}}\n");
    let path = write(dir.path(), "big.jsonl", jsonl.as_bytes());
    let t = Instant::now();
    let (r, peak) = peak_of(|| qlora::data::load_rows(&path, None));
    let msg = r.unwrap_err().to_string();
    assert!(
        msg.contains("big.jsonl:2:") && msg.contains("longer than 16777216 bytes"),
        "{msg}"
    );
    assert!(peak < 2 * max + 4 * MIB, "{peak}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // JSON: the file is parsed, the row measured and refused.
    let json = format!("[{{\"text\": \"small\"}}, {{\"text\": \"{big}\"}}]");
    let path = write(dir.path(), "big.json", json.as_bytes());
    let msg = qlora::data::load_rows(&path, None).unwrap_err().to_string();
    assert!(
        msg.contains("big.json") && msg.contains("row 2 is larger than 16777216 bytes"),
        "{msg}"
    );
    // A row of 1 MB (under the limit) is read, and truncated to --max-seq-len.
    let text = "word ".repeat(200_000);
    let path = write(
        dir.path(),
        "long.jsonl",
        format!("{{\"text\": \"{text}\"}}\n").as_bytes(),
    );
    let rows = qlora::data::load_rows(&path, None).unwrap();
    let opts = qlora::train::data::SftOptions {
        text_field: "text".into(),
        messages_field: "messages".into(),
        completion_only_loss: false,
        max_seq_len: 64,
    };
    let t = Instant::now();
    let (examples, stats) =
        qlora::train::data::build_examples(&rows, tiny_tokenizer(), &opts, &path).unwrap();
    assert_eq!((examples[0].len(), stats.truncated), (64, 1));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn guard_conversations_with_too_many_messages() {
    let dir = scratch();
    let turns: Vec<serde_json::Value> = (0..1001)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            serde_json::json!({"role": role, "content": "hi"})
        })
        .collect();
    let row = serde_json::json!({ "messages": turns }).to_string();
    let path = write(dir.path(), "chat.jsonl", format!("{row}\n").as_bytes());
    let rows = qlora::data::load_rows(&path, None).unwrap();
    let opts = qlora::train::data::SftOptions {
        text_field: "text".into(),
        messages_field: "messages".into(),
        completion_only_loss: true,
        max_seq_len: 64,
    };
    let msg = qlora::train::data::build_examples(&rows, tiny_tokenizer(), &opts, &path)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("1001 messages, more than the limit of 1000"),
        "{msg}"
    );
}

#[test]
fn guard_max_seq_len_beyond_the_model_context() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("tests/fixtures/tiny/gqa");
    let data = root.join("tests/fixtures/guanaco-llama2-1k");
    let mut c =
        qlora::train::config::TrainConfig::new(model.to_str().unwrap(), data.to_str().unwrap());
    c.output = scratch().path().join("out");
    c.max_rows = Some(8);
    c.data.max_seq_len = 100_000;
    c.batch.max_seq_len = 100_000;
    let want = "--max-seq-len 100000 exceeds the model's context of 256 tokens";
    let cfg = qlora::loader::read_config(&model).unwrap();
    let msg = c.validate_for_model(&cfg).unwrap_err().to_string();
    assert!(
        msg.contains(want) && msg.contains("at most --max-seq-len 256"),
        "{msg}"
    );
    // The dry run (and `Run::setup`) refuse it before reading any data.
    let (r, peak) = peak_of(|| qlora::train::plan::DryRun::new(&c));
    let msg = r.err().unwrap().to_string();
    assert!(msg.contains(want), "{msg}");
    assert!(peak < 4 * MIB, "{peak}");
    c.data.max_seq_len = 256;
    c.batch.max_seq_len = 256;
    c.validate_for_model(&cfg).unwrap();
}

fn conversation() -> Vec<Message> {
    ["user", "assistant"]
        .iter()
        .map(|r| Message {
            role: r.to_string(),
            content: "hello".into(),
        })
        .collect()
}

#[test]
fn guard_chat_templates_that_loop_recurse_or_grow() {
    let msgs = conversation();
    for (template, needle) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "instructions",
        ),
        (
            "{% for m in messages %}{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}{% endfor %}",
            "instructions",
        ),
        (
            "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
            "recursion",
        ),
        (
            "{% for i in range(20) %}{{ 'x' * 90000000 }}{% endfor %}",
            "output exceeds",
        ),
        ("{{ 'x' * 1000000000 }}", "too large"),
    ] {
        let t = Instant::now();
        let (r, peak) = peak_of(|| render_chat_template(template, &msgs, "<s>", "</s>", false));
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains(needle), "{template}: {msg}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{template}: {:?}",
            t.elapsed()
        );
        assert!(peak < 512 * MIB, "{template}: {peak}");
    }
    // Real templates stay far below the limits: Llama-2's on a 200-message conversation.
    let cfg: serde_json::Value =
        serde_json::from_slice(&fixture("llama-2-7b-chat-hf/tokenizer_config.json")).unwrap();
    let llama2 = cfg["chat_template"].as_str().unwrap();
    let long: Vec<Message> = (0..200)
        .map(|i| Message {
            role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
            content: format!("turn {i}"),
        })
        .collect();
    let out = render_chat_template(llama2, &long, "<s>", "</s>", false).unwrap();
    assert!(out.contains("turn 199"));
}

/// The same refusal through the binary: `qlora inspect` on a folder whose config.json has
/// `hidden_size` 10⁹ and 10⁶ layers fails at once, naming the memory the config needs, and the
/// process never grows past a small resident size (it took 1.2 GB before the guard).
#[test]
fn guard_absurd_config_through_the_binary() {
    let dir = scratch();
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        write(&model, f, &fixture(&format!("tiny/tokenizer/{f}")));
    }
    write(
        &model,
        "model.safetensors",
        &fixture("tiny/gqa/model.safetensors"),
    );
    let edits = [
        ("hidden_size", 1_000_000_000.into()),
        ("num_hidden_layers", 1_000_000.into()),
    ];
    write(&model, "config.json", tiny_config_with(&edits).as_bytes());
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["inspect", "--model", model.to_str().unwrap()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("config.json") && err.contains("parameters") && err.contains("as stored"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    // The largest resident size of any child this process has waited for (only this test
    // starts one), in KiB on Linux.
    #[cfg(target_os = "linux")]
    {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a rusage into the pointer it is given; it is zeroed and ours.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, ru.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: initialised by the successful call above.
        let max_rss_kib = unsafe { ru.assume_init() }.ru_maxrss;
        assert!(
            max_rss_kib < 200 * 1024,
            "qlora inspect peaked at {max_rss_kib} KiB"
        );
        eprintln!("qlora inspect refused the config at a peak RSS of {max_rss_kib} KiB");
    }
}
