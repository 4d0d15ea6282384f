//! The CPU forward pass against transformers (golden fixtures from scripts/make_fixtures.py):
//! full logits within 1e-4 (f32 weights), per-token losses, 32-token greedy continuations,
//! and `eval` losses within 1e-4 relative.

use qlora::backend::cpu::CpuBackend;
use qlora::backend::Backend;
use qlora::generate::{generate, Sampling};
use qlora::loader::{load_model_dir, Loaded};
use qlora::model::{BaseQuant, Logits};
use serde_json::Value;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn golden_tensor(st: &safetensors::SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("golden tensor {name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Max |a − b| over two equally long slices.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_model(name: &str) {
    let dir = fixture(name);
    let Loaded {
        model,
        tokenizer: _,
        ..
    } = load_model_dir(&dir, CpuBackend::new(), BaseQuant::None).unwrap();
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let prompts = golden["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 3);
    let v = model.cfg.vocab_size;
    for (i, p) in prompts.iter().enumerate() {
        let prompt = ids(p);
        let t = prompt.len();
        let mut cache = model.new_cache(t).unwrap();
        let logits = model.forward(&prompt, &mut cache, Logits::All).unwrap();
        let want = golden_tensor(&st, &format!("logits.{i}"));
        assert_eq!(logits.len(), t * v);
        let d = max_abs_diff(&logits, &want);
        eprintln!("{name} prompt {i} ({t} tokens): max |logit diff| vs transformers {d:.2e}");
        assert!(
            d <= 1e-4,
            "{name} prompt {i}: max |logit diff| {d:e} > 1e-4"
        );

        let mut targets: Vec<i32> = prompt[1..].iter().map(|&x| x as i32).collect();
        targets.push(-100);
        let mut losses = vec![0.0; t];
        model
            .backend
            .cross_entropy(&mut losses, &logits, &targets, v)
            .unwrap();
        let want = golden_tensor(&st, &format!("losses.{i}"));
        let d = max_abs_diff(&losses[..t - 1], &want);
        assert!(d <= 1e-4, "{name} prompt {i}: max |loss diff| {d:e}");

        // Greedy continuation: identical for 32 tokens (EOS disabled, as in the fixture).
        let want = ids(&golden["greedy"][i]);
        assert_eq!(want.len(), 32);
        let got = generate(&model, &prompt, 32, &Sampling::GREEDY, &[], |_| Ok(())).unwrap();
        assert_eq!(
            got.ids, want,
            "{name} prompt {i}: greedy continuation differs"
        );
    }
}

#[test]
fn gqa_f32_matches_transformers() {
    check_model("gqa");
}

#[test]
fn gqa_bf16_weights_match_transformers() {
    check_model("gqa-bf16");
}

#[test]
fn tied_embeddings_match_transformers() {
    check_model("tied");
}

#[test]
fn llama3_rope_scaling_and_explicit_head_dim_match_transformers() {
    if !fixture("llama3").join("golden.json").exists() {
        panic!("fixture tests/fixtures/tiny/llama3 is missing; regenerate with scripts/make_fixtures.py");
    }
    check_model("llama3");
}

/// Decoding token by token through the KV cache gives the same logits as one full pass.
#[test]
fn kv_cache_decode_equals_full_forward() {
    let Loaded { model, .. } =
        load_model_dir(&fixture("gqa"), CpuBackend::new(), BaseQuant::None).unwrap();
    let prompt: Vec<u32> = (1..20)
        .map(|i| (i * 37 % model.cfg.vocab_size) as u32)
        .collect();
    let mut cache = model.new_cache(prompt.len()).unwrap();
    let full = model.forward(&prompt, &mut cache, Logits::All).unwrap();
    let mut cache = model.new_cache(prompt.len()).unwrap();
    let v = model.cfg.vocab_size;
    model
        .forward(&prompt[..7], &mut cache, Logits::Last)
        .unwrap();
    for (k, &id) in prompt.iter().enumerate().skip(7) {
        let step = model.forward(&[id], &mut cache, Logits::Last).unwrap();
        let d = max_abs_diff(&step, &full[k * v..(k + 1) * v]);
        assert!(d <= 1e-5, "position {k}: {d:e}");
    }
}

/// `Llama::decode` (the step a device may record and replay) computes what a one-token
/// `forward` computes, bit for bit on the CPU, and refuses a full cache or a token outside the
/// vocabulary without touching the cache.
#[test]
fn decode_steps_equal_one_token_forwards() {
    let Loaded { model, .. } =
        load_model_dir(&fixture("gqa"), CpuBackend::new(), BaseQuant::None).unwrap();
    let prompt: Vec<u32> = (1..12)
        .map(|i| (i * 37 % model.cfg.vocab_size) as u32)
        .collect();
    let (mut a, mut b) = (
        model.new_cache(prompt.len()).unwrap(),
        model.new_cache(prompt.len()).unwrap(),
    );
    model.forward(&prompt[..4], &mut a, Logits::Last).unwrap();
    model.forward(&prompt[..4], &mut b, Logits::Last).unwrap();
    for &id in &prompt[4..] {
        let want = model.forward(&[id], &mut a, Logits::Last).unwrap();
        let got = model.decode(id, &mut b).unwrap();
        assert_eq!(got, &want);
    }
    assert_eq!(b.len, prompt.len());
    let e = model.decode(1, &mut b).unwrap_err().to_string();
    assert!(e.contains("positions are all filled"), "{e}");
    let mut c = model.new_cache(4).unwrap();
    let e = model
        .decode(model.cfg.vocab_size as u32, &mut c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the embedding table"), "{e}");
    assert_eq!(c.len, 0);
}

#[test]
fn eval_loss_matches_transformers() {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("eval_golden.json")).unwrap())
            .unwrap();
    let rows = qlora::data::load_rows(&fixture("eval.jsonl"), None).unwrap();
    let texts = qlora::data::texts(&rows, "text").unwrap();
    let mut checked = 0;
    for model_name in ["gqa", "tied"] {
        let l = load_model_dir(&fixture(model_name), CpuBackend::new(), BaseQuant::None).unwrap();
        for (len, want) in golden[model_name].as_object().unwrap() {
            let Ok(max_len) = len.parse::<usize>() else {
                continue;
            };
            let r =
                qlora::eval::evaluate(&l.model, &l.tokenizer, &texts, max_len, |_, _| {}).unwrap();
            let want_loss = want["loss"].as_f64().unwrap();
            assert_eq!(
                r.tokens as u64,
                want["tokens"].as_u64().unwrap(),
                "{model_name} @ {len}"
            );
            let rel = (r.loss - want_loss).abs() / want_loss;
            assert!(
                rel <= 1e-4,
                "{model_name} @ {len}: loss {} vs {want_loss} (rel {rel:e})",
                r.loss
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
}

/// The NF4 model (fused dequantize-in-matmul) computes the same logits as a dense model whose
/// linears are the dequantized NF4 weights: the fused path adds no error of its own.
#[test]
fn nf4_forward_equals_dense_forward_on_dequantized_weights() {
    use qlora::backend::cpu::CpuWeight;
    let nf4 = load_model_dir(&fixture("gqa"), CpuBackend::new(), BaseQuant::NF4)
        .unwrap()
        .model;
    assert!(
        matches!(nf4.layers[0].q_proj.weight, CpuWeight::Nf4(_)),
        "decoder linear was not quantized"
    );
    let reference = nf4.dequantized();
    let prompt: Vec<u32> = (0..23)
        .map(|i| (i * 53 % nf4.cfg.vocab_size) as u32)
        .collect();
    let mut c1 = nf4.new_cache(prompt.len()).unwrap();
    let mut c2 = reference.new_cache(prompt.len()).unwrap();
    let a = nf4.forward(&prompt, &mut c1, Logits::All).unwrap();
    let b = reference.forward(&prompt, &mut c2, Logits::All).unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-4, "fused NF4 vs dequantized dense: {d:e}");
    // And quantization really changed the model (the test is not vacuous).
    let f32_model = load_model_dir(&fixture("gqa"), CpuBackend::new(), BaseQuant::None)
        .unwrap()
        .model;
    let mut c3 = f32_model.new_cache(prompt.len()).unwrap();
    let c = f32_model.forward(&prompt, &mut c3, Logits::All).unwrap();
    assert!(max_abs_diff(&a, &c) > 1e-3);
}
