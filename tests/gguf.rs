//! `qlora export` against llama.cpp's `gguf` reader: tests/fixtures/gguf/tiny.json records what
//! gguf-py 0.17.1 read from exports of the tiny fixtures (scripts/fixtures_gguf.py, which also
//! checks the decoded tensors against the Hugging Face weights with llama.cpp's converter steps
//! applied in numpy, Q8_0 bytes against gguf's reference quantizer, and the logits of a numpy
//! forward pass with llama.cpp's `llama` semantics on the file against transformers' / PEFT's
//! golden logits). Here a fresh export is
//! parsed with a minimal reader and must match that record: metadata, tensor names, shapes,
//! types, offsets and the sha256 of every tensor's bytes.
//!
//! llama.cpp itself: tests/fixtures/gguf/llama_cpp.json records what llama.cpp (llama-cpp-python
//! 0.3.36, `scripts/fixtures_gguf.py --llama-cpp`) computed from the exports: logits, greedy
//! continuations, LoRA-only files applied to the base, and the tokenization of the 1000 guanaco
//! rows with the exported Llama-2 vocabulary; qlora's CPU backend must agree (tests at the end).

mod common;

use common::root;
use qlora::export::{export, ExportDtype, ExportOptions};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use std::path::Path;

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

struct Reader<'a> {
    b: &'a [u8],
    p: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        self.p += n;
        &self.b[self.p - n..self.p]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn str(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    /// A value as (JSON for the head, bytes hashed as the fixture script does).
    fn scalar(&mut self, ty: u32) -> (Json, Vec<u8>) {
        let size = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let s = self.str();
                return (Json::from(s.clone()), s.into_bytes());
            }
            _ => panic!("value type {ty}"),
        };
        let raw = self.take(size).to_vec();
        let v = match ty {
            0 => Json::from(raw[0]),
            7 => Json::from(raw[0] != 0),
            4 => Json::from(u32::from_le_bytes(raw[..4].try_into().unwrap())),
            5 => Json::from(i32::from_le_bytes(raw[..4].try_into().unwrap())),
            6 => Json::from(f32::from_le_bytes(raw[..4].try_into().unwrap()) as f64),
            10 => Json::from(u64::from_le_bytes(raw[..8].try_into().unwrap())),
            _ => panic!("value type {ty} not used by the exporter"),
        };
        (v, raw)
    }
}

const TYPE_NAMES: [(u32, &str); 13] = [
    (0, "UINT8"),
    (1, "INT8"),
    (2, "UINT16"),
    (3, "INT16"),
    (4, "UINT32"),
    (5, "INT32"),
    (6, "FLOAT32"),
    (7, "BOOL"),
    (8, "STRING"),
    (9, "ARRAY"),
    (10, "UINT64"),
    (11, "INT64"),
    (12, "FLOAT64"),
];

fn type_name(t: u32) -> &'static str {
    TYPE_NAMES.iter().find(|(i, _)| *i == t).unwrap().1
}

/// The file as the fixture JSON describes it: `{metadata, tensors}`.
fn describe(path: &Path) -> Json {
    let b = std::fs::read(path).unwrap();
    let mut r = Reader { b: &b, p: 0 };
    assert_eq!(r.take(4), b"GGUF");
    assert_eq!(r.u32(), 3);
    let (nt, nkv) = (r.u64(), r.u64());
    let mut meta = serde_json::Map::new();
    let mut align = 32usize;
    for _ in 0..nkv {
        let key = r.str();
        let ty = r.u32();
        let v = if ty == 9 {
            let sub = r.u32();
            let n = r.u64() as usize;
            let mut head = vec![];
            let mut raw = vec![];
            for i in 0..n {
                let (v, bytes) = r.scalar(sub);
                if sub == 8 && i > 0 {
                    raw.push(0);
                }
                raw.extend(bytes);
                if i < 4 {
                    head.push(v);
                }
            }
            serde_json::json!({"array_of": type_name(sub), "len": n, "head": head, "sha256": sha(&raw)})
        } else {
            let (v, _) = r.scalar(ty);
            if key == "general.alignment" {
                align = v.as_u64().unwrap() as usize;
            }
            serde_json::json!({"type": type_name(ty), "value": v})
        };
        meta.insert(key, v);
    }
    let mut infos = vec![];
    for _ in 0..nt {
        let name = r.str();
        let nd = r.u32();
        let ne: Vec<u64> = (0..nd).map(|_| r.u64()).collect();
        let ty = r.u32();
        let off = r.u64() as usize;
        infos.push((name, ne, ty, off));
    }
    let data = r.p.div_ceil(align) * align;
    let tensors: Vec<Json> = infos
        .into_iter()
        .map(|(name, ne, ty, off)| {
            let n: u64 = ne.iter().product();
            let (tname, nbytes) = match ty {
                0 => ("F32", 4 * n),
                1 => ("F16", 2 * n),
                8 => ("Q8_0", n / 32 * 34),
                30 => ("BF16", 2 * n),
                _ => panic!("ggml type {ty}"),
            };
            let start = data + off;
            let bytes = &b[start..start + nbytes as usize];
            serde_json::json!({"name": name, "ne": ne, "type": tname, "nbytes": nbytes,
                "offset": start, "sha256": sha(bytes)})
        })
        .collect();
    serde_json::json!({"metadata": meta, "tensors": tensors})
}

