//! A whole LoRA training step on the GPU against the CPU: a tiny model with every projection
//! adapted (lm_head included), the forward and backward of one sequence on both devices, then one
//! optimizer step from identical gradients.
//!
//! Bounds (the CPU is f32 throughout; the GPU rounds GEMM operands to bf16 and stores saved
//! activations in bf16, each a relative rounding of at most 2⁻⁹):
//! - loss: relative difference ≤ [`LOSS_BOUND`] (1e-3; the loss averages many tokens, so the
//!   per-logit rounding noise of ~1e-3 mostly cancels);
//! - every LoRA gradient: cosine similarity ≥ 0.999 (`1 − cos ≤` [`GRAD_COS_BOUND`]) and relative L2
//!   error ≤ [`GRAD_L2_BOUND`] (2e-2: a product of several bf16-rounded factors, summed over tokens);
//! - the optimizer step, given the CPU's gradients on both devices: updated parameters within
//!   [`OPTIM_BOUND`] relative (the same f32 arithmetic, up to the last bits of the clip factor).

use super::{cosine, max_rel_err, rel_l2, CheckRow};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::TrainBackend;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::lora::{peft_key, LoraConfig, LoraWeights};
use crate::model::{Llama, Lora, LoraSet, Recompute};
use crate::train::{AdamW, OptimKind};

pub const LOSS_BOUND: f64 = 1e-3;
pub const GRAD_COS_BOUND: f64 = 1e-3;
pub const GRAD_L2_BOUND: f64 = 2e-2;
pub const OPTIM_BOUND: f64 = 1e-6;

/// Tiny Llama shapes that take the tensor-core paths: head_dim 64 with GQA 2, and head_dim 128;
/// every GEMM dimension a multiple of 16 (the fused NF4 kernels' requirement).
const TINY_D64: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 128,
  "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 2,
  "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 512,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;
const TINY_D128: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 256,
  "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 2,
  "num_key_value_heads": 2, "vocab_size": 384, "max_position_embeddings": 512,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;

/// An adapter on every projection and lm_head (rank 8), with a non-zero `B` so every `A` gets a
/// gradient (PEFT's init has `B = 0`).
pub fn full_adapter(
    model: &ModelConfig,
    dropout: f32,
    seed: u64,
) -> Result<(LoraConfig, LoraWeights)> {
    let mut cfg = LoraConfig::new(8, 16.0, &["all-linear", "lm_head"])?;
    cfg.lora_dropout = dropout;
    let mut w = LoraWeights::init(&cfg, model, seed)?;
    for (k, p) in w.modules.values_mut().enumerate() {
        let vals = super::test_values(seed ^ (k as u64 + 1), p.b.len(), 0.05);
        p.b.copy_from_slice(&vals);
    }
    Ok((cfg, w))
}

/// `n` token ids below `vocab` (deterministic).
pub fn test_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    super::test_values(seed, n, 1.0)
        .iter()
        .map(|v| ((v + 1.0) * 0.5 * vocab as f32) as u32 % vocab as u32)
        .collect()
}

/// Loss and host gradients of one forward + backward of `ids` (next-token targets).
fn step_grads<B: TrainBackend>(
    m: &Llama<B>,
    ids: &[u32],
    recompute: Recompute,
    seed: Option<u64>,
) -> Result<(f64, LoraWeights)> {
    let lora = m.lora.as_ref().expect("adapter attached by the caller");
    let mut g = lora.params.zeros_like(&m.backend)?;
    let targets: Vec<i32> = ids[1..].iter().map(|&i| i as i32).chain([-100]).collect();
    let n = ids.len().saturating_sub(1).max(1);
    let st = m.forward_backward(ids, &targets, 1.0 / n as f32, &mut g, recompute, seed)?;
    Ok((st.loss_sum / n as f64, g.download(&m.backend)?))
}

/// One AdamW step (paged states, clipping at 0.3) from gradients `g` on `m`'s adapter; returns
/// the updated adapter.
fn optimizer_step<B: TrainBackend>(m: &mut Llama<B>, g: &LoraWeights) -> Result<LoraWeights> {
    let (b, lora) = (&m.backend, m.lora.as_mut().expect("adapter attached"));
    let mut grads = LoraSet::upload(b, g, m.cfg.num_hidden_layers)?;
    let rank = lora.params.rank;
    let mut params = Vec::new();
    let mut sizes = Vec::new();
    for (_, l) in lora.params.modules_mut() {
        sizes.extend([rank * l.in_features, l.out_features * rank]);
        params.extend([&mut l.a, &mut l.b]);
    }
    let mut gs: Vec<&mut B::Buf> = grads
        .modules_mut()
        .into_iter()
        .flat_map(|(_, l)| [&mut l.a, &mut l.b])
        .collect();
    let mut st = b.adamw_init(&sizes, None, OptimKind::PagedAdamW32bit)?;
    let hyper = AdamW {
        lr: 1e-3,
        weight_decay: 0.01,
        ..AdamW::default()
    };
    b.adamw_step(&mut st, &mut params, &mut gs, &hyper, hyper.lr, 0.3)?;
    lora.params.download(b)
}

