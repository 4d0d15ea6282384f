//! LoRA forward/backward of the whole model (`Llama::forward_backward`) against PEFT 0.21.2
//! (`tests/fixtures/peft/gqa-lora`, written by `scripts/fixtures_peft.py`): adapter logits,
//! loss, every lora_A / lora_B gradient; plus recompute modes and dropout determinism.

mod common;

use qlora::backend::cpu::CpuBackend;
use qlora::config::ModelConfig;
use qlora::lora::{load_adapter, peft_key, LoraConfig, LoraWeights};
use qlora::model::{BaseQuant, Llama, Logits, Lora, LoraSet, Recompute};
use qlora::weights::Checkpoint;
use std::path::Path;

use common::{golden_prompts, root};

fn golden(name: &str) -> Vec<f32> {
    let bytes =
        std::fs::read(root().join("tests/fixtures/peft/gqa-lora/golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("golden has no {name}"));
    v.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn load_model(dir: &Path, quant: BaseQuant) -> Llama<CpuBackend> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = Checkpoint::open(dir).unwrap();
    Llama::load(CpuBackend::new(), &ckpt, &cfg, quant, |_, _| {}).unwrap()
}

/// The tiny GQA model with PEFT's adapter attached (`--quant none`, as the goldens).
fn peft_model() -> (Llama<CpuBackend>, LoraConfig, LoraWeights) {
    let mut m = load_model(&root().join("tests/fixtures/tiny/gqa"), BaseQuant::None);
    let (cfg, w) = load_adapter(&root().join("tests/fixtures/peft/gqa-lora"), &m.cfg).unwrap();
    m.lora = Some(Lora::new(&m.backend, &cfg, &w, &m.cfg).unwrap());
    (m, cfg, w)
}

/// Next-token targets of a causal LM: position t predicts ids[t+1]; the last predicts nothing.
fn targets(ids: &[u32]) -> Vec<i32> {
    ids[1..].iter().map(|&i| i as i32).chain([-100]).collect()
}

fn grads_of(
    m: &Llama<CpuBackend>,
    ids: &[u32],
    recompute: Recompute,
    seed: Option<u64>,
) -> (f64, LoraWeights) {
    let lora = m.lora.as_ref().unwrap();
    let mut g = lora.params.zeros_like(&m.backend).unwrap();
    let n = ids.len() - 1;
    let st = m
        .forward_backward(ids, &targets(ids), 1.0 / n as f32, &mut g, recompute, seed)
        .unwrap();
    assert_eq!(st.targets, n);
    (st.loss_sum / n as f64, g.download(&m.backend).unwrap())
}

/// `max_i |a_i − b_i| / max_i |b_i|`: error relative to the tensor's scale.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    err / scale.max(1e-30)
}

#[test]
fn adapter_logits_match_peft() {
    let (m, _, _) = peft_model();
    let mut worst = 0f32;
    for (i, ids) in golden_prompts().iter().enumerate() {
        let mut cache = m.new_cache(ids.len()).unwrap();
        let got = m.forward(ids, &mut cache, Logits::All).unwrap();
        let want = golden(&format!("logits.{i}"));
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            worst = worst.max((a - b).abs());
        }
        // The adapter must matter: the base model's logits differ clearly.
    }
    println!("adapter logits vs PEFT: max |Δ| = {worst:.2e}");
    assert!(worst < 1e-4, "adapter logits differ from PEFT by {worst}");
}

#[test]
fn adapter_changes_the_output() {
    let (m, _, _) = peft_model();
    let base = load_model(&root().join("tests/fixtures/tiny/gqa"), BaseQuant::None);
    let ids = &golden_prompts()[0];
    let run = |m: &Llama<CpuBackend>| {
        let mut cache = m.new_cache(ids.len()).unwrap();
        m.forward(ids, &mut cache, Logits::All).unwrap()
    };
    let (a, b) = (run(&m), run(&base));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |d, (x, y)| d.max((x - y).abs()));
    assert!(diff > 1e-2, "adapter changes logits by only {diff}");
}

