//! Decode steps on CUDA (`backend/cuda/step.rs`): `Llama::decode` replayed from a CUDA graph,
//! against the same steps issued eagerly in step mode, against one-token `forward` passes (the
//! host-planned launches), and against the CPU.
//!
//! Teacher-forced: after a 7-token prefill every run feeds the same 140 tokens, so the runs are
//! comparable step by step. Tiny NF4 models with an adapter on every decoder projection (the
//! fused decode LoRA GEMV; the prompt is short enough for the GEMV path too, so the GPU computes
//! in f32 throughout, like its spec): head_dim 64 (flash-decoding, its split planned on the device
//! over a grid sized for the 512-position cache) and head_dim 16 (the general attention
//! kernel), then the same cache with the adapter detached (the step must be re-recorded).
//!
//! Bounds:
//! - graph vs eager steps and vs one-token forwards: 0, the same bits (the same kernels, and the
//!   device plans the split the host would plan for that position);
//! - graph launches: one per step but the first (an eager step; the second is captured, then
//!   launched);
//! - vs the CPU (the spec with the device's bf16 KV cache): max error ≤ [`CPU_BOUND`] of the
//!   logits' scale — f32 products of exactly dequantized weights and f32 adapters, differing in
//!   summation order and the device's fast-math `expf` (~1e-6), plus the rare key or value whose
//!   bf16 rounding that flips by one unit (as tests/cuda_ops.rs's tiny-model prefill bound).

use super::model::test_ids;
use super::{max_rel_err, CheckRow};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::backend::CudaBackend;
use crate::backend::cuda::nf4::GEMV_MAX_M;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::lora::{LoraConfig, LoraWeights};
use crate::model::{Llama, Logits, Lora};

pub const CPU_BOUND: f64 = 1e-4;

/// At most the GEMV's rows (`GEMV_MAX_M`): the prompt takes the f32 GEMV path as well.
const PROMPT: usize = 7;
const _: () = assert!(PROMPT <= GEMV_MAX_M);
/// Up to 147 keys: three 64-key tiles, so the device-planned split is more than one split.
const STEPS: usize = 140;
const CAP: usize = 512;

/// head_dim 64, GQA 2 (the flash-decoding kernel).
const D64: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 128,
  "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 2,
  "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 512,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;
/// head_dim 16, GQA 2 (the general attention kernel).
const D16: &str = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
  "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;

/// Rank 8 on every decoder projection, `B` non-zero (PEFT's init has `B = 0`).
fn adapter(cfg: &ModelConfig) -> Result<(LoraConfig, LoraWeights)> {
    let lc = LoraConfig::new(8, 16.0, &["all-linear"])?;
    let mut w = LoraWeights::init(&lc, cfg, 9)?;
    for (k, p) in w.modules.values_mut().enumerate() {
        let vals = super::test_values(k as u64 + 1, p.b.len(), 0.05);
        p.b.copy_from_slice(&vals);
    }
    Ok((lc, w))
}

/// How a run issues its one-token steps.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Graph,
    Eager,
    Forward,
}

/// The logits of every step of a teacher-forced run of `ids` (prefill `ids[..PROMPT]`).
fn steps<B: Backend>(m: &Llama<B>, ids: &[u32], mode: Mode) -> Result<Vec<Vec<f32>>> {
    let b = &m.backend;
    let mut cache = m.new_cache(CAP)?;
    m.forward(&ids[..PROMPT], &mut cache, Logits::Last)?;
    let mut out = Vec::new();
    for &id in &ids[PROMPT..] {
        let row = match mode {
            Mode::Forward => b.download(&m.forward(&[id], &mut cache, Logits::Last)?)?,
            _ => b.download(m.decode(id, &mut cache)?)?,
        };
        out.push(row);
    }
    Ok(out)
}

/// The worst step of `got` against `want` (max error relative to each step's logits).
fn worst(got: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter()
        .zip(want)
        .map(|(g, w)| max_rel_err(g, w))
        .fold(0.0, f64::max)
}

/// Rows for one model: graph, eager and forward runs on `gpu`, and the CPU spec run on `cpu`
/// when given.
fn compare(
    cpu: Option<&Llama<CpuBackend>>,
    gpu: &Llama<CudaBackend>,
    ids: &[u32],
    tag: &str,
) -> Result<Vec<CheckRow>> {
    let be = &gpu.backend;
    be.set_step_graphs(true);
    let before = be.step_replays();
    let graph = steps(gpu, ids, Mode::Graph)?;
    let replays = be.step_replays() - before;
    be.set_step_graphs(false);
    let eager = steps(gpu, ids, Mode::Eager)?;
    be.set_step_graphs(true);
    let forward = steps(gpu, ids, Mode::Forward)?;
    let mut rows = vec![
        CheckRow::new(
            format!("decode graph vs eager steps {tag}"),
            worst(&graph, &eager),
            0.0,
        ),
        CheckRow::new(
            format!("decode graph vs one-token forward {tag}"),
            worst(&graph, &forward),
            0.0,
        ),
        CheckRow::new(
            format!(
                "decode graph launches {replays} of {STEPS} steps (want {}) {tag}",
                STEPS - 1
            ),
            (replays as f64 - (STEPS - 1) as f64).abs(),
            0.0,
        ),
    ];
    if let Some(cpu) = cpu {
        let spec = steps(cpu, ids, Mode::Forward)?;
        rows.push(CheckRow::new(
            format!("decode graph vs CPU {tag}"),
            worst(&graph, &spec),
            CPU_BOUND,
        ));
    }
    Ok(rows)
}