/// Rows comparing a training step of `gpu` against `cpu` (same weights, no adapter attached yet):
/// loss, the worst gradient by cosine and by relative L2 (named), a full-recompute step on the
/// GPU, and an optimizer step from the CPU's gradients.
pub fn compare_step(
    cpu: &mut Llama<CpuBackend>,
    gpu: &mut Llama<CudaBackend>,
    lora_cfg: &LoraConfig,
    w: &LoraWeights,
    ids: &[u32],
    tag: &str,
) -> Result<Vec<CheckRow>> {
    cpu.lora = Some(Lora::new(&cpu.backend, lora_cfg, w, &cpu.cfg)?);
    gpu.lora = Some(Lora::new(&gpu.backend, lora_cfg, w, &gpu.cfg)?);
    let seed = (lora_cfg.lora_dropout > 0.0).then_some(11);
    let (l_cpu, g_cpu) = step_grads(cpu, ids, Recompute::Selective, seed)?;
    let mut rows = Vec::new();
    for recompute in [Recompute::Selective, Recompute::Full] {
        let (l_gpu, g_gpu) = step_grads(gpu, ids, recompute, seed)?;
        let r = format!("{tag} {recompute:?}");
        rows.push(CheckRow::new(
            format!("step loss {r}"),
            (l_gpu - l_cpu).abs() / l_cpu.abs().max(1e-30),
            LOSS_BOUND,
        ));
        let (mut worst_cos, mut worst_l2) = ((0f64, String::new()), (0f64, String::new()));
        for (m, p) in &g_cpu.modules {
            let q = &g_gpu.modules[m];
            for (is_a, got, want) in [(true, &q.a, &p.a), (false, &q.b, &p.b)] {
                let (c, e) = (1.0 - cosine(got, want), rel_l2(got, want));
                if c.is_nan() || c > worst_cos.0 {
                    worst_cos = (c, peft_key(m, is_a));
                }
                if e.is_nan() || e > worst_l2.0 {
                    worst_l2 = (e, peft_key(m, is_a));
                }
            }
        }
        let short = |k: &str| k.trim_start_matches("base_model.model.").to_string();
        rows.push(CheckRow::new(
            format!("step grads 1-cos {r} (worst {})", short(&worst_cos.1)),
            worst_cos.0,
            GRAD_COS_BOUND,
        ));
        rows.push(CheckRow::new(
            format!("step grads rel L2 {r} (worst {})", short(&worst_l2.1)),
            worst_l2.0,
            GRAD_L2_BOUND,
        ));
    }
    let p_cpu = optimizer_step(cpu, &g_cpu)?;
    let p_gpu = optimizer_step(gpu, &g_cpu)?;
    let mut worst = 0f64;
    for (m, p) in &p_cpu.modules {
        let q = &p_gpu.modules[m];
        worst = worst
            .max(max_rel_err(&q.a, &p.a))
            .max(max_rel_err(&q.b, &p.b));
    }
    rows.push(CheckRow::new(
        format!("optimizer step {tag}"),
        worst,
        OPTIM_BOUND,
    ));
    Ok(rows)
}

/// The step on random tiny models: NF4 base with dropout, and a dense base without.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let cases = [
        (TINY_D64, true, 0.1f32, 100usize, "D64 GQA2 nf4 p0.1 T100"),
        (TINY_D128, false, 0.0, 37, "D128 f32 p0 T37"),
    ];
    let mut rows = Vec::new();
    for (json, nf4, dropout, t, tag) in cases {
        let cfg = ModelConfig::from_json_str(json).map_err(crate::Error::InvalidArg)?;
        let gpu_be = CudaBackend::new(be.dev.ordinal)?;
        let (mut cpu, mut gpu) = if nf4 {
            (
                Llama::random_nf4(CpuBackend::new(), &cfg, 5)?,
                Llama::random_nf4(gpu_be, &cfg, 5)?,
            )
        } else {
            (
                Llama::random(CpuBackend::new(), &cfg, 5)?,
                Llama::random(gpu_be, &cfg, 5)?,
            )
        };
        let (lc, w) = full_adapter(&cfg, dropout, 9)?;
        let ids = test_ids(t, cfg.vocab_size, 3);
        rows.extend(compare_step(&mut cpu, &mut gpu, &lc, &w, &ids, tag)?);
    }
    Ok(rows)
}
