//! One LoRA training step (forward, backward, clip, AdamW) of a SmolLM2-135M-shaped model with
//! random weights: the qlora side of `scripts/bench_train_step.sh` (PyTorch + PEFT is the other).
//!
//! `cargo run --release --example train_step -- [--threads N] [--steps K] [--seq T] [--rank R]
//! [--quant none|nf4]` prints one JSON object: median / min step seconds and peak RSS.

use qlora::backend::cpu::CpuBackend;
use qlora::config::ModelConfig;
use qlora::lora::{LoraConfig, LoraWeights};
use qlora::model::{Llama, Lora, LoraSet, Recompute};
use qlora::train::trainer::{adamw_update, clip_gradients};
use qlora::train::{AdamW, AdamWState};
use std::time::Instant;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> qlora::Result<()> {
    let threads: usize = arg("--threads", 0);
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .expect("thread pool");
    }
    let (steps, seq, rank): (usize, usize, usize) =
        (arg("--steps", 5), arg("--seq", 256), arg("--rank", 16));
    let quant: String = arg("--quant", "none".to_string());
    let cfg_path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/smollm2-135m.json");
    let cfg = ModelConfig::from_file(std::path::Path::new(cfg_path))?;
    let model = Llama::random(CpuBackend::new(), &cfg, 0)?;
    let mut model = model;
    if quant == "nf4" {
        // Quantize the decoder projections as a QLoRA load does (blocks of 64, double quant).
        use qlora::backend::cpu::{CpuLinear, CpuWeight};
        let q = |l: &mut CpuLinear| {
            if let CpuWeight::Dense(d) = &l.weight {
                let t =
                    qlora::quant::quantize_nf4(d, &[l.rows, l.cols], 64, true).expect("quantize");
                l.weight = CpuWeight::Nf4(t);
            }
        };
        for w in &mut model.layers {
            for l in [
                &mut w.q_proj,
                &mut w.k_proj,
                &mut w.v_proj,
                &mut w.o_proj,
                &mut w.gate_proj,
                &mut w.up_proj,
                &mut w.down_proj,
            ] {
                q(l);
            }
        }
    }
    let mut lcfg = LoraConfig::new(rank, 2.0 * rank as f32, &["all-linear"])?;
    lcfg.lora_dropout = 0.0;
    let mut weights = LoraWeights::init(&lcfg, &cfg, 0)?;
    model.lora = Some(Lora::new(&model.backend, &lcfg, &weights, &cfg)?);
    let ids: Vec<u32> = (0..seq)
        .map(|i| ((i * 7919 + 13) % cfg.vocab_size) as u32)
        .collect();
    let targets: Vec<i32> = ids[1..].iter().map(|&i| i as i32).chain([-100]).collect();
    let adam = AdamW {
        lr: 2e-4,
        ..AdamW::default()
    };
    let mut optim = AdamWState::new();
    let mut times = Vec::new();
    let mut loss = 0.0;
    for s in 0..=steps {
        let t0 = Instant::now();
        let lora = model.lora.as_ref().expect("attached");
        let mut grads: LoraSet<CpuBackend> = lora.params.zeros_like(&model.backend)?;
        let st = model.forward_backward(
            &ids,
            &targets,
            1.0 / (seq - 1) as f32,
            &mut grads,
            Recompute::Selective,
            None,
        )?;
        let mut g = grads.download(&model.backend)?;
        clip_gradients(&mut g, 1.0);
        adamw_update(&mut weights, &g, &mut optim, &adam, adam.lr);
        model.lora.as_mut().expect("attached").params =
            LoraSet::upload(&model.backend, &weights, cfg.num_hidden_layers)?;
        loss = st.loss_sum / st.targets as f64;
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64()); // step 0 is warm-up
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{{\"impl\": \"qlora\", \"quant\": \"{quant}\", \"threads\": {}, \"seq\": {seq}, \"rank\": {rank}, \"steps\": {steps}, \"median_s\": {:.4}, \"min_s\": {:.4}, \"loss\": {loss:.4}, \"peak_rss_mib\": {:.0}}}",
        rayon::current_num_threads(),
        times[times.len() / 2],
        times[0],
        qlora::sys::peak_rss_mib()
    );
    Ok(())
}