/// Both models: with the adapter in f32, with its bf16 inference copies (`freeze_adapter`, as
/// generate runs it; against the CPU in check/lora_decode.rs), and without it.
pub fn run(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let mut rows = Vec::new();
    for (json, tag) in [(D64, "D64 GQA2"), (D16, "D16 GQA2")] {
        let cfg = ModelConfig::from_json_str(json).map_err(crate::Error::InvalidArg)?;
        let mut gpu = Llama::random_nf4(CudaBackend::new(be.dev.ordinal)?, &cfg, 5)?;
        let mut cpu = Llama::random_nf4(CpuBackend::with_bf16_kv_cache(), &cfg, 5)?;
        let (lc, w) = adapter(&cfg)?;
        cpu.lora = Some(Lora::new(&cpu.backend, &lc, &w, &cfg)?);
        gpu.lora = Some(Lora::new(&gpu.backend, &lc, &w, &cfg)?);
        let ids = test_ids(PROMPT + STEPS, cfg.vocab_size, 3);
        rows.extend(compare(
            Some(&cpu),
            &gpu,
            &ids,
            &format!("{tag} r8 adapter"),
        )?);
        gpu.freeze_adapter()?;
        rows.extend(compare(
            None,
            &gpu,
            &ids,
            &format!("{tag} r8 bf16 adapter"),
        )?);
        (cpu.lora, gpu.lora) = (None, None);
        rows.extend(compare(
            Some(&cpu),
            &gpu,
            &ids,
            &format!("{tag} no adapter"),
        )?);
    }
    rows.extend(dense_f32(be)?);
    rows.extend(adapter_swap(be)?);
    Ok(rows)
}

/// A dense f32 model (weights not exact in 16 bits): every projection, lm_head included, goes
/// through cuBLAS sgemm, and the unfused adapter term allocates its `x·Aᵀ` inside the step —
/// both inside the recorded graph. GPU-internal rows only (the unfused term rounds to bf16).
fn dense_f32(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let cfg = ModelConfig::from_json_str(D64).map_err(crate::Error::InvalidArg)?;
    let mut gpu = Llama::random(CudaBackend::new(be.dev.ordinal)?, &cfg, 5)?;
    let (lc, w) = adapter(&cfg)?;
    gpu.lora = Some(Lora::new(&gpu.backend, &lc, &w, &cfg)?);
    let ids = test_ids(PROMPT + STEPS, cfg.vocab_size, 3);
    compare(None, &gpu, &ids, "D64 dense f32 (cuBLAS) r8 adapter")
}

/// Changing the adapter between two steps of one cache — freezing it (bf16 copies: other
/// kernels), then detaching it: the next step must not replay the recording made before (its
/// logits equal a one-token forward with the adapter as it is now).
fn adapter_swap(be: &CudaBackend) -> Result<Vec<CheckRow>> {
    let cfg = ModelConfig::from_json_str(D64).map_err(crate::Error::InvalidArg)?;
    let mut gpu = Llama::random_nf4(CudaBackend::new(be.dev.ordinal)?, &cfg, 5)?;
    let (lc, w) = adapter(&cfg)?;
    gpu.lora = Some(Lora::new(&gpu.backend, &lc, &w, &cfg)?);
    let ids = test_ids(PROMPT + 18, cfg.vocab_size, 3);
    let (mut a, mut b) = (gpu.new_cache(CAP)?, gpu.new_cache(CAP)?);
    gpu.forward(&ids[..PROMPT], &mut a, Logits::Last)?;
    gpu.forward(&ids[..PROMPT], &mut b, Logits::Last)?;
    // The worst step of each phase: before, after freezing, after detaching (the first step of
    // each runs eagerly, the second is captured, the rest replay it).
    let mut worst = [0f64; 3];
    for (i, &id) in ids[PROMPT..].iter().enumerate() {
        match i {
            6 => gpu.freeze_adapter()?,
            12 => gpu.lora = None,
            _ => {}
        }
        let got = gpu.backend.download(gpu.decode(id, &mut a)?)?;
        let want = gpu
            .backend
            .download(&gpu.forward(&[id], &mut b, Logits::Last)?)?;
        let phase = &mut worst[i / 6];
        *phase = phase.max(max_rel_err(&got, &want));
    }
    let phases = [
        "with the f32 adapter",
        "after freezing it",
        "after detaching it",
    ];
    let rows = phases
        .iter()
        .zip(worst)
        .map(|(what, e)| {
            CheckRow::new(
                format!("decode steps {what} vs one-token forward (no stale graph)"),
                e,
                0.0,
            )
        })
        .collect();
    Ok(rows)
}
