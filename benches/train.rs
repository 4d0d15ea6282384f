//! LoRA training steps at Llama-2-7B scale on the GPU (`cargo bench --features cuda --bench
//! train`), the figures `scripts/bench_train_ref.py` measures for transformers + PEFT +
//! bitsandbytes on the same shapes. Without the `cuda` feature or without a usable GPU it skips
//! with a message.
//!
//! # What runs
//! - **Model**: random weights in Llama-2-7B's exact shapes (`tests/fixtures/llama-2-7b-chat-hf/
//!   config.json`): 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000. Decoder projections
//!   are NF4 (blocksize 64, double-quantized scales, QLoRA's setting), generated directly as
//!   codes: random bytes per layer and tensor (a splitmix64 fill on every core) and one random
//!   double-quantized scale vector per weight shape, shared by the layers. `Llama::random_nf4`
//!   does the same job from one `StdRng` stream on one thread (3.2 GB of codes, 101 M scales
//!   through `random_range` and the 8-bit compression, 131 M lm_head values): its host work
//!   measured 7.8 s on this project's 2-core machine under load, this bench's 5.5 s on 2 threads
//!   (the codes' part scales with cores: ~0.5 s on the device machine's 16), so the bench builds
//!   the `Llama` itself. Embeddings are f32, lm_head bf16-exact values (kept in 16 bits on the
//!   device), norms 1. Then ~3.9 GB go up to the device. The build time is printed (`build_s`).
//! - **Adapters** (PEFT's init: `A` Kaiming-uniform, `B = 0`; dropout 0.1 as in the tutorial):
//!   `r8-qv` (r 8, alpha 16, q_proj + v_proj: the guanaco-llama2-1k tutorial) and `r16-all`
//!   (r 16, alpha 32, the seven projections of every layer: PEFT's `all-linear`).
//! - **Recompute**: `selective` (keep the expensive activations) and `full` (keep each layer's
//!   input, rerun the layer in backward: what gradient checkpointing does in PyTorch).
//! - **Step**: one micro-batch of 4 sequences × 512 tokens, packed along the token axis
//!   (`Llama::forward_backward_packed`), then clip to 0.3 + AdamW (lr 2e-4, weight decay 0.001:
//!   the tutorial's) with paged 32-bit states (`TrainBackend::adamw_step`, `PagedAdamW32bit`),
//!   then the gradients are zeroed. The clock runs from the step's start until the stream is
//!   idle after the optimizer.
//!
//! Per config: `WARMUP` steps (default 2, untimed; the first allocates the step's buffers and
//! the optimizer's pages), then up to `STEPS` timed steps (default 5; fewer, at least 2, when the
//! last warm-up step says they would take longer than `BUDGET_S`, default 25 s), so the four
//! configs take about 30 s on an H100 at the reference's speed and under 3 minutes even at a
//! few hundred tokens/s. Validation before any timing: the first step's loss must be finite and
//! the gradient norm (over every LoRA tensor, as `adamw_step` returns it) finite and non-zero;
//! every later step's loss and norm must stay finite.
//!
//! # Output
//! One JSON line per config on stdout (progress on stderr):
//! `{"impl": "qlora", "config": "r16-all/full", "lora_r", "lora_alpha", "targets",
//! "recompute", "batch": 4, "seq_len": 512, "tokens_per_step": 2048, "warmup", "steps",
//! "step_s" (median), "step_s_min", "tokens_per_s" (tokens_per_step / step_s), "mfu",
//! "model_tflop_per_step", "attn_tflop_per_step", "peak_tflops", "peak_device_mib",
//! "driver_used_mib", "loss_first", "loss_last", "grad_norm_first", "device", "build_s"}`.
//! `peak_device_mib` is the high-water mark of qlora's own buffers during the config
//! (`Backend::device_memory_peak` after `CudaDevice::reset_peak`: model, adapter, gradients,
//! optimizer states, activations, scratch; not the CUDA context or cuBLAS' workspace);
//! `driver_used_mib` is the driver's `total − free` after the config's last step (everything).
//!
//! # Model FLOP utilisation
//! `mfu = model_flops / (step_s · peak)`, with `peak` the card's dense bf16 tensor-core rate
//! (H100 SXM / H200: 989.4 TFLOP/s, H100 PCIe: 756, H100 NVL: 835, A100: 312; override with
//! `QLORA_PEAK_TFLOPS`; `null` for an unknown card) and, per step of `tokens` tokens in
//! sequences of `T_s` tokens,
//! ```text
//! model_flops = 4·N_frozen·tokens + 6·N_lora·tokens + 6·L·q_dim·Σ_s T_s²
//! N_frozen = L·(2·C·q_dim + 2·C·kv_dim + 3·C·F) + V·C    (6.607 G for Llama-2-7B)
//! N_lora   = Σ over adapted modules of r·(in + out)
//! ```
//! Source: the `6N` rule (Kaplan et al. 2020, "Scaling laws for neural language models", §2.1:
//! 2N forward, 4N backward = 2N for input gradients + 2N for weight gradients) and PaLM's MFU
//! (Chowdhery et al. 2022, appendix B: observed model FLOPs over peak, recomputation not
//! counted, attention as `12·L·H·Q·T` per token for non-causal attention). With frozen base
//! weights there is no weight gradient, so the frozen matmuls count **4N** (forward + backward
//! input gradient) and the trainable LoRA matrices the full 6 per parameter. The attention term
//! is PaLM's halved for causal masking: forward `QKᵀ` and `PV` `2·T²·q_dim` per layer and
//! sequence, backward twice that. `model_tflop_per_step` includes it, `attn_tflop_per_step`
//! states it separately (1.5 % of the total at 4 × 512). `full` recompute does ~2N more work
//! per token than it is credited for, by this definition (PaLM's); the reference's gradient
//! checkpointing likewise.
//!
//! Filters: `cargo bench --features cuda --bench train -- r16` runs the configs whose name
//! contains an argument. Environment: `QLORA_TRAIN_BENCH_STEPS`, `QLORA_TRAIN_BENCH_WARMUP`,
//! `QLORA_TRAIN_BENCH_BUDGET_S`, `QLORA_PEAK_TFLOPS`.

