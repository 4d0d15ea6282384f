//! `qlora merge` against PEFT's `merge_and_unload` and transformers: the merged folder loads in
//! qlora and in transformers, and its logits equal PEFT's merged logits.

mod common;

use qlora::backend::cpu::CpuBackend;
use qlora::lora::load_adapter;
use qlora::merge::{merge, MergeOptions};
use qlora::model::{BaseQuant, Llama, Logits, Lora};
use qlora::weights::{Checkpoint, DType};
use std::path::Path;
use std::process::Command;

use common::{golden_prompts, root};

fn st_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn logits(m: &Llama<CpuBackend>, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache(ids.len()).unwrap();
    m.forward(ids, &mut cache, Logits::All).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn opts(out: &Path, dtype: DType, model: Option<&str>) -> MergeOptions {
    MergeOptions {
        adapter: root().join("tests/fixtures/peft/gqa-lora"),
        model: Some(
            model
                .map(|m| root().join(m))
                .unwrap_or_else(|| root().join("tests/fixtures/tiny/gqa"))
                .to_string_lossy()
                .into_owned(),
        ),
        output: out.to_path_buf(),
        dtype: Some(dtype),
        overwrite: false,
    }
}

fn load_dir(dir: &Path) -> Llama<CpuBackend> {
    qlora::loader::load_model_dir(dir, CpuBackend::new(), BaseQuant::None)
        .unwrap()
        .model
}

#[test]
fn f32_merge_matches_peft_merge_and_adapter_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let r = merge(&opts(&out, DType::F32, None)).unwrap();
    assert_eq!(r.merged_modules, 6, "q,v,down on 2 layers");
    let merged = load_dir(&out);
    // The same base with the adapter attached, unmerged.
    let mut adapted = load_dir(&root().join("tests/fixtures/tiny/gqa"));
    let (c, w) = load_adapter(&root().join("tests/fixtures/peft/gqa-lora"), &adapted.cfg).unwrap();
    adapted.lora = Some(Lora::new(&adapted.backend, &c, &w, &adapted.cfg).unwrap());
    let golden = root().join("tests/fixtures/peft/gqa-lora/golden.safetensors");
    let (mut vs_peft, mut vs_adapter) = (0f32, 0f32);
    for (i, ids) in golden_prompts().iter().enumerate() {
        let got = logits(&merged, ids);
        vs_peft = vs_peft.max(max_diff(&got, &st_f32(&golden, &format!("merged.{i}"))));
        vs_adapter = vs_adapter.max(max_diff(&got, &logits(&adapted, ids)));
    }
    println!("merged logits: vs PEFT merge_and_unload {vs_peft:.2e}, vs adapter {vs_adapter:.2e}");
    assert!(vs_peft < 1e-4 && vs_adapter < 1e-4);
    // config.json: dtype recorded, tokenizer files copied.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
    assert!(out.join("tokenizer.json").is_file());
}

/// `--merge` (in memory, while loading): the f32 model equals the folder `qlora merge` writes,
/// weight for weight; with NF4 it is the NF4 quantization of that merged weight.
#[test]
fn in_memory_merge_equals_the_merged_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    merge(&opts(&out, DType::F32, None)).unwrap();
    let base = root().join("tests/fixtures/tiny/gqa");
    let cfg = qlora::loader::read_config(&base).unwrap();
    let (c, w) = load_adapter(&root().join("tests/fixtures/peft/gqa-lora"), &cfg).unwrap();
    let merge_in = qlora::model::MergeLora {
        weights: &w,
        scale: c.scaling(),
    };
    for quant in [BaseQuant::None, BaseQuant::NF4] {
        let mem =
            qlora::loader::load_model_dir_merged(&base, CpuBackend::new(), quant, Some(merge_in))
                .unwrap()
                .model;
        let file = qlora::loader::load_model_dir(&out, CpuBackend::new(), quant)
            .unwrap()
            .model;
        for ids in golden_prompts() {
            assert_eq!(logits(&mem, &ids), logits(&file, &ids), "{quant:?}");
        }
    }
}

#[test]
fn bf16_merge_rounds_the_f32_merge_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("f32"), dir.path().join("bf16"));
    merge(&opts(&a, DType::F32, None)).unwrap();
    merge(&opts(&b, DType::BF16, None)).unwrap();
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let mut n = 0;
    for info in ca.tensors() {
        let wa = ca.load_f32(&info.name, &info.shape).unwrap();
        let wb = cb.load_f32(&info.name, &info.shape).unwrap();
        assert_eq!(cb.get(&info.name).unwrap().dtype, DType::BF16);
        for (x, y) in wa.iter().zip(&wb) {
            assert_eq!(half::bf16::from_f32(*x).to_f32(), *y, "{}", info.name);
        }
        n += 1;
    }
    assert!(n > 10);
    // It loads and runs; bf16 weights move logits by about the bf16 rounding of the weights.
    let m = load_dir(&b);
    let l = logits(&m, &golden_prompts()[0]);
    assert!(l.iter().all(|v| v.is_finite()));
}

