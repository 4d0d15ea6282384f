//! The `llama` architecture as llama.cpp reads it: metadata keys, tensor names, the q/k row
//! permutation and the Llama-3 RoPE frequency factors (after `LlamaModel` in llama.cpp's
//! `convert_hf_to_gguf.py`).
//!
//! **q/k permutation.** Hugging Face Llama applies RoPE in rotate-half form: within a head of
//! `d` dimensions, dimension `i` pairs with `i + d/2`. llama.cpp's `llama` graph rotates adjacent
//! pairs `(2i, 2i+1)`. The converter therefore reorders the rows of `q_proj` (with the query head
//! count) and `k_proj` (with the key/value head count) inside each head:
//! ```text
//! new[h·d + 2i + t] = old[h·d + t·d/2 + i]      i < d/2, t ∈ {0, 1}
//! ```
//! so that `q·k` is unchanged while each rotated pair sits side by side.

use super::gguf::{GgufWriter, Value};
use crate::config::{ModelConfig, RopeScaling};
use std::f32::consts::PI;

pub const ARCH: &str = "llama";

/// GGUF name of a Hugging Face Llama tensor, or `None` for one llama.cpp does not take.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let part = match rest {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// How many heads a tensor's rows are permuted with: `Some(n_head)` for q, `Some(n_kv)` for k.
pub fn permute_heads(hf: &str, cfg: &ModelConfig) -> Option<usize> {
    if hf.ends_with("self_attn.q_proj.weight") {
        Some(cfg.num_attention_heads)
    } else if hf.ends_with("self_attn.k_proj.weight") {
        Some(cfg.num_key_value_heads)
    } else {
        None
    }
}

/// Reorders the rows of `w` (`[n_head·d, cols]`, row-major) from rotate-half to interleaved
/// pairs within each head; see the module docs.
pub fn permute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    assert_eq!(rows * cols, w.len(), "permute: ragged matrix");
    assert_eq!(rows % (2 * n_head), 0, "permute: rows not 2·n_head·k");
    let (d, half) = (rows / n_head, rows / n_head / 2);
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for t in 0..2 {
                let src = h * d + t * half + i;
                let dst = h * d + 2 * i + t;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Llama 3.1 RoPE scaling as llama.cpp takes it: one factor per rotated pair, by which the
/// frequency is divided (the `rope_freqs.weight` tensor), computed as the converter does.
pub fn llama3_rope_factors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = cfg.rope_scaling
    else {
        return None;
    };
    let dim = cfg.head_dim;
    let old = original_max_position_embeddings as f32;
    let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
    let factors = (0..dim / 2)
        .map(|i| {
            let freq = 1.0 / cfg.rope_theta.powf((2 * i) as f32 / dim as f32);
            let wavelen = 2.0 * PI / freq;
            if wavelen < high_wl {
                1.0
            } else if wavelen > low_wl {
                factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect();
    Some(factors)
}

/// `llama.*` hyper-parameter keys.
pub fn add_hparams(g: &mut GgufWriter, cfg: &ModelConfig) {
    let u = |x: usize| Value::U32(x as u32);
    let k = |s: &str| format!("{ARCH}.{s}");
    g.add(&k("vocab_size"), u(cfg.vocab_size));
    g.add(&k("context_length"), u(cfg.max_position_embeddings));
    g.add(&k("embedding_length"), u(cfg.hidden_size));
    g.add(&k("block_count"), u(cfg.num_hidden_layers));
    g.add(&k("feed_forward_length"), u(cfg.intermediate_size));
    g.add(&k("attention.head_count"), u(cfg.num_attention_heads));
    g.add(&k("attention.head_count_kv"), u(cfg.num_key_value_heads));
    g.add(&k("attention.key_length"), u(cfg.head_dim));
    g.add(&k("attention.value_length"), u(cfg.head_dim));
    g.add(&k("rope.freq_base"), Value::F32(cfg.rope_theta));
    g.add(&k("rope.dimension_count"), u(cfg.head_dim));
    g.add(
        &k("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps),
    );
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        g.add(&k("rope.scaling.type"), Value::Str("linear".into()));
        g.add(&k("rope.scaling.factor"), Value::F32(factor));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.o_proj.weight").as_deref(),
            Some("blk.3.attn_output.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            None
        );
    }

    /// Matches numpy's `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(w.shape)`.
    #[test]
    fn permutation_is_the_converters() {
        // 2 heads of d = 4, one column: rows [0..8).
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(permute_rows(&w, 2, 1), [0., 2., 1., 3., 4., 6., 5., 7.]);
        // Two columns move together.
        let w: Vec<f32> = (0..8).map(|x| x as f32).collect(); // rows of [2] : 4 rows, 1 head
        assert_eq!(permute_rows(&w, 1, 2), [0., 1., 4., 5., 2., 3., 6., 7.]);
    }
}
