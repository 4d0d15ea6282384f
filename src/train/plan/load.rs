//! The load of the model (`Llama::load` → `Llama::assemble`), replayed for its device high-water
//! mark: the tensors arrive one at a time in checkpoint order — per layer the attention norm,
//! `q, k, v, o`, the MLP norm, `gate, up, down`; then the final norm, lm_head, the embedding
//! table and the RoPE table — and, under `--quant nf4` from a 16- or 32-bit checkpoint, each
//! decoder projection is quantized on the device from its stored bytes
//! (`nf4_quantize.rs` `quantize_to_device`):
//! 1. the stored bytes uploaded as they are (`n·w` B, `w` = 2 for f16/bf16, 4 for f32), the
//!    packed codes `⌈n/2⌉` B, the f32 absmax `4·⌈n/b⌉` B and the 8-byte non-finite flag;
//! 2. the stored bytes freed after the kernel;
//! 3. with double quantization, the absmax comes back to the host and its 8-bit form goes up
//!    (`DeviceNf4::from_parts`: placeholder 4 B, codes `⌈n/b⌉` B, nested absmax, code table
//!    1024 B) while the f32 absmax and the flag are still alive; without, the absmax becomes the
//!    weight's and the placeholders (1 + 4 + 4 B) join it;
//! 4. the f32 absmax (with double quantization) and the flag freed on return.
//!
//! The high-water mark is step 1 of the last of the largest projections (for Llama, layer
//! `L − 1`'s `down_proj`): every earlier weight and norm plus `n·w + ⌈n/2⌉ + 4·⌈n/b⌉ + 8`.
//! Nothing of the adapter, its gradients, the optimizer or any scratch exists yet, and the
//! embedding and lm_head (at least `4·V·C` bytes for a 16-bit checkpoint, `8·V·C` for an f32
//! one, uploaded last) are still to come, so the load peak stays below the step's unless a
//! projection's stored bytes outweigh them: `F > 2V` (never for a Llama-family vocabulary;
//! possible for a toy configuration).

use super::shape::{DeviceWeight, RunShape};
use super::sim::{Alloc, Kind, Sim};
use crate::lora::LoraTarget;

/// The operation of quantizing projection `t` (for the replay's position).
fn quantize_op(t: LoraTarget) -> &'static str {
    match t {
        LoraTarget::QProj => "q_proj NF4 quantization",
        LoraTarget::KProj => "k_proj NF4 quantization",
        LoraTarget::VProj => "v_proj NF4 quantization",
        LoraTarget::OProj => "o_proj NF4 quantization",
        LoraTarget::GateProj => "gate_proj NF4 quantization",
        LoraTarget::UpProj => "up_proj NF4 quantization",
        LoraTarget::DownProj => "down_proj NF4 quantization",
        LoraTarget::LmHead => "lm_head",
    }
}

/// `Llama::load` on the CUDA backend, allocation by allocation (see the module docs).
pub(super) fn replay(run: &RunShape) -> Sim {
    let m = &run.model;
    let cfg = &m.cfg;
    let d = m.dims();
    let internal = run.device_internals;
    let mut sim = Sim::new();
    let mut kept: Vec<Alloc> = Vec::new();
    let norm = 4 * d.c;
    for (l, (row, widths)) in m.projections.iter().zip(&m.raw_width).enumerate() {
        for (i, ((&w, &width), t)) in row
            .iter()
            .zip(widths)
            .zip(LoraTarget::ALL_LINEAR)
            .enumerate()
        {
            sim.at("load", Some(l), quantize_op(t));
            if i == 0 || i == 4 {
                // input_layernorm before q_proj, post_attention_layernorm before gate_proj.
                kept.push(sim.alloc(Kind::Load, norm));
            }
            if !internal {
                continue;
            }
            let (out, inp) = t.shape(cfg);
            match w {
                DeviceWeight::Nf4 {
                    blocksize,
                    double_quant,
                } if width > 0 => {
                    let n = out * inp;
                    let blocks = n.div_ceil(blocksize);
                    let raw = sim.alloc(Kind::Load, width * n);
                    kept.push(sim.alloc(Kind::Load, n.div_ceil(2)));
                    let absmax = sim.alloc(Kind::Load, 4 * blocks);
                    let flag = sim.alloc(Kind::Load, 8);
                    sim.free(raw);
                    if double_quant {
                        for b in [4, blocks, 4 * blocks.div_ceil(256), 4 * 256] {
                            kept.push(sim.alloc(Kind::Load, b));
                        }
                        sim.free(absmax);
                    } else {
                        kept.push(absmax);
                        for b in [1, 4, 4] {
                            kept.push(sim.alloc(Kind::Load, b));
                        }
                    }
                    sim.free(flag);
                }
                // Quantized on the host (pre-quantized), or dense: uploaded as they are.
                _ => kept.push(sim.alloc(Kind::Load, w.bytes(out, inp))),
            }
        }
    }
    sim.at("load", None, "final norm, lm_head, embedding, RoPE table");
    kept.push(sim.alloc(Kind::Load, norm));
    if internal {
        kept.push(sim.alloc(Kind::Load, m.lm_head.bytes(d.v, d.c)));
        kept.push(sim.alloc(Kind::Load, m.embed.bytes(d.v, d.c)));
    }
    kept.push(sim.alloc(Kind::Load, 4 * (cfg.head_dim / 2).max(1)));
    sim.free_all(kept);
    sim
}
