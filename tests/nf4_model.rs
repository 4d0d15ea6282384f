//! Tiny models in NF4 against transformers + bitsandbytes 4-bit (fixtures from
//! `scripts/fixtures_bnb.py`): logits within 1e-3, both when `qlora` quantizes the f32 model
//! while loading and when it loads the checkpoint transformers saved in 4-bit.

use qlora::backend::cpu::CpuBackend;
use qlora::loader::load_model_dir;
use qlora::model::{BaseQuant, Logits};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Max |logit − golden| over the golden prompts of `golden_dir`, for a model loaded from `model_dir`.
fn max_diff_vs_golden(model_dir: &Path, quant: BaseQuant, golden_dir: &Path) -> f32 {
    let model = load_model_dir(model_dir, CpuBackend::new(), quant)
        .unwrap()
        .model;
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir.join("golden.json")).unwrap())
            .unwrap();
    let bytes = std::fs::read(golden_dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut worst = 0.0f32;
    let prompts = golden["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 3);
    for (i, p) in prompts.iter().enumerate() {
        let ids: Vec<u32> = p
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let mut cache = model.new_cache(ids.len()).unwrap();
        let logits = model.forward(&ids, &mut cache, Logits::All).unwrap();
        let want: Vec<f32> = st
            .tensor(&format!("logits.{i}"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(logits.len(), want.len());
        let d = logits
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!(
            "{} prompt {i}: max |Δlogit| vs transformers 4-bit = {d:.2e}",
            model_dir.display()
        );
        worst = worst.max(d);
    }
    worst
}

#[test]
fn quantized_while_loading_matches_transformers_4bit_double_quant() {
    let d = max_diff_vs_golden(
        &fixtures().join("tiny/gqa"),
        BaseQuant::NF4,
        &fixtures().join("bnb/gqa-bnb4"),
    );
    assert!(d <= 1e-3, "{d:e}");
}

#[test]
fn quantized_while_loading_matches_transformers_4bit_without_double_quant() {
    let quant = BaseQuant::Nf4 {
        blocksize: 64,
        double_quant: false,
    };
    let d = max_diff_vs_golden(
        &fixtures().join("tiny/tied"),
        quant,
        &fixtures().join("bnb/tied-bnb4-nodq"),
    );
    assert!(d <= 1e-3, "{d:e}");
}
#[test]
fn transformers_saved_4bit_checkpoints_load_directly() {
    for name in ["gqa-bnb4", "tied-bnb4-nodq"] {
        let dir = fixtures().join("bnb").join(name);
        // The flag does not matter for a pre-quantized checkpoint: its NF4 bytes are used as they are.
        let d = max_diff_vs_golden(&dir, BaseQuant::NF4, &dir);
        assert!(d <= 1e-3, "{name}: {d:e}");
    }
}

/// The benchmark model of `benches/cuda.rs` at a tiny size: double-quantized NF4 projections,
/// bf16-valued dense tensors, and a forward pass that runs.
#[test]
fn random_nf4_model_is_double_quantized_and_runs() {
    use qlora::backend::cpu::CpuWeight;
    use qlora::model::Llama;
    use qlora::quant::Absmax;
    let cfg =
        qlora::config::ModelConfig::from_file(&fixtures().join("tiny/gqa/config.json")).unwrap();
    let model = Llama::random_nf4(CpuBackend::new(), &cfg, 3).unwrap();
    match &model.layers[0].q_proj.weight {
        CpuWeight::Nf4(t) => assert!(matches!(t.absmax, Absmax::Double { .. })),
        CpuWeight::Dense(_) => panic!("q_proj should be NF4"),
    }
    let CpuWeight::Dense(head) = &model.lm_head.weight else {
        panic!("lm_head stays dense");
    };
    assert!(head.iter().all(|v| half::bf16::from_f32(*v).to_f32() == *v));
    let ids = [1u32, 5, 9, 2];
    let mut cache = model.new_cache(ids.len()).unwrap();
    let logits = model.forward(&ids, &mut cache, Logits::Last).unwrap();
    assert_eq!(logits.len(), cfg.vocab_size);
    assert!(logits.iter().all(|v| v.is_finite()));
}
