//! `qlora inspect`: what a checkpoint holds and what it would cost in memory, read from
//! `config.json` and the safetensors headers / shard index only (no weights are read).

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;
use crate::weights::{tensor_plan, DType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// NF4 storage of `n` weights: packed 4-bit codes plus the block scales.
/// With double quantization the f32 absmax of each `block` becomes one byte, plus one f32 scale
/// per 256 blocks, the 256-entry code table and the mean offset (bitsandbytes' layout).
pub fn nf4_bytes(n: usize, block: usize, double_quant: bool) -> usize {
    let blocks = n.div_ceil(block);
    let codes = n.div_ceil(2);
    if double_quant {
        codes + blocks + blocks.div_ceil(256) * 4 + 256 * 4 + 4
    } else {
        codes + blocks * 4
    }
}

/// Whether a tensor is a decoder linear projection (the weights QLoRA stores in NF4).
pub fn is_decoder_linear(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub dir: String,
    pub architecture: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope: String,
    pub tied_embeddings: bool,
    pub tensors: usize,
    pub parameters: usize,
    /// dtype → (parameters, bytes) as stored.
    pub stored: BTreeMap<String, (usize, usize)>,
    pub stored_bytes: usize,
    /// Parameters in decoder linear projections (quantized to NF4).
    pub linear_parameters: usize,
    /// Base model memory with NF4 linears (double quant, block 64) and 16-bit everything else.
    pub nf4_bytes: usize,
    pub nf4_bytes_no_double_quant: usize,
}

pub fn inspect(dir: &Path, cfg: &ModelConfig) -> Result<Inspection> {
    let plan = tensor_plan(dir, cfg)?;
    let mut stored: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut params, mut linear, mut nf4, mut nf4_nodq, mut bytes) = (0, 0, 0, 0, 0);
    for t in &plan {
        let n: usize = t.shape.iter().product();
        let packed_nf4 = t.dtype == DType::U8 && is_decoder_linear(&t.name);
        let (b, label) = if packed_nf4 {
            // Pre-quantized (bitsandbytes) weight: packed codes plus block statistics.
            (
                nf4_bytes(n, 64, true),
                "NF4 (bitsandbytes, estimated)".to_string(),
            )
        } else {
            (t.nbytes().unwrap_or(0), t.dtype.to_string())
        };
        let e = stored.entry(label).or_default();
        e.0 += n;
        e.1 += b;
        params += n;
        bytes += b;
        if is_decoder_linear(&t.name) {
            linear += n;
            nf4 += nf4_bytes(n, 64, true);
            nf4_nodq += nf4_bytes(n, 64, false);
        } else {
            nf4 += 2 * n;
            nf4_nodq += 2 * n;
        }
    }
    let rope = match &cfg.rope_scaling {
        RopeScaling::None => format!("theta {}", cfg.rope_theta),
        RopeScaling::Linear { factor } => {
            format!("theta {}, linear scaling ×{factor}", cfg.rope_theta)
        }
        RopeScaling::Llama3 { factor, .. } => {
            format!("theta {}, llama3 scaling ×{factor}", cfg.rope_theta)
        }
    };
    Ok(Inspection {
        dir: dir.display().to_string(),
        architecture: "LlamaForCausalLM".into(),
        layers: cfg.num_hidden_layers,
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        vocab_size: cfg.vocab_size,
        max_position_embeddings: cfg.max_position_embeddings,
        rope,
        tied_embeddings: cfg.tie_word_embeddings,
        tensors: plan.len(),
        parameters: params,
        stored,
        stored_bytes: bytes,
        linear_parameters: linear,
        nf4_bytes: nf4,
        nf4_bytes_no_double_quant: nf4_nodq,
    })
}

/// `1234567890` → `1.23 G` style (decimal units, as model sizes are usually quoted).
pub fn human(n: usize) -> String {
    let n = n as f64;
    match n {
        _ if n >= 1e9 => format!("{:.2} G", n / 1e9),
        _ if n >= 1e6 => format!("{:.2} M", n / 1e6),
        _ if n >= 1e3 => format!("{:.2} K", n / 1e3),
        _ => format!("{n}"),
    }
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "model        {}", self.dir)?;
        writeln!(
            f,
            "architecture {}: {} layers, hidden {}, intermediate {}, {} heads / {} kv heads × head_dim {}",
            self.architecture, self.layers, self.hidden_size, self.intermediate_size, self.heads, self.kv_heads, self.head_dim
        )?;
        writeln!(
            f,
            "             vocab {}, max positions {}, RoPE {}, tied embeddings: {}",
            self.vocab_size,
            self.max_position_embeddings,
            self.rope,
            if self.tied_embeddings { "yes" } else { "no" }
        )?;
        writeln!(
            f,
            "parameters   {} ({}) in {} tensors",
            self.parameters,
            human(self.parameters),
            self.tensors
        )?;
        for (dtype, (n, b)) in &self.stored {
            writeln!(
                f,
                "stored       {dtype}: {} params, {}B",
                human(*n),
                human(*b)
            )?;
        }
        writeln!(f, "memory       as stored: {}B", human(self.stored_bytes))?;
        writeln!(
            f,
            "             NF4 base (block 64, double quant; {} linear params in 4 bit, the rest 16 bit): {}B",
            human(self.linear_parameters),
            human(self.nf4_bytes)
        )?;
        write!(
            f,
            "             NF4 without double quant: {}B",
            human(self.nf4_bytes_no_double_quant)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_size_formula() {
        // 4096×4096: 8 MiB of codes, 262144 absmax bytes, 1024 nested scales, code table, offset.
        let n = 4096 * 4096;
        assert_eq!(
            nf4_bytes(n, 64, true),
            n / 2 + n / 64 + (n / 64 / 256) * 4 + 1024 + 4
        );
        assert_eq!(nf4_bytes(n, 64, false), n / 2 + n / 64 * 4);
        assert_eq!(nf4_bytes(65, 64, false), 33 + 8);
    }

    /// The estimate is exactly what quantizing takes, partial blocks and nested blocks included.
    #[test]
    fn nf4_size_formula_equals_quantized_size() {
        for &(r, c, bs) in &[
            (7usize, 13usize, 64usize),
            (300, 64, 64),
            (33, 100, 128),
            (64, 4096, 64),
        ] {
            let w: Vec<f32> = (0..r * c)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            for dq in [false, true] {
                let t = crate::quant::quantize_nf4(&w, &[r, c], bs, dq).unwrap();
                assert_eq!(
                    nf4_bytes(r * c, bs, dq),
                    t.nbytes(),
                    "{r}x{c} block {bs} dq {dq}"
                );
            }
        }
    }
}
