//! Llama forward pass (`LlamaForCausalLM`), one decoder layer at a time.
//!
//! For tokens `x₀ = embed[ids]`, each layer `l` computes (pre-norm residual blocks):
//! ```text
//! h  = x + o_proj( attn( rope(q_proj(n₁)), rope(k_proj(n₁)), v_proj(n₁) ) ),  n₁ = rmsnorm(x) · w_attn
//! x' = h + down_proj( silu(gate_proj(n₂)) ⊙ up_proj(n₂) ),                  n₂ = rmsnorm(h) · w_mlp
//! ```
//! and the head computes `logits = lm_head(rmsnorm(x_L) · w_norm)` (`lm_head = embedᵀ` when tied).
//! Attention reads a [`KvCache`]: the new keys/values are written at positions `pos0..pos0+T`
//! first, so prefill (`pos0 = 0`) and decoding (`T = 1`) are the same code path.

use super::lora::Lora;
pub use super::source::MergeLora;
use super::source::{RandomSource, TensorSource, WeightSource};
use crate::backend::{Backend, HostLinear, LoraTerm};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::LoraTarget;
use crate::weights::{llama_tensor_names, Checkpoint};

/// Weights of one decoder layer.
pub struct LayerWeights<B: Backend> {
    pub attn_norm: B::Buf,
    pub q_proj: B::Linear,
    pub k_proj: B::Linear,
    pub v_proj: B::Linear,
    pub o_proj: B::Linear,
    pub mlp_norm: B::Buf,
    pub gate_proj: B::Linear,
    pub up_proj: B::Linear,
    pub down_proj: B::Linear,
}

impl<B: Backend> LayerWeights<B> {
    /// The base projection a LoRA target adapts (`lm_head` is not a layer weight: `None`).
    pub fn proj(&self, t: LoraTarget) -> Option<&B::Linear> {
        Some(match t {
            LoraTarget::QProj => &self.q_proj,
            LoraTarget::KProj => &self.k_proj,
            LoraTarget::VProj => &self.v_proj,
            LoraTarget::OProj => &self.o_proj,
            LoraTarget::GateProj => &self.gate_proj,
            LoraTarget::UpProj => &self.up_proj,
            LoraTarget::DownProj => &self.down_proj,
            LoraTarget::LmHead => return None,
        })
    }
}

/// A Llama model resident on backend `B`.
pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub backend: B,
    /// `[vocab, hidden]`
    /// `[vocab, hidden]`, dense (16-bit on a device where lossless, see [`Backend::embedding`]).
    pub embed: B::Linear,
    pub layers: Vec<LayerWeights<B>>,
    /// `[hidden]`
    pub norm: B::Buf,
    /// `[vocab, hidden]`
    pub lm_head: B::Linear,
    /// `[head_dim / 2]` RoPE inverse frequencies (scaling applied).
    pub inv_freq: B::Buf,
    /// A LoRA adapter applied on top of the frozen projections, if attached.
    pub lora: Option<Lora<B>>,
    /// Tokens per chunk of the training head's fused lm_head + cross-entropy
    /// ([`crate::model::train::CE_CHUNK`] by default; the result does not depend on it).
    pub ce_chunk: usize,
}

/// How the decoder's linear projections are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseQuant {
    /// As stored (widened to f32 on the CPU backend).
    None,
    /// bitsandbytes NF4 with `blocksize` elements per absmax, optionally double-quantized.
    Nf4 {
        blocksize: usize,
        double_quant: bool,
    },
}

impl BaseQuant {
    /// QLoRA's default: NF4, blocks of 64, double quantization.
    pub const NF4: BaseQuant = BaseQuant::Nf4 {
        blocksize: 64,
        double_quant: true,
    };
}

/// Where the time of a [`Llama::load`] went (logged when it finishes).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadStats {
    /// Wall time of the whole load, seconds.
    pub secs: f64,
    /// Producing the decoder projections: reading, quantizing, moving them to the backend.
    pub linear_secs: f64,
    /// Of `linear_secs`, quantizing: the host quantizer, or the backend's
    /// [`Backend::quantize_linear`] (its upload of the stored bytes included).
    pub quantize_secs: f64,
    /// Projections the backend quantized itself.
    pub device_quantized: usize,
    /// Projections quantized on the host.
    pub host_quantized: usize,
}