fn fixture() -> Json {
    let p = root().join("tests/fixtures/gguf/tiny.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn run_export(entry: &Json, out: &Path) {
    let s = |k: &str| entry[k].as_str().map(str::to_string);
    export(&ExportOptions {
        model: Some(root().join(s("model").unwrap()).to_string_lossy().into()),
        adapter: s("adapter").map(|a| root().join(a)),
        output: out.to_path_buf(),
        dtype: s("dtype").unwrap().parse().unwrap(),
        overwrite: false,
        lora_only: entry["lora_only"].as_bool().unwrap(),
    })
    .unwrap();
}

#[test]
fn export_matches_what_gguf_py_read() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    for (name, entry) in fx["files"].as_object().unwrap() {
        let out = dir.path().join(format!("{name}.gguf"));
        run_export(entry, &out);
        let got = describe(&out);
        let want_meta = entry["metadata"].as_object().unwrap();
        let got_meta = got["metadata"].as_object().unwrap();
        assert_eq!(
            got_meta.keys().collect::<Vec<_>>(),
            want_meta.keys().collect::<Vec<_>>(),
            "{name}: metadata keys"
        );
        for (k, v) in want_meta {
            assert_eq!(&got_meta[k], v, "{name}: {k}");
        }
        assert_eq!(got["tensors"], entry["tensors"], "{name}: tensors");
        // The oracle figures the fixture script asserted.
        if let Some(e) = entry.get("max_abs_diff_vs_hf") {
            assert!(e.as_f64().unwrap() <= 1e-6, "{name}: {e}");
        }
        if let Some(e) = entry.get("lora_plus_base_vs_merged_max_abs_diff") {
            assert!(e.as_f64().unwrap() <= 1e-6, "{name}: {e}");
            continue;
        }
        let Some(logits) = entry
            .get("llama_cpp_semantics_logits_max_abs_diff")
            .and_then(Json::as_f64)
        else {
            continue; // no golden logits for this adapter
        };
        if entry["dtype"] == "f32" {
            assert!(logits < 1e-4, "{name}: {logits}");
            assert_eq!(entry["llama_cpp_semantics_argmax_agreement"], 1.0);
        }
        if entry["dtype"] == "q8_0" {
            assert_eq!(entry["q8_0_bytes_equal_gguf_quantize"], true);
        }
    }
}

