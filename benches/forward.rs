//! CPU forward benchmarks: prefill (tokens/s over a whole prompt) and decode (one token with a
//! KV cache of `ctx` positions), for the tiny GQA fixture and for a random model of
//! SmolLM2-135M's exact shape (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
//! vocab 49152, tied embeddings).
//!
//! Run: `cargo bench --bench forward`. Throughput is reported in tokens (criterion "elem/s").

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qlora::backend::cpu::CpuBackend;
use qlora::config::ModelConfig;
use qlora::model::{BaseQuant, Llama, Logits};
use std::path::Path;
use std::time::Duration;

const SMOLLM2_135M: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,"intermediate_size":1536,
"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,
"max_position_embeddings":8192,"rope_theta":100000.0,"rms_norm_eps":1e-5,"tie_word_embeddings":true}"#;

fn bench_model(c: &mut Criterion, name: &str, model: &Llama<CpuBackend>, prompt_len: usize) {
    let vocab = model.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    // Sanity check before timing: finite logits of the right size.
    let mut cache = model.new_cache(prompt_len + 1).unwrap();
    let logits = model.forward(&ids, &mut cache, Logits::Last).unwrap();
    assert_eq!(logits.len(), model.cfg.vocab_size);
    assert!(
        logits.iter().all(|v| v.is_finite()),
        "non-finite logits in {name}"
    );

    let mut g = c.benchmark_group(format!("forward/{name}"));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(prompt_len as u64));
    g.bench_function(BenchmarkId::new("prefill", prompt_len), |b| {
        b.iter(|| {
            let mut cache = model.new_cache(prompt_len).unwrap();
            model.forward(&ids, &mut cache, Logits::Last).unwrap()
        })
    });
    // Decode: one token after a prefilled context of `prompt_len` positions. The cache is
    // rewound each iteration so every step decodes at the same position.
    let mut cache = model.new_cache(prompt_len + 1).unwrap();
    model.forward(&ids, &mut cache, Logits::Last).unwrap();
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("decode_at", prompt_len), |b| {
        b.iter(|| {
            cache.len = prompt_len;
            model.forward(&[42], &mut cache, Logits::Last).unwrap()
        })
    });
    g.finish();
}

fn forward(c: &mut Criterion) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/gqa");
    match qlora::loader::load_model_dir(&fixture, CpuBackend::new(), BaseQuant::None) {
        Ok(l) => bench_model(c, "tiny-gqa", &l.model, 64),
        Err(e) => eprintln!("skipping tiny-gqa fixture bench: {e}"),
    }
    let cfg = ModelConfig::from_json_str(SMOLLM2_135M).expect("static config");
    let model = Llama::random(CpuBackend::new(), &cfg, 0).expect("random model");
    bench_model(c, "smollm2-135m-shape", &model, 128);
}

criterion_group!(benches, forward);
criterion_main!(benches);