impl<B: Backend> Llama<B> {
    /// Loads every tensor of the checkpoint onto the backend, checking names and shapes against
    /// the config. Decoder linear projections are quantized per `quant` one tensor at a time, so
    /// the host never holds more than one of them in f32; a backend that quantizes by itself
    /// ([`Backend::quantize_linear`], CUDA) gets each projection's stored bytes instead and the
    /// host holds no f32 copy at all. `progress(done, total)` after each tensor.
    pub fn load(
        backend: B,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        quant: BaseQuant,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        Self::load_with_stats(backend, ckpt, cfg, quant, progress).map(|(m, _)| m)
    }

    /// [`Llama::load`], also returning where the time went (logged at `info` as well).
    pub fn load_with_stats(
        backend: B,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        quant: BaseQuant,
        progress: impl FnMut(usize, usize),
    ) -> Result<(Self, LoadStats)> {
        Self::load_merged(backend, ckpt, cfg, quant, None, progress)
    }

    /// [`Llama::load_with_stats`] with an adapter merged into the base while loading (`qlora
    /// generate --merge`): each adapted projection is read in f32 (a pre-quantized one
    /// dequantized), `scale · B·A` added ([`crate::merge::add_lora`]), then quantized per `quant`
    /// on the host; decoding then costs what the base costs. An adapter on `lm_head` of a model
    /// with tied embeddings cannot be merged (the head is the embedding): an error.
    pub fn load_merged(
        backend: B,
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        quant: BaseQuant,
        merge: Option<MergeLora<'_>>,
        progress: impl FnMut(usize, usize),
    ) -> Result<(Self, LoadStats)> {
        if let Some(m) = merge {
            let head = crate::lora::LoraModule::lm_head();
            if cfg.tie_word_embeddings && m.weights.modules.contains_key(&head) {
                return Err(Error::InvalidArg(
                    "cannot merge an lm_head adapter into a model with tied embeddings; apply it unmerged".into(),
                ));
            }
        }
        let t0 = std::time::Instant::now();
        let mut src = TensorSource {
            ckpt,
            quant,
            merge,
            done: 0,
            total: llama_tensor_names(cfg).len(),
            progress,
            stats: LoadStats::default(),
        };
        let model = Self::assemble(backend, cfg, &mut src)?;
        let stats = LoadStats {
            secs: t0.elapsed().as_secs_f64(),
            ..src.stats
        };
        if stats.device_quantized + stats.host_quantized > 0 {
            tracing::info!(
                on_device = stats.device_quantized,
                on_host = stats.host_quantized,
                quantize_secs = format!("{:.2}", stats.quantize_secs),
                linear_secs = format!("{:.2}", stats.linear_secs),
                load_secs = format!("{:.2}", stats.secs),
                "quantized the decoder projections to NF4"
            );
        }
        Ok((model, stats))
    }

    /// A model with random weights (uniform in ±0.05, norms 1): benchmarks and shape tests only.
    pub fn random(backend: B, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        use rand::SeedableRng;
        let mut src = RandomSource(rand::rngs::StdRng::seed_from_u64(seed), false);
        Self::assemble(backend, cfg, &mut src)
    }

    /// A model with random NF4 decoder projections (see `RandomSource`): decode benchmarks at
    /// full scale (e.g. Llama-2-7B's shapes) without quantizing dense weights first.
    pub fn random_nf4(backend: B, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        use rand::SeedableRng;
        let mut src = RandomSource(rand::rngs::StdRng::seed_from_u64(seed), true);
        Self::assemble(backend, cfg, &mut src)
    }