fn main() {
    #[cfg(feature = "cuda")]
    gpu::run();
    #[cfg(not(feature = "cuda"))]
    eprintln!("skipping training bench: built without --features cuda");
}

#[cfg(feature = "cuda")]
mod gpu {
    use qlora::backend::cuda::backend::{CudaBackend, CudaLinear};
    use qlora::backend::{Backend, HostLinear, TrainBackend};
    use qlora::config::ModelConfig;
    use qlora::lora::{LoraConfig, LoraWeights};
    use qlora::model::train::CE_CHUNK;
    use qlora::model::{LayerWeights, Llama, Lora, LoraSet, Recompute, SeqInput};
    use qlora::quant::double_quant::compress_absmax;
    use qlora::quant::{Absmax, Nf4Tensor};
    use qlora::train::{AdamW, OptimKind};
    use qlora::Result;
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    use std::collections::HashMap;
    use std::time::Instant;

    type Model = Llama<CudaBackend>;
    type OptState = <CudaBackend as TrainBackend>::OptState;

    /// Sequences per micro-batch and tokens per sequence (the issue's 4 × 512).
    const BATCH: usize = 4;
    const SEQ_LEN: usize = 512;
    /// The tutorial's optimizer settings (`qlora train` defaults).
    const LR: f64 = 2e-4;
    const WEIGHT_DECAY: f64 = 0.001;
    const MAX_GRAD_NORM: f32 = 0.3;
    const LORA_DROPOUT: f32 = 0.1;