#[test]
fn lora_gradients_match_peft() {
    let (m, _, w) = peft_model();
    let ids = &golden_prompts()[0];
    let (loss, grads) = grads_of(&m, ids, Recompute::Selective, None);
    let want_loss = golden("loss.0")[0] as f64;
    println!("loss {loss:.7} vs PEFT {want_loss:.7}");
    assert!((loss - want_loss).abs() / want_loss < 1e-5);
    let mut worst = 0f64;
    for (module, pair) in &grads.modules {
        for (is_a, got) in [(true, &pair.a), (false, &pair.b)] {
            let key = peft_key(module, is_a);
            let want = golden(&format!("grad.{key}"));
            let e = rel(got, &want);
            println!("{key}: rel err {e:.2e}");
            assert!(
                want.iter().any(|&v| v != 0.0),
                "{key}: PEFT gradient is all zero"
            );
            worst = worst.max(e);
        }
    }
    assert_eq!(grads.modules.len(), w.modules.len());
    println!("LoRA gradients vs PEFT: max relative error {worst:.2e}");
    assert!(worst < 1e-4, "gradients differ from PEFT by {worst:.2e}");
}

#[test]
fn full_recompute_equals_selective() {
    let (mut m, cfg, w) = peft_model();
    let mut cfg = cfg;
    cfg.lora_dropout = 0.3;
    m.lora = Some(Lora::new(&m.backend, &cfg, &w, &m.cfg).unwrap());
    let ids = &golden_prompts()[1];
    let (l1, g1) = grads_of(&m, ids, Recompute::Selective, Some(7));
    let (l2, g2) = grads_of(&m, ids, Recompute::Full, Some(7));
    assert_eq!(l1, l2);
    assert_eq!(
        g1, g2,
        "full recompute must reproduce the selective gradients bit for bit"
    );
    // Dropout is active: another seed gives other gradients, no seed gives the dropout-free ones.
    let (_, g3) = grads_of(&m, ids, Recompute::Selective, Some(8));
    assert_ne!(g1, g3);
    let (l4, _) = grads_of(&m, ids, Recompute::Selective, None);
    assert_ne!(l1, l4);
}

#[test]
fn gradients_accumulate_over_calls() {
    let (m, _, _) = peft_model();
    let ids = &golden_prompts()[0];
    let lora = m.lora.as_ref().unwrap();
    let mut g: LoraSet<CpuBackend> = lora.params.zeros_like(&m.backend).unwrap();
    let t = targets(ids);
    for _ in 0..2 {
        m.forward_backward(ids, &t, 0.5, &mut g, Recompute::Selective, None)
            .unwrap();
    }
    let twice = g.download(&m.backend).unwrap();
    let mut once = lora.params.zeros_like(&m.backend).unwrap();
    m.forward_backward(ids, &t, 1.0, &mut once, Recompute::Selective, None)
        .unwrap();
    let once = once.download(&m.backend).unwrap();
    for (a, b) in twice.modules.values().zip(once.modules.values()) {
        assert!(rel(&a.a, &b.a) < 1e-6 && rel(&a.b, &b.b) < 1e-6);
    }
}

#[test]
fn nf4_base_gradients_equal_dequantized_dense() {
    // QLoRA: the adapter on the NF4 base. The fused NF4 kernels (x·Wᵀ and dy·W) must give the
    // gradients of the dense model whose weights are the dequantized NF4 values.
    let (_, cfg, w) = peft_model();
    let mut q = load_model(&root().join("tests/fixtures/tiny/gqa"), BaseQuant::NF4);
    let mut d = q.dequantized();
    q.lora = Some(Lora::new(&q.backend, &cfg, &w, &q.cfg).unwrap());
    d.lora = Some(Lora::new(&d.backend, &cfg, &w, &d.cfg).unwrap());
    let ids = &golden_prompts()[0];
    let (lq, gq) = grads_of(&q, ids, Recompute::Selective, None);
    let (ld, gd) = grads_of(&d, ids, Recompute::Selective, None);
    assert!((lq - ld).abs() < 1e-5 * ld, "loss {lq} vs {ld}");
    let mut worst = 0f64;
    for (a, b) in gq.modules.values().zip(gd.modules.values()) {
        worst = worst.max(rel(&a.a, &b.a)).max(rel(&a.b, &b.b));
    }
    println!("NF4 vs dequantized-dense LoRA gradients: max rel err {worst:.2e}");
    assert!(worst < 1e-4);
}