    /// Builds the model tensor by tensor from `src`, in checkpoint order.
    fn assemble(backend: B, cfg: &ModelConfig, src: &mut dyn WeightSource<B>) -> Result<Self> {
        let (c, f, qd, kvd, v) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.vocab_size,
        );
        let b = &backend;
        let lin =
            |src: &mut dyn WeightSource<B>, name: &str, rows, cols| src.linear(b, name, rows, cols);
        let embed_host = src.vector("model.embed_tokens.weight", &[v, c])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(LayerWeights {
                attn_norm: b.upload(&src.vector(&format!("{p}.input_layernorm.weight"), &[c])?)?,
                q_proj: lin(src, &format!("{p}.self_attn.q_proj.weight"), qd, c)?,
                k_proj: lin(src, &format!("{p}.self_attn.k_proj.weight"), kvd, c)?,
                v_proj: lin(src, &format!("{p}.self_attn.v_proj.weight"), kvd, c)?,
                o_proj: lin(src, &format!("{p}.self_attn.o_proj.weight"), c, qd)?,
                mlp_norm: b
                    .upload(&src.vector(&format!("{p}.post_attention_layernorm.weight"), &[c])?)?,
                gate_proj: lin(src, &format!("{p}.mlp.gate_proj.weight"), f, c)?,
                up_proj: lin(src, &format!("{p}.mlp.up_proj.weight"), f, c)?,
                down_proj: lin(src, &format!("{p}.mlp.down_proj.weight"), c, f)?,
            });
        }
        let norm = b.upload(&src.vector("model.norm.weight", &[c])?)?;
        // lm_head stays unquantized, as in QLoRA (and bitsandbytes' default skip list).
        let head_host = if cfg.tie_word_embeddings {
            embed_host.clone()
        } else {
            src.vector("lm_head.weight", &[v, c])?
        };
        let lm_head = b.linear(HostLinear::Dense {
            rows: v,
            cols: c,
            data: head_host,
        })?;
        let embed = b.linear(HostLinear::Dense {
            rows: v,
            cols: c,
            data: embed_host,
        })?;
        let inv_freq = b.upload(&cfg.rope_inv_freq())?;
        Ok(Llama {
            cfg: cfg.clone(),
            backend,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            lora: None,
            ce_chunk: super::train::CE_CHUNK,
        })
    }

    /// Bytes the linear projections (decoder layers and lm_head) occupy on the backend.
    pub fn linear_bytes(&self) -> usize {
        let b = &self.backend;
        let per_layer = |w: &LayerWeights<B>| {
            [
                &w.q_proj,
                &w.k_proj,
                &w.v_proj,
                &w.o_proj,
                &w.gate_proj,
                &w.up_proj,
                &w.down_proj,
            ]
            .iter()
            .map(|l| b.linear_bytes(l))
            .sum::<usize>()
        };
        self.layers.iter().map(per_layer).sum::<usize>() + b.linear_bytes(&self.lm_head)
    }

    /// The base weight of projection `target` in layer `layer` (`None`: lm_head).
    pub fn base_weight(&self, layer: Option<usize>, target: LoraTarget) -> &B::Linear {
        match layer {
            Some(l) => self.layers[l]
                .proj(target)
                .expect("lm_head is not a decoder-layer projection"),
            None => &self.lm_head,
        }
    }

    /// `out = x·Wᵀ` for projection `target` of layer `layer` (`None`: lm_head), plus the attached
    /// adapter's term `s · x·Aᵀ·Bᵀ` when that module is adapted (no dropout: inference).
    pub(super) fn project(
        &self,
        out: &mut B::Buf,
        x: &B::Buf,
        layer: Option<usize>,
        target: LoraTarget,
        rows: usize,
    ) -> Result<()> {
        self.project_with(out, x, layer, target, rows, false)
    }

    /// `out += x · Wᵀ` (+ the adapter term): a projection with its residual add fused.
    pub(super) fn project_add(
        &self,
        out: &mut B::Buf,
        x: &B::Buf,
        layer: Option<usize>,
        target: LoraTarget,
        rows: usize,
    ) -> Result<()> {
        self.project_with(out, x, layer, target, rows, true)
    }

    /// The projection and its adapter term in one [`Backend::matmul_lora`] call (the CUDA
    /// backend fuses the adapter into its decode GEMV).
    fn project_with(
        &self,
        out: &mut B::Buf,
        x: &B::Buf,
        layer: Option<usize>,
        target: LoraTarget,
        rows: usize,
        add: bool,
    ) -> Result<()> {
        let lora = self.lora.as_ref().and_then(|lora| {
            let ad = lora.params.get(layer, target)?;
            Some(LoraTerm {
                a: &ad.a,
                b: &ad.b,
                scale: lora.scale,
                rank: lora.params.rank,
                frozen: ad.frozen.as_ref().map(|(a, b)| (a, b)),
            })
        });
        let w = self.base_weight(layer, target);
        self.backend.matmul_lora(out, x, w, lora, rows, add)
    }

    /// Gives the attached adapter (if any) the backend's inference copies of its matrices
    /// ([`Backend::lora_inference_copy`]: bf16 on CUDA, none on the CPU), which the forward pass
    /// then reads. Only for an adapter that will not change again (generate and chat);
    /// training never calls it, and its optimizer step drops any copies
    /// ([`super::lora::LoraSet::modules_mut`]).
    pub fn freeze_adapter(&mut self) -> Result<()> {
        match &mut self.lora {
            Some(lora) => lora.params.freeze(&self.backend),
            None => Ok(()),
        }
    }
}