    /// An adapter configuration: name, rank, alpha, target modules.
    struct LoraSpec {
        name: &'static str,
        r: usize,
        alpha: f32,
        targets: &'static [&'static str],
    }

    const LORAS: [LoraSpec; 2] = [
        LoraSpec {
            name: "r8-qv",
            r: 8,
            alpha: 16.0,
            targets: &["q_proj", "v_proj"],
        },
        LoraSpec {
            name: "r16-all",
            r: 16,
            alpha: 32.0,
            targets: &["all-linear"],
        },
    ];

    fn env_usize(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn splitmix64(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with pseudo-random bytes, a pure function of `seed`, on every core.
    fn fill_random(buf: &mut [u8], seed: u64) {
        buf.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut s = splitmix64(seed ^ splitmix64(i as u64));
                for w in chunk.chunks_mut(8) {
                    s = splitmix64(s);
                    w.copy_from_slice(&s.to_le_bytes()[..w.len()]);
                }
            });
    }

    /// A uniform value in `[lo, hi)` from the hash of `i`.
    fn hashed_uniform(seed: u64, i: usize, lo: f32, hi: f32) -> f32 {
        let u = (splitmix64(seed ^ i as u64) >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    /// A random NF4 projection `[rows, cols]`: fresh codes, the shape's shared scales.
    fn nf4_linear(
        g: &CudaBackend,
        scales: &mut HashMap<(usize, usize), Absmax>,
        rng: &mut rand::rngs::StdRng,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> Result<CudaLinear> {
        let n = rows * cols;
        let absmax = scales
            .entry((rows, cols))
            .or_insert_with(|| {
                let a: Vec<f32> = (0..n.div_ceil(64))
                    .map(|_| rng.random_range(0.01f32..0.05))
                    .collect();
                compress_absmax(&a)
            })
            .clone();
        let mut packed = vec![0u8; n.div_ceil(2)];
        fill_random(&mut packed, seed);
        g.linear(HostLinear::Nf4(Nf4Tensor {
            shape: vec![rows, cols],
            blocksize: 64,
            packed,
            absmax,
        }))
    }

    /// The random NF4 model of the file header, built tensor by tensor (host memory: one
    /// tensor at a time plus the 16-bit embedding and lm_head).
    fn random_model(g: CudaBackend, cfg: &ModelConfig, seed: u64) -> Result<Model> {
        let (c, f, qd, kvd, v) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.vocab_size,
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut scales = HashMap::new();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let ones = vec![1f32; c];
        for l in 0..cfg.num_hidden_layers {
            let s = |t: u64| splitmix64(seed ^ ((l as u64) << 8 | t));
            let mut lin = |rows, cols, t| nf4_linear(&g, &mut scales, &mut rng, rows, cols, s(t));
            layers.push(LayerWeights {
                attn_norm: g.upload(&ones)?,
                q_proj: lin(qd, c, 0)?,
                k_proj: lin(kvd, c, 1)?,
                v_proj: lin(kvd, c, 2)?,
                o_proj: lin(c, qd, 3)?,
                mlp_norm: g.upload(&ones)?,
                gate_proj: lin(f, c, 4)?,
                up_proj: lin(f, c, 5)?,
                down_proj: lin(c, f, 6)?,
            });
        }
        // bf16 values: kept 16-bit on the device, as a checkpoint's f16/bf16 table is.
        let embed: Vec<f32> = (0..v * c)
            .into_par_iter()
            .map(|i| half::bf16::from_f32(hashed_uniform(seed ^ 0xE, i, -0.05, 0.05)).to_f32())
            .collect();
        let embed = g.linear(HostLinear::Dense {
            rows: v,
            cols: c,
            data: embed,
        })?;
        let head: Vec<f32> = (0..v * c)
            .into_par_iter()
            .map(|i| half::bf16::from_f32(hashed_uniform(seed ^ 0x4, i, -0.05, 0.05)).to_f32())
            .collect();
        let lm_head = g.linear(HostLinear::Dense {
            rows: v,
            cols: c,
            data: head,
        })?;
        let norm = g.upload(&ones)?;
        let inv_freq = g.upload(&cfg.rope_inv_freq())?;
        Ok(Llama {
            cfg: cfg.clone(),
            backend: g,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            lora: None,
            ce_chunk: CE_CHUNK,
        })
    }

    /// The card's dense bf16 tensor-core peak in FLOP/s (see the file header).
    fn peak_flops(name: &str) -> Option<f64> {
        if let Some(t) = std::env::var("QLORA_PEAK_TFLOPS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
        {
            return Some(t * 1e12);
        }
        let n = name.to_ascii_uppercase();
        let tflops = if n.contains("H100") && n.contains("PCIE") {
            756.0
        } else if n.contains("H100") && n.contains("NVL") {
            835.0
        } else if n.contains("H100") || n.contains("H200") || n.contains("H800") {
            989.4
        } else if n.contains("A100") || n.contains("A800") {
            312.0
        } else {
            return None;
        };
        Some(tflops * 1e12)
    }

    /// `(model FLOPs, of which attention)` of one step (the file header's formula).
    fn step_flops(cfg: &ModelConfig, set: &LoraSet<CudaBackend>, lens: &[usize]) -> (f64, f64) {
        let (c, f, qd, kvd, v, l) = (
            cfg.hidden_size as f64,
            cfg.intermediate_size as f64,
            cfg.q_dim() as f64,
            cfg.kv_dim() as f64,
            cfg.vocab_size as f64,
            cfg.num_hidden_layers as f64,
        );
        let n_frozen = l * (2.0 * c * qd + 2.0 * c * kvd + 3.0 * c * f) + v * c;
        let n_lora: f64 = set
            .modules()
            .iter()
            .map(|(_, m)| (set.rank * (m.in_features + m.out_features)) as f64)
            .sum();
        let tokens: f64 = lens.iter().sum::<usize>() as f64;
        let attn: f64 = lens
            .iter()
            .map(|&t| 6.0 * l * qd * (t as f64) * (t as f64))
            .sum();
        (4.0 * n_frozen * tokens + 6.0 * n_lora * tokens + attn, attn)
    }

    /// One optimizer step: forward + backward of the packed micro-batch, clip + AdamW over every
    /// LoRA tensor, gradients zeroed, stream drained. Returns `(mean loss, gradient norm)`.
    fn train_step(
        model: &mut Model,
        seqs: &[SeqInput],
        grads: &mut LoraSet<CudaBackend>,
        opt: &mut OptState,
        recompute: Recompute,
    ) -> Result<(f64, f32)> {
        let targets: usize = seqs
            .iter()
            .map(|s| s.targets.iter().filter(|&&t| t >= 0).count())
            .sum();
        let st = model.forward_backward_packed(seqs, 1.0 / targets as f32, grads, recompute)?;
        let b = &model.backend;
        let lora = model.lora.as_mut().expect("adapter attached");
        let mut params: Vec<&mut <CudaBackend as Backend>::Buf> = lora
            .params
            .modules_mut()
            .into_iter()
            .flat_map(|(_, l)| [&mut l.a, &mut l.b])
            .collect();
        let rank = grads.rank;
        let mut sizes = Vec::new();
        let mut gs: Vec<&mut <CudaBackend as Backend>::Buf> = Vec::new();
        for (_, l) in grads.modules_mut() {
            sizes.extend([rank * l.in_features, l.out_features * rank]);
            gs.extend([&mut l.a, &mut l.b]);
        }
        let hyper = AdamW {
            lr: LR,
            weight_decay: WEIGHT_DECAY,
            ..AdamW::default()
        };
        let norm = b.adamw_step(opt, &mut params, &mut gs, &hyper, LR, MAX_GRAD_NORM)?;
        for (g, n) in gs.into_iter().zip(sizes) {
            b.zero(g, n)?;
        }
        b.dev.synchronize()?;
        Ok((st.loss_sum / st.targets.max(1) as f64, norm))
    }

    /// Figures of one config, for its JSON line.
    struct Measured {
        steps: usize,
        times: Vec<f64>,
        loss_first: f64,
        loss_last: f64,
        norm_first: f32,
        flops: (f64, f64),
        peak_bytes: usize,
        driver_used: usize,
    }

    fn bench_config(
        model: &mut Model,
        spec: &LoraSpec,
        recompute: Recompute,
        warmup: usize,
        max_steps: usize,
        budget_s: f64,
    ) -> std::result::Result<Measured, String> {
        let err = |e: qlora::Error| e.to_string();
        // Drop the previous config's adapter first, so the peak starts from the bare model.
        model.lora = None;
        model.backend.dev.synchronize().map_err(err)?;
        model.backend.dev.reset_peak();
        let mut lc = LoraConfig::new(spec.r, spec.alpha, spec.targets).map_err(err)?;
        lc.lora_dropout = LORA_DROPOUT;
        let w = LoraWeights::init(&lc, &model.cfg, 1).map_err(err)?;
        model.lora = Some(Lora::new(&model.backend, &lc, &w, &model.cfg).map_err(err)?);
        drop(w);
        let params = &model.lora.as_ref().expect("attached").params;
        let sizes: Vec<usize> = params
            .modules()
            .iter()
            .flat_map(|(_, l)| [params.rank * l.in_features, l.out_features * params.rank])
            .collect();
        let flops = step_flops(&model.cfg, params, &[SEQ_LEN; BATCH]);
        let mut grads = params.zeros_like(&model.backend).map_err(err)?;
        let mut opt = model
            .backend
            .adamw_init(&sizes, None, OptimKind::PagedAdamW32bit)
            .map_err(err)?;
        // Deterministic token ids; targets are the next token, none after the last.
        let vocab = model.cfg.vocab_size as u64;
        let ids: Vec<Vec<u32>> = (0..BATCH)
            .map(|s| {
                (0..SEQ_LEN)
                    .map(|t| (splitmix64((s * SEQ_LEN + t) as u64) % vocab) as u32)
                    .collect()
            })
            .collect();
        let targets: Vec<Vec<i32>> = ids
            .iter()
            .map(|s| s.iter().skip(1).map(|&t| t as i32).chain([-100]).collect())
            .collect();
        let mut step_no = 0u64;
        let mut run = |model: &mut Model| -> std::result::Result<(f64, f64, f32), String> {
            step_no += 1;
            let seqs: Vec<SeqInput> = ids
                .iter()
                .zip(&targets)
                .enumerate()
                .map(|(k, (i, t))| SeqInput {
                    ids: i,
                    targets: t,
                    dropout_seed: Some(splitmix64((step_no << 24) | k as u64)),
                })
                .collect();
            let t0 = Instant::now();
            let (loss, norm) =
                train_step(model, &seqs, &mut grads, &mut opt, recompute).map_err(err)?;
            let dt = t0.elapsed().as_secs_f64();
            if !loss.is_finite() || !norm.is_finite() {
                return Err(format!(
                    "step {step_no}: loss {loss}, gradient norm {norm} (not finite)"
                ));
            }
            Ok((dt, loss, norm))
        };
        // Validation: the first step's loss and gradient norm.
        let (mut last_dt, loss_first, norm_first) = run(model)?;
        if norm_first <= 0.0 {
            return Err(format!(
                "step 1: gradient norm {norm_first}: no gradient reached the adapters"
            ));
        }
        eprintln!("  step 1 (warm-up, validated): {last_dt:.3} s, loss {loss_first:.4}, gradient norm {norm_first:.4e}");
        let mut loss_last = loss_first;
        for _ in 1..warmup {
            let (dt, loss, _) = run(model)?;
            (last_dt, loss_last) = (dt, loss);
        }
        let steps = ((budget_s / last_dt) as usize).clamp(2, max_steps.max(2));
        let mut times = Vec::with_capacity(steps);
        for _ in 0..steps {
            let (dt, loss, _) = run(model)?;
            times.push(dt);
            loss_last = loss;
        }
        let (free, total) = model.backend.dev.mem_info().map_err(err)?;
        Ok(Measured {
            steps,
            times,
            loss_first,
            loss_last,
            norm_first,
            flops,
            peak_bytes: model.backend.dev.peak_bytes(),
            driver_used: total - free,
        })
    }

    pub fn run() {
        let g = match CudaBackend::new(0) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("skipping training bench: no usable GPU ({e})");
                return;
            }
        };
        let device = g.name();
        let filters: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        let warmup = env_usize("QLORA_TRAIN_BENCH_WARMUP", 2).max(1);
        let max_steps = env_usize("QLORA_TRAIN_BENCH_STEPS", 5);
        let budget_s = env_usize("QLORA_TRAIN_BENCH_BUDGET_S", 25) as f64;
        let peak = peak_flops(&device);
        let cfg_path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/llama-2-7b-chat-hf/config.json"
        );
        let cfg = ModelConfig::from_file(std::path::Path::new(cfg_path)).expect("7B config");
        let t0 = Instant::now();
        let mut model = match random_model(g, &cfg, 7) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("training bench: building the 7B-shape model failed: {e}");
                std::process::exit(1);
            }
        };
        model.backend.dev.synchronize().expect("synchronize");
        let build_s = t0.elapsed().as_secs_f64();
        eprintln!(
            "training bench on {device}: 7B-shape NF4 model built in {build_s:.1} s, {:.0} MiB on the device ({:.0} MiB of linears)",
            qlora::sys::mib(model.backend.dev.live_bytes()),
            qlora::sys::mib(model.linear_bytes()),
        );
        let mut failed = 0;
        for spec in &LORAS {
            for (recompute, rname) in [
                (Recompute::Selective, "selective"),
                (Recompute::Full, "full"),
            ] {
                let name = format!("{}/{rname}", spec.name);
                if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
                    continue;
                }
                eprintln!(
                    "{name}: r {}, alpha {}, {:?}, {BATCH} x {SEQ_LEN} tokens packed",
                    spec.r, spec.alpha, spec.targets
                );
                let base = serde_json::json!({
                    "impl": "qlora",
                    "config": name,
                    "lora_r": spec.r,
                    "lora_alpha": spec.alpha,
                    "targets": spec.targets,
                    "recompute": rname,
                    "batch": BATCH,
                    "seq_len": SEQ_LEN,
                    "tokens_per_step": BATCH * SEQ_LEN,
                    "device": device,
                    "build_s": (build_s * 10.0).round() / 10.0,
                });
                let line = match bench_config(
                    &mut model, spec, recompute, warmup, max_steps, budget_s,
                ) {
                    Ok(m) => {
                        let mut sorted = m.times.clone();
                        sorted.sort_by(f64::total_cmp);
                        let median = sorted[sorted.len() / 2];
                        let mfu = peak.map(|p| m.flops.0 / (median * p));
                        let r = |v: f64, d: f64| (v * d).round() / d;
                        let mut o = base;
                        let extra = serde_json::json!({
                            "warmup": warmup,
                            "steps": m.steps,
                            "step_s": r(median, 1e4),
                            "step_s_min": r(sorted[0], 1e4),
                            "tokens_per_s": r((BATCH * SEQ_LEN) as f64 / median, 10.0),
                            "mfu": mfu.map(|v| r(v, 1e4)),
                            "model_tflop_per_step": r(m.flops.0 / 1e12, 1e3),
                            "attn_tflop_per_step": r(m.flops.1 / 1e12, 1e3),
                            "peak_tflops": peak.map(|p| p / 1e12),
                            "peak_device_mib": r(qlora::sys::mib(m.peak_bytes), 1.0),
                            "driver_used_mib": r(qlora::sys::mib(m.driver_used), 1.0),
                            "loss_first": r(m.loss_first, 1e4),
                            "loss_last": r(m.loss_last, 1e4),
                            "grad_norm_first": m.norm_first,
                        });
                        o.as_object_mut()
                            .expect("object")
                            .extend(extra.as_object().expect("object").clone());
                        eprintln!(
                            "  {} timed steps: median {median:.3} s, {:.0} tokens/s, MFU {}, peak {:.0} MiB",
                            m.steps,
                            (BATCH * SEQ_LEN) as f64 / median,
                            mfu.map_or("n/a".into(), |v| format!("{:.1} %", 100.0 * v)),
                            qlora::sys::mib(m.peak_bytes)
                        );
                        o
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("  FAILED: {e}");
                        let mut o = base;
                        o["error"] = serde_json::Value::String(e);
                        o
                    }
                };
                println!("{line}");
            }
        }
        if failed > 0 {
            std::process::exit(1);
        }
    }
}