#[test]
fn export_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let opts = |model: &Path, out: &Path| ExportOptions {
        model: Some(model.to_string_lossy().into()),
        adapter: None,
        output: out.to_path_buf(),
        dtype: ExportDtype::F16,
        overwrite: false,
        lora_only: false,
    };
    // Existing output.
    std::fs::write(&out, b"x").unwrap();
    let err = export(&opts(&root().join("tests/fixtures/tiny/tied"), &out)).unwrap_err();
    assert!(err.to_string().contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"x");
    // Unsupported architecture.
    let m = dir.path().join("gpt2");
    std::fs::create_dir(&m).unwrap();
    std::fs::write(
        m.join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}"#,
    )
    .unwrap();
    let err = export(&opts(&m, &dir.path().join("g.gguf"))).unwrap_err();
    assert!(
        err.to_string().contains("unsupported architecture"),
        "{err}"
    );
    // Unknown dtype.
    let err = "q4_k".parse::<ExportDtype>().unwrap_err();
    assert!(err.to_string().contains("f32, f16, bf16 or q8_0"), "{err}");
    // Nothing left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn export_tied_with_overwrite_writes_no_output_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.gguf");
    std::fs::write(&out, b"old").unwrap();
    export(&ExportOptions {
        model: Some(
            root()
                .join("tests/fixtures/tiny/tied")
                .to_string_lossy()
                .into(),
        ),
        adapter: None,
        output: out.clone(),
        dtype: ExportDtype::Bf16,
        overwrite: true,
        lora_only: false,
    })
    .unwrap();
    let d = describe(&out);
    let names: Vec<&str> = d["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(!names.contains(&"output.weight"));
    assert_eq!(names.len(), 2 + 9 * 3);
    let types: Vec<&str> = d["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert!(types.iter().all(|t| *t == "BF16" || *t == "F32"));
    assert_eq!(d["metadata"]["general.file_type"]["value"], 32);
}

/// The SentencePiece (`llama`) vocabulary path on Llama-2's real tokenizer.json: token types as
/// llama.cpp's converter gives them from tokenizer.model, and scores that order merges as the
/// original (`▁t` first, runs of `▁` last).
#[test]
fn export_llama2_vocabulary_types_and_scores() {
    use qlora::export::gguf::{Array, GgufWriter, Value};
    let dir = root().join("tests/fixtures/llama-2-7b-chat-hf");
    let cfg = qlora::loader::read_config(&dir).unwrap();
    let mut g = GgufWriter::new();
    let kind = qlora::export::vocab::add_tokenizer(&mut g, &dir, &cfg).unwrap();
    assert_eq!(kind, "llama");
    let Some(Value::Array(Array::Str(tokens))) = g.get("tokenizer.ggml.tokens") else {
        panic!("tokens")
    };
    let Some(Value::Array(Array::I32(types))) = g.get("tokenizer.ggml.token_type") else {
        panic!("types")
    };
    let Some(Value::Array(Array::F32(scores))) = g.get("tokenizer.ggml.scores") else {
        panic!("scores")
    };
    assert_eq!(
        (tokens.len(), types.len(), scores.len()),
        (32000, 32000, 32000)
    );
    assert_eq!(&tokens[..3], ["<unk>", "<s>", "</s>"]);
    assert_eq!(&types[..4], [2, 3, 3, 6]);
    assert_eq!(tokens[3], "<0x00>");
    assert!(types[3..259].iter().all(|&t| t == 6));
    assert!(types[259..].iter().all(|&t| t == 1));
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap();
    assert!(scores[id("▁t")] > scores[id("er")]);
    assert!(scores[id("er")] > scores[id("▁the")]);
    assert!(scores[id("▁the")] > scores[id("▁▁")]);
    for (k, v) in [
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ] {
        assert_eq!(g.get(k), Some(&v), "{k}");
    }
    assert!(g.get("tokenizer.ggml.merges").is_none());
    assert!(g.get("tokenizer.chat_template").is_some());

    // Against llama.cpp's own conversion of Llama 2's tokenizer.model
    // (ggml-vocab-llama-spm.gguf, recorded by scripts/fixtures_gguf.py).
    let reference = &fixture()["llama2_spm_reference"];
    assert_eq!(
        sha(tokens.join("\0").as_bytes()),
        reference["tokens_sha256"],
        "tokens"
    );
    let type_bytes: Vec<u8> = types.iter().flat_map(|t| t.to_le_bytes()).collect();
    assert_eq!(sha(&type_bytes), reference["token_type_sha256"], "types");
    for (k, v) in reference["scalars"].as_object().unwrap() {
        let got = match g.get(k).unwrap() {
            Value::Str(s) => Json::from(s.clone()),
            Value::U32(x) => Json::from(*x),
            Value::Bool(b) => Json::from(*b),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(&got, v, "{k}");
    }
    // Scores: the reference is -(id - 259) for ordinary pieces and -1e9 for 16 runs of `▁`, so
    // every merge result must rank in id order, and the `▁` runs below all of them. (Ties among
    // the `▁` runs in the reference are distinct here: not compared.)
    let low: Vec<usize> = reference["minus_1e9_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let merged: Vec<usize> = (259..32000)
        .filter(|i| !low.contains(i) && scores[*i] < 0.0)
        .collect();
    assert!(merged.len() > 29000, "{}", merged.len());
    assert!(merged.windows(2).all(|w| scores[w[0]] > scores[w[1]]));
    let floor = merged
        .iter()
        .map(|&i| scores[i])
        .fold(f32::INFINITY, f32::min);
    assert!(low
        .iter()
        .filter(|&&i| tokens[i].chars().count() > 1)
        .all(|&i| scores[i] < floor));
    // Tokens no merge makes are single symbols, which never compete in llama.cpp's merging.
    assert!((259..32000)
        .filter(|i| scores[*i] == 0.0)
        .all(|i| tokens[i].chars().count() == 1));
}

/// The command line: the llama.cpp / Ollama lines at the end, clap's errors for a bad dtype and
/// `--lora-only` without an adapter.
#[test]
fn export_cli_prints_how_to_run_and_rejects_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let model = root().join("tests/fixtures/tiny/tied");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
            .arg("export")
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    let ok = run(&["--model", m, "-o", o, "--dtype", "q8_0"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains(&format!("llama-cli -m {o}")), "{stdout}");
    assert!(stdout.contains(&format!("FROM {o}")), "{stdout}");
    let again = run(&["--model", m, "-o", o]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    let bad = run(&["--model", m, "-o", o, "--dtype", "q4_k"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("q8_0"));
    let lora = run(&["--model", m, "-o", o, "--lora-only"]);
    assert!(!lora.status.success());
    assert!(String::from_utf8_lossy(&lora.stderr).contains("--adapter"));
}

/// The pre-tokenizer hash equals the one Python `tokenizers` gives with llama.cpp's own text
/// (recorded by scripts/fixtures_gguf.py --llama-cpp-dir).
#[test]
fn export_pre_tokenizer_hash_is_the_converters() {
    let reference = &fixture()["chkhsh_reference"];
    let dir = root().join(reference["tokenizer"].as_str().unwrap());
    assert_eq!(
        sha(qlora::export::pre::CHKTXT.as_bytes()),
        reference["chktxt_sha256"]
    );
    assert_eq!(
        qlora::export::pre::chkhsh(&dir).unwrap(),
        reference["chkhsh"]
    );
    assert_eq!(
        qlora::export::pre::name_of(
            "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
        ),
        Some("smollm")
    );
}

// ---- llama.cpp itself (tests/fixtures/gguf/llama_cpp.json, scripts/fixtures_gguf.py --llama-cpp:
// llama-cpp-python 0.3.36 on the CPU, f32 KV cache, no flash attention).

use qlora::backend::cpu::CpuBackend;
use qlora::model::{BaseQuant, Llama, Logits, MergeLora};

fn llama_cpp_fixture() -> Json {
    let p = root().join("tests/fixtures/gguf/llama_cpp.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// qlora's merged model on the CPU backend: the base with the adapter (if any) folded in while
/// loading, which equals the folder `qlora merge` writes (tests/merge.rs).
fn qlora_model(model: &str, adapter: Option<&str>) -> Llama<CpuBackend> {
    let dir = root().join(model);
    let Some(adapter) = adapter else {
        return qlora::loader::load_model_dir(&dir, CpuBackend::new(), BaseQuant::None)
            .unwrap()
            .model;
    };
    let cfg = qlora::loader::read_config(&dir).unwrap();
    let (c, w) = qlora::lora::load_adapter(&root().join(adapter), &cfg).unwrap();
    let merge = MergeLora {
        weights: &w,
        scale: c.scaling(),
    };
    qlora::loader::load_model_dir_merged(&dir, CpuBackend::new(), BaseQuant::None, Some(merge))
        .unwrap()
        .model
}

fn all_logits(m: &Llama<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache(ids.len()).unwrap();
    m.forward(ids, &mut cache, Logits::All).unwrap()
}

/// `n` argmax tokens after `ids` (EOS does not stop), as the fixture script asks llama.cpp.
fn greedy(m: &Llama<CpuBackend>, ids: &[u32], n: usize) -> Vec<u32> {
    let v = m.cfg.vocab_size;
    let mut seq = ids.to_vec();
    for _ in 0..n {
        let l = all_logits(m, &seq);
        let last = &l[l.len() - v..];
        let best = (0..v).fold(0, |b, i| if last[i] > last[b] { i } else { b });
        seq.push(best as u32);
    }
    seq[ids.len()..].to_vec()
}

fn prompts_of(model: &str) -> Vec<Vec<u32>> {
    let g: Json = serde_json::from_str(
        &std::fs::read_to_string(root().join(model).join("golden.json")).unwrap(),
    )
    .unwrap();
    serde_json::from_value(g["prompts"].clone()).unwrap()
}

fn ids_of(v: &Json) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Max |llama.cpp − qlora| over the recorded logit rows of `entry`.
fn recorded_logits_diff(entry: &Json, ours: &[Vec<f32>], vocab: usize) -> f32 {
    let rows = entry["logits"].as_array().unwrap();
    assert!(!rows.is_empty());
    let mut worst = 0f32;
    for r in rows {
        let (p, t) = (
            r["prompt"].as_u64().unwrap() as usize,
            r["pos"].as_u64().unwrap() as usize,
        );
        let want: Vec<f32> = serde_json::from_value(r["logits"].clone()).unwrap();
        assert_eq!(want.len(), vocab);
        let got = &ours[p][t * vocab..(t + 1) * vocab];
        worst = want
            .iter()
            .zip(got)
            .fold(worst, |m, (a, b)| m.max((a - b).abs()));
    }
    worst
}

/// llama.cpp's logits on the f32 exports (tiny GQA, tiny Llama-3 with rope_freqs, and the merged
/// exports of a LoRA and an all-linear rsLoRA adapter) equal qlora's merged-model logits within
/// 1e-3, and its greedy continuations equal qlora's; the --lora-only files applied by llama.cpp on
/// the base export give the merged model's logits and greedy ids.
#[test]
fn llama_cpp_runs_the_exports_as_qlora_does() {
    let fx = llama_cpp_fixture();
    let n_new = fx["greedy_new_tokens"].as_u64().unwrap() as usize;
    let mut merged_logits = std::collections::HashMap::new();
    for (name, e) in fx["models"].as_object().unwrap() {
        let model = e["model"].as_str().unwrap();
        let m = qlora_model(model, e["adapter"].as_str());
        let prompts = prompts_of(model);
        let ours: Vec<Vec<f32>> = prompts.iter().map(|p| all_logits(&m, p)).collect();
        let ours_greedy: Vec<Vec<u32>> = prompts.iter().map(|p| greedy(&m, p, n_new)).collect();
        if e["dtype"] == "f32" {
            let d = recorded_logits_diff(e, &ours, m.cfg.vocab_size);
            println!("{name}: llama.cpp vs qlora logits {d:.2e}");
            assert!(d <= 1e-3, "{name}: {d}");
            assert_eq!(ids_of(&e["greedy"]), ours_greedy, "{name}: greedy");
            merged_logits.insert(name.clone(), (ours, ours_greedy, m.cfg.vocab_size));
        } else {
            // q8_0: llama.cpp quantizes the activations too; recorded, not compared with f32.
            let same = ids_of(&e["greedy"]) == ours_greedy;
            println!(
                "{name}: llama.cpp vs its f32 export {}, greedy equal to qlora f32: {same}",
                e["vs_f32_export_max_abs_diff"]
            );
        }
    }
    for (name, e) in fx["loras"].as_object().unwrap() {
        let (ours, ours_greedy, vocab) = &merged_logits[e["merged"].as_str().unwrap()];
        let d = recorded_logits_diff(e, ours, *vocab);
        let vs_file = e["vs_merged_export_max_abs_diff"].as_f64().unwrap();
        println!(
            "{name}: llama.cpp base+LoRA vs qlora merged {d:.2e}, vs merged file {vs_file:.2e}"
        );
        assert!(d <= 1e-3, "{name}: {d}");
        assert!(vs_file <= 1e-3, "{name}: {vs_file}");
        assert_eq!(&ids_of(&e["greedy"]), ours_greedy, "{name}: greedy");
    }
}

/// llama.cpp's tokenization of the 1000 guanaco rows with the exported Llama-2 vocabulary (a
/// vocab-only load, special tokens parsed, no BOS added) equals qlora's tokenizer, row for row.
#[test]
fn llama_cpp_tokenizes_guanaco_as_qlora_does() {
    let rec = &llama_cpp_fixture()["llama2_guanaco_tokenization"];
    let tok =
        qlora::tokenizer::Tokenizer::from_dir(&root().join("tests/fixtures/llama-2-7b-chat-hf"))
            .unwrap();
    let data = std::fs::read_to_string(root().join("tests/fixtures/guanaco-llama2-1k/train.jsonl"))
        .unwrap();
    let mut lines = String::new();
    let mut total = 0;
    for line in data.lines() {
        let row: Json = serde_json::from_str(line).unwrap();
        let ids = tok.encode(row["text"].as_str().unwrap()).unwrap();
        total += ids.len();
        let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        lines += &sha(&bytes);
        lines.push('\n');
    }
    assert_eq!(rec["rows"], 1000);
    assert_eq!(rec["rows_equal_to_python_tokenizers"], 1000, "{rec}");
    assert_eq!(rec["total_ids"], total);
    assert_eq!(sha(lines.as_bytes()), rec["all_rows_sha256"]);
}