#[test]
fn transformers_loads_the_merged_folder() {
    // tests/fixtures/peft/merged_f16_check.safetensors: transformers 5.23's logits for the f16
    // merge of gqa-lora (`qlora merge --dtype f16`, then
    // `scripts/fixtures_peft.py --check-merged DIR`).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    merge(&opts(&out, DType::F16, None)).unwrap();
    let m = load_dir(&out);
    let check = root().join("tests/fixtures/peft/merged_f16_check.safetensors");
    let mut worst = 0f32;
    for (i, ids) in golden_prompts().iter().enumerate() {
        worst = worst.max(max_diff(
            &logits(&m, ids),
            &st_f32(&check, &format!("logits.{i}")),
        ));
    }
    println!("f16 merged folder: qlora vs transformers logits {worst:.2e}");
    assert!(worst < 1e-4);
}

#[test]
fn four_bit_base_is_dequantized_then_merged() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    merge(&opts(&out, DType::F32, Some("tests/fixtures/bnb/gqa-bnb4"))).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
    let base = Checkpoint::open(&root().join("tests/fixtures/bnb/gqa-bnb4")).unwrap();
    let merged = Checkpoint::open(&out).unwrap();
    let model_cfg = qlora::loader::read_config(&out).unwrap();
    let (lc, w) = load_adapter(&root().join("tests/fixtures/peft/gqa-lora"), &model_cfg).unwrap();
    for (m, pair) in &w.modules {
        let name = format!("{}.weight", m.path());
        let shape = [pair.out_features, pair.in_features];
        let q = qlora::quant::bnb::load_prequantized(&base, &name, &shape).unwrap();
        let mut want = qlora::quant::dequantize_nf4(&q);
        qlora::merge::add_lora(&mut want, pair, lc.scaling());
        assert_eq!(merged.load_f32(&name, &shape).unwrap(), want, "{name}");
    }
}

fn qlora_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn cli_merge_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let o = out.to_str().unwrap();
    // The base comes from adapter_config.json (a path relative to the repo root).
    let (code, err) = qlora_cli(&[
        "merge",
        "--adapter",
        "tests/fixtures/peft/gqa-lora",
        "--output",
        o,
    ]);
    assert_eq!(code, 0, "{err}");
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let (code, err) = qlora_cli(&[
        "merge",
        "--adapter",
        "tests/fixtures/peft/gqa-lora",
        "--output",
        o,
        "--dtype",
        "bf16",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("--overwrite") && err.contains(o), "{err}");
    assert_eq!(
        before,
        std::fs::read(out.join("model.safetensors")).unwrap()
    );
    let (code, err) = qlora_cli(&[
        "merge",
        "--adapter",
        "tests/fixtures/peft/gqa-lora",
        "--output",
        o,
        "--dtype",
        "bf16",
        "--overwrite",
    ]);
    assert_eq!(code, 0, "{err}");
    // An adapter for another architecture.
    let (code, err) = qlora_cli(&[
        "merge",
        "--adapter",
        "tests/fixtures/peft/gqa-lora",
        "--model",
        "tests/fixtures/tiny/tied",
        "--output",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("gqa-lora"), "{err}");
    let (code, err) = qlora_cli(&["merge", "--adapter", "/nonexistent/ad", "--output", o]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/ad"), "{err}");
}

#[test]
fn adapted_lm_head_on_tied_embeddings_is_untied() {
    use qlora::train::config::TrainConfig;
    let dir = tempfile::tempdir().unwrap();
    let tied = root().join("tests/fixtures/tiny/tied");
    let mut c = TrainConfig::new(
        tied.to_str().unwrap(),
        root()
            .join("tests/fixtures/guanaco-llama2-1k")
            .to_str()
            .unwrap(),
    );
    c.output = dir.path().join("ad");
    c.max_rows = Some(16);
    c.data.max_seq_len = 48;
    c.lora.targets = vec!["lm_head".into(), "q_proj".into()];
    c.optim.lr = 1e-2;
    c.max_steps = Some(3);
    qlora::train::trainer::train(
        &c,
        CpuBackend::new(),
        &std::sync::atomic::AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    let out = dir.path().join("m");
    let mut o = opts(&out, DType::F32, Some("tests/fixtures/tiny/tied"));
    o.adapter = c.output.clone();
    merge(&o).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
    let merged = load_dir(&out);
    let mut adapted = load_dir(&tied);
    let (lc, w) = load_adapter(&c.output, &adapted.cfg).unwrap();
    adapted.lora = Some(Lora::new(&adapted.backend, &lc, &w, &adapted.cfg).unwrap());
    let ids = &golden_prompts()[0];
    let ids: Vec<u32> = ids
        .iter()
        .map(|&i| i % adapted.cfg.vocab_size as u32)
        .collect();
    let d = max_diff(&logits(&merged, &ids), &logits(&adapted, &ids));
    assert!(d < 1e-4, "untied merge vs adapter: {d}");
    // The embeddings themselves are unchanged.
    let base = Checkpoint::open(&tied).unwrap();
    let m = Checkpoint::open(&out).unwrap();
    let shape = [adapted.cfg.vocab_size, adapted.cfg.hidden_size];
    assert_eq!(
        base.load_f32("model.embed_tokens.weight", &shape).unwrap(),
        m.load_f32("model.embed_tokens.weight", &shape).unwrap()
    );
}