impl Llama<crate::backend::cpu::CpuBackend> {
    /// A copy whose NF4 projections are replaced by their dequantized dense weights: the exact
    /// reference the fused NF4 kernels must reproduce (tests), and the base `qlora merge` adds to.
    pub fn dequantized(&self) -> Self {
        use crate::backend::cpu::{CpuLinear, CpuWeight};
        let dense = |l: &CpuLinear| CpuLinear {
            weight: match &l.weight {
                CpuWeight::Nf4(t) => CpuWeight::Dense(crate::quant::dequantize_nf4(t)),
                CpuWeight::Dense(d) => CpuWeight::Dense(d.clone()),
            },
            ..l.clone()
        };
        let layers = self
            .layers
            .iter()
            .map(|w| LayerWeights {
                attn_norm: w.attn_norm.clone(),
                q_proj: dense(&w.q_proj),
                k_proj: dense(&w.k_proj),
                v_proj: dense(&w.v_proj),
                o_proj: dense(&w.o_proj),
                mlp_norm: w.mlp_norm.clone(),
                gate_proj: dense(&w.gate_proj),
                up_proj: dense(&w.up_proj),
                down_proj: dense(&w.down_proj),
            })
            .collect();
        Llama {
            cfg: self.cfg.clone(),
            backend: self.backend.clone(),
            embed: self.embed.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            inv_freq: self.inv_freq.clone(),
            lora: None,
            ce_chunk: self.ce_chunk,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::{CpuBackend, CpuWeight};
    use crate::quant::quantize_nf4;

    /// On the CPU (no `quantize_linear`), `--quant nf4` quantizes every projection on the host,
    /// exactly `quantize_nf4` of the stored values; the stats count them.
    #[test]
    fn cpu_load_quantizes_on_the_host() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/gqa");
        let cfg = crate::loader::read_config(&dir).unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let quant = BaseQuant::Nf4 {
            blocksize: 64,
            double_quant: true,
        };
        let (m, stats) =
            Llama::load_with_stats(CpuBackend::new(), &ckpt, &cfg, quant, |_, _| {}).unwrap();
        assert_eq!(stats.device_quantized, 0);
        assert_eq!(stats.host_quantized, 7 * cfg.num_hidden_layers);
        assert!(stats.secs >= stats.linear_secs && stats.linear_secs >= stats.quantize_secs);
        let name = "model.layers.0.mlp.down_proj.weight";
        let (rows, cols) = (cfg.hidden_size, cfg.intermediate_size);
        let want = quantize_nf4(
            &ckpt.load_f32(name, &[rows, cols]).unwrap(),
            &[rows, cols],
            64,
            true,
        )
        .unwrap();
        let CpuWeight::Nf4(got) = &m.layers[0].down_proj.weight else {
            panic!("down_proj is not NF4")
        };
        assert_eq!(got, &want);
        let (_, stats) =
            Llama::load_with_stats(CpuBackend::new(), &ckpt, &cfg, BaseQuant::None, |_, _| {})
                .unwrap();
        assert_eq!((stats.device_quantized, stats.host_quantized), (0, 0));
    }
}