#[test]
fn qlora_trained_adapter_reproduces_in_peft() {
    // tests/fixtures/peft/qlora-trained was written by `qlora train` (all-linear, rsLoRA, r 4, 6
    // steps, --quant none); peft_check.safetensors holds PEFT 0.21.2's logits with it loaded via
    // PeftModel.from_pretrained (`scripts/fixtures_peft.py --check-qlora DIR`).
    let dir = root().join("tests/fixtures/peft/qlora-trained");
    let mut m = load_model(&root().join("tests/fixtures/tiny/gqa"), BaseQuant::None);
    let (cfg, w) = load_adapter(&dir, &m.cfg).unwrap();
    assert!(cfg.use_rslora && w.modules.values().all(|p| p.b.iter().any(|&v| v != 0.0)));
    m.lora = Some(Lora::new(&m.backend, &cfg, &w, &m.cfg).unwrap());
    let bytes = std::fs::read(dir.join("peft_check.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut worst = 0f32;
    for (i, ids) in golden_prompts().iter().enumerate() {
        let mut cache = m.new_cache(ids.len()).unwrap();
        let got = m.forward(ids, &mut cache, Logits::All).unwrap();
        let want: Vec<f32> = st
            .tensor(&format!("logits.{i}"))
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(got.len(), want.len());
        worst = got
            .iter()
            .zip(&want)
            .fold(worst, |w, (a, b)| w.max((a - b).abs()));
    }
    println!("qlora-written adapter in PEFT: max |Δlogit| = {worst:.2e}");
    assert!(worst < 1e-4);
}

#[test]
fn chunked_head_equals_unchunked() {
    // The head runs `ce_chunk` tokens at a time (never a [T, vocab] logits buffer); chunks are
    // independent rows, dropout masks included (lm_head adapted, p = 0.2), so any chunking gives
    // the loss and gradients of one pass over all tokens.
    let mut m = load_model(&root().join("tests/fixtures/tiny/gqa"), BaseQuant::None);
    let mut cfg = LoraConfig::new(4, 8.0, &["q_proj", "v_proj", "down_proj", "lm_head"]).unwrap();
    cfg.lora_dropout = 0.2;
    let mut w = LoraWeights::init(&cfg, &m.cfg, 3).unwrap();
    for p in w.modules.values_mut() {
        for (i, b) in p.b.iter_mut().enumerate() {
            *b = (i as f32 * 0.37).sin() * 0.05; // non-zero B: every A gets a gradient
        }
    }
    m.lora = Some(Lora::new(&m.backend, &cfg, &w, &m.cfg).unwrap());
    let ids: Vec<u32> = golden_prompts().concat().into_iter().take(45).collect();
    assert!(ids.len() > 20, "need a sequence longer than the chunks");
    m.ce_chunk = usize::MAX;
    let (l1, g1) = grads_of(&m, &ids, Recompute::Selective, Some(5));
    for chunk in [1, 7, 16] {
        m.ce_chunk = chunk;
        let (l2, g2) = grads_of(&m, &ids, Recompute::Selective, Some(5));
        assert!(
            (l1 - l2).abs() <= 1e-6 * l1.abs(),
            "chunk {chunk}: loss {l2} vs {l1}"
        );
        for (k, p) in &g1.modules {
            let q = &g2.modules[k];
            for (is_a, a, b) in [(true, &q.a, &p.a), (false, &q.b, &p.b)] {
                // Equal in exact arithmetic; in f32 the head's products over 1, 7 or 16 rows sum
                // in another order than over all 45 (the gemm crate's row blocking), and the
                // backward carries that last-bit noise through every layer: ~1e-6 at layer 0.
                let e = rel(a, b);
                assert!(
                    e <= 5e-6,
                    "chunk {chunk}: {} err {e:.2e}",
                    peft_key(k, is_a)
                );
            }
        }
    }
}

#[test]
fn packed_step_equals_one_sequence_at_a_time() {
    // A micro-batch packed along the token axis (one product per projection, attention and
    // positions restarting per sequence, each sequence's own dropout masks) against the same
    // sequences one at a time, with every module and lm_head adapted and dropout 0.2.
    use qlora::model::SeqInput;
    let mut m = load_model(&root().join("tests/fixtures/tiny/gqa"), BaseQuant::NF4);
    let mut cfg = LoraConfig::new(4, 8.0, &["all-linear", "lm_head"]).unwrap();
    cfg.lora_dropout = 0.2;
    let mut w = LoraWeights::init(&cfg, &m.cfg, 3).unwrap();
    for p in w.modules.values_mut() {
        for (i, b) in p.b.iter_mut().enumerate() {
            *b = (i as f32 * 0.37).sin() * 0.05;
        }
    }
    m.lora = Some(Lora::new(&m.backend, &cfg, &w, &m.cfg).unwrap());
    m.ce_chunk = 16; // head chunks that straddle sequences
    let all: Vec<u32> = golden_prompts().concat();
    let ids = [&all[..13], &all[13..14], &all[14..43]];
    let tg: Vec<Vec<i32>> = ids.iter().map(|s| targets(s)).collect();
    let scale = 1.0 / 40.0;
    let lora = m.lora.as_ref().unwrap();
    let mut g1 = lora.params.zeros_like(&m.backend).unwrap();
    let mut loss1 = 0.0;
    for (k, (s, t)) in ids.iter().zip(&tg).enumerate() {
        let seed = Some(100 + k as u64);
        let st = m
            .forward_backward(s, t, scale, &mut g1, Recompute::Selective, seed)
            .unwrap();
        loss1 += st.loss_sum;
    }
    let seqs: Vec<SeqInput> = ids
        .iter()
        .zip(&tg)
        .enumerate()
        .map(|(k, (s, t))| SeqInput {
            ids: s,
            targets: t,
            dropout_seed: Some(100 + k as u64),
        })
        .collect();
    for recompute in [Recompute::Selective, Recompute::Full] {
        let mut g2 = lora.params.zeros_like(&m.backend).unwrap();
        let st = m
            .forward_backward_packed(&seqs, scale, &mut g2, recompute)
            .unwrap();
        assert_eq!(st.targets, 40);
        assert!(
            (st.loss_sum - loss1).abs() <= 1e-6 * loss1.abs(),
            "{recompute:?}: loss {} vs {loss1}",
            st.loss_sum
        );
        let (g1h, g2h) = (
            g1.download(&m.backend).unwrap(),
            g2.download(&m.backend).unwrap(),
        );
        let mut worst = 0f64;
        for (k, p) in &g1h.modules {
            let q = &g2h.modules[k];
            worst = worst.max(rel(&q.a, &p.a)).max(rel(&q.b, &p.b));
        }
        println!("packed vs one at a time ({recompute:?}): worst gradient error {worst:.2e}");
        assert!(
            worst <= 1e-6,
            "{recompute:?}: gradients differ by {worst:.2e}"
        );
    }
}

/// `Llama::freeze_adapter` (what generate, chat and eval call after attaching an adapter) on the
/// CPU backend, the spec, makes no copies: logits and generated tokens stay bit-identical.
#[test]
fn frozen_adapter_is_bit_identical_on_the_cpu() {
    let (mut m, _, _) = peft_model();
    let run = |m: &Llama<CpuBackend>| {
        let ids = &golden_prompts()[0];
        let mut cache = m.new_cache(ids.len()).unwrap();
        let logits = m.forward(ids, &mut cache, Logits::All).unwrap();
        let sampling = qlora::generate::Sampling {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            seed: 7,
        };
        let gen = qlora::generate::generate(m, ids, 8, &sampling, &[], |_| Ok(())).unwrap();
        (logits, gen.ids)
    };
    let before = run(&m);
    m.freeze_adapter().unwrap();
    let params = &m.lora.as_ref().unwrap().params;
    assert!(params.modules().iter().all(|(_, l)| l.frozen.is_none()));
    let after = run(&m);
    assert_eq!(before.0.len(), after.0.len());
    assert!(before
        .0
        .iter()
        .zip(&after.0)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!(before.1, after.1);
}
