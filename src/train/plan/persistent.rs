//! The persistent lines of a plan: what stays allocated for the whole run — base weights,
//! embedding, norms, the adapter, its gradients and optimizer states — and the scratch buffers
//! that grow to their largest use and are never shrunk (the plan's module docs, "Persistent
//! lines").

use super::format::grouped;
use super::shape::{DeviceWeight, ModelShape, RunShape, HALF_GEMV_MAX_M, NF4_GEMV_MAX_M};
use super::OptimizerStates;
use crate::lora::LoraTarget;
use crate::train::{optim8, OptimKind};

/// The decoder projections' bytes, NF4 and dense apart, with a label for each.
struct BaseProjections {
    nf4: usize,
    nf4_label: String,
    dense: usize,
    dense_label: &'static str,
}

impl BaseProjections {
    fn of(m: &ModelShape) -> Self {
        let mut base = BaseProjections {
            nf4: 0,
            nf4_label: String::new(),
            dense: 0,
            dense_label: "",
        };
        for row in &m.projections {
            for (w, t) in row.iter().zip(LoraTarget::ALL_LINEAR) {
                let (out, inp) = t.shape(&m.cfg);
                let b = w.bytes(out, inp);
                match w {
                    DeviceWeight::Nf4 {
                        blocksize,
                        double_quant,
                    } => {
                        base.nf4 += b;
                        base.nf4_label = format!(
                            "base: NF4 decoder projections (block {blocksize}{})",
                            if *double_quant { ", double quant" } else { "" }
                        );
                    }
                    _ => {
                        base.dense += b;
                        base.dense_label = w.label();
                    }
                }
            }
        }
        base
    }
}

/// The device optimizer of `kind` over tensors of `sizes` values, as `TrainBackend::adamw_init`
/// allocates it and its first step completes it (`nt` tensors, `t = max(nt, 1)`):
/// - 32-bit (`DeviceAdamW`): `m` and `v` in one allocation of `2·Σ round_up(n, 64)` f32, at
///   least 64;
/// - 8-bit (`DeviceAdamW8`, `adamw8.rs` `Layout8`): one allocation of `8F + 8A + 2P` bytes, at
///   least 256 — f32 `m`, `v` of the tensors under `MIN_8BIT_SIZE` (`F = Σ round_up(n, 64)`),
///   two f32 absmax per 256-value block of the others (`A = round_up(Σ ⌈n/256⌉, 64)`) and their
///   u8 codes (`P = Σ round_up(n, 256)`) — plus the two 256-entry f32 maps (2048 B) and the
///   absmax pointer table `2·8` B per tensor;
/// - both: the launch table `6·8` B per tensor (uploaded by the first step), scalars `2·4·t`,
///   f64 sums `8·t` and the 8-byte `{norm, clip}` output.
fn optimizer_bytes(sizes: &[usize], kind: OptimKind) -> usize {
    let nt = sizes.len();
    let common = 48 * nt + 16 * nt.max(1) + 8;
    match kind {
        OptimKind::PagedAdamW32bit | OptimKind::AdamW => {
            let padded: usize = sizes.iter().map(|&n| n.next_multiple_of(64)).sum();
            4 * (2 * padded).max(64) + common
        }
        OptimKind::PagedAdamW8bit => {
            let (mut f, mut a, mut p) = (0, 0, 0);
            for &n in sizes {
                if optim8::uses_q8(n) {
                    p += n.next_multiple_of(optim8::BLOCK);
                    a += optim8::blocks(n);
                } else {
                    f += n.next_multiple_of(64);
                }
            }
            let states = (8 * f + 8 * a.next_multiple_of(64) + 2 * p)
                .next_multiple_of(4)
                .max(256);
            states + 4 * 512 + 16 * nt + common
        }
    }
}

/// The optimizer line's label.
fn optimizer_label(kind: OptimKind) -> String {
    let paged = if kind.paged() {
        " (paged: managed memory)"
    } else {
        ""
    };
    match kind {
        OptimKind::PagedAdamW32bit | OptimKind::AdamW => format!("AdamW states, 2 × f32{paged}"),
        OptimKind::PagedAdamW8bit => {
            format!("8-bit AdamW states, 2 × u8 codes + block absmax{paged}")
        }
    }
}

/// The optimizer line under every `--optim` kind (what changing `--optim` would change), the
/// run's own marked.
pub(super) fn optimizer_options(run: &RunShape) -> Vec<OptimizerStates> {
    let sizes = run.adapter.tensor_sizes(&run.model.cfg);
    [
        OptimKind::PagedAdamW32bit,
        OptimKind::PagedAdamW8bit,
        OptimKind::AdamW,
    ]
    .into_iter()
    .map(|kind| OptimizerStates {
        optim: kind.name(),
        bytes: if run.device_internals {
            optimizer_bytes(&sizes, kind)
        } else {
            0
        },
        paged: kind.paged(),
        selected: kind == run.optim,
    })
    .collect()
}

/// The persistent lines, in plan order: `(key, label, bytes)`.
pub(super) fn persistent_lines(run: &RunShape, t_max: usize) -> Vec<(&'static str, String, usize)> {
    let m = &run.model;
    let cfg = &m.cfg;
    let d = m.dims();
    let internal = |b: usize| if run.device_internals { b } else { 0 };
    let base = BaseProjections::of(m);
    let head = m.lm_head.bytes(d.v, d.c);
    let embed = m.embed.bytes(d.v, d.c);
    let norms = 4 * (2 * d.layers + 1) * d.c + 4 * (cfg.head_dim / 2).max(1);
    let sizes = run.adapter.tensor_sizes(cfg);
    let lora: usize = sizes.iter().map(|&n| 4 * n.max(1)).sum();
    let opt = optimizer_bytes(&sizes, run.optim);
    let (lora_scratch, staging) = scratch_bytes(run, t_max);
    // `FlashScratch.delta`: `dev.grown` to the largest micro-batch's rows·H by its backward.
    let delta = 4 * (t_max * d.h).max(1);
    let tied = if cfg.tie_word_embeddings {
        " (tied: a separate copy of the embedding)"
    } else {
        ""
    };
    vec![
        ("base_nf4", base.nf4_label, internal(base.nf4)),
        (
            "base_dense",
            format!("base: {} decoder projections", base.dense_label),
            internal(base.dense),
        ),
        (
            "lm_head",
            format!("base: lm_head, {}{tied}", m.lm_head.label()),
            internal(head),
        ),
        (
            "embedding",
            format!("base: embedding table, {}", m.embed.label()),
            internal(embed),
        ),
        ("norms", "base: norms and RoPE table, f32".into(), norms),
        (
            "lora_params",
            format!(
                "LoRA parameters, f32 ({} values)",
                grouped(sizes.iter().sum::<usize>())
            ),
            lora,
        ),
        ("lora_grads", "LoRA gradients, f32".into(), lora),
        ("optimizer", optimizer_label(run.optim), internal(opt)),
        (
            "lora_scratch",
            "LoRA bf16 staging scratch".into(),
            internal(lora_scratch),
        ),
        (
            "staging",
            "GEMM staging scratch, RoPE positions".into(),
            internal(staging),
        ),
        (
            "attention_delta",
            "flash-attention backward's Δ [T, H], f32".into(),
            internal(delta),
        ),
    ]
}

/// `n` values of a scratch buffer that is used, 0 for one that never is (a used buffer holds at
/// least one value).
fn used(n: usize) -> usize {
    if n > 0 {
        n.max(1)
    } else {
        0
    }
}

/// `(LoraScratch, Bf16Scratch + f32 dequant scratch + RoPE positions)` bytes, each buffer grown to
/// its largest use over the run (see the module docs).
fn scratch_bytes(run: &RunShape, t_max: usize) -> (usize, usize) {
    // Rows of the head's chunk, and of the longest held-out example (0: no evaluation).
    let chunk = run.ce_chunk.clamp(1, t_max.max(1));
    let te = run.eval_len.unwrap_or(0);
    (
        lora_scratch_bytes(run, t_max, chunk, te),
        staging_bytes(run, t_max, chunk, te),
    )
}

/// `LoraScratch`: the largest size each buffer is grown to (0: never used), over the adapted
/// modules' training forward and backward and the evaluation forward.
fn lora_scratch_bytes(run: &RunShape, t_max: usize, chunk: usize, te: usize) -> usize {
    let cfg = &run.model.cfg;
    let r = run.adapter.rank;
    let dropout = run.adapter.dropout > 0.0;
    let (mut x, mut a, mut b, mut xa, mut dy, mut g, mut ga) = (0, 0, 0, 0, 0, 0, 0);
    for &t in &run.adapter.targets {
        let (out, inp) = t.shape(cfg);
        let rows = if t == LoraTarget::LmHead {
            chunk
        } else {
            t_max
        };
        // Training forward and backward.
        x = x.max(rows * inp);
        a = a.max(r * inp);
        b = b.max(out * r);
        xa = xa.max(rows * r);
        dy = dy.max(rows * out);
        g = g.max(rows * r);
        if dropout {
            ga = ga.max(rows * inp);
        }
        // Evaluation forward (no mask), `te` rows for the head too (all logits).
        if te > 0 {
            x = x.max(te * inp);
            xa = xa.max(te * r);
        }
    }
    2 * (used(x) + used(a) + used(b) + used(xa) + used(dy) + used(g)) + 4 * (used(g) + used(ga))
}

/// `Bf16Scratch.x` (16-bit dense weights' activation staging), the f32 dequantization scratch of
/// NF4 weights the fused kernels cannot take, and the cached RoPE positions.
fn staging_bytes(run: &RunShape, t_max: usize, chunk: usize, te: usize) -> usize {
    let m = &run.model;
    let cfg = &m.cfg;
    let d = m.dims();
    let mut half = 0;
    let mut f32_scratch = 0;
    let mut uses =
        |w: DeviceWeight, out: usize, inp: usize, rows_fwd: &[usize], rows_dx: usize| match w {
            DeviceWeight::Half => {
                for &rows in rows_fwd {
                    if rows > HALF_GEMV_MAX_M {
                        half = half.max(rows * inp);
                    }
                }
                if rows_dx > 0 {
                    half = half.max(rows_dx * out);
                }
            }
            DeviceWeight::Nf4 { .. } if !w.fused(inp) => {
                let fwd = rows_fwd.iter().any(|&r| r > NF4_GEMV_MAX_M);
                if fwd || rows_dx > 0 {
                    f32_scratch = f32_scratch.max(out * inp);
                }
            }
            _ => {}
        };
    for (l, row) in m.projections.iter().enumerate() {
        for (&w, t) in row.iter().zip(LoraTarget::ALL_LINEAR) {
            let (out, inp) = t.shape(cfg);
            let qkv = matches!(t, LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj);
            let rows_dx = if qkv && l == 0 { 0 } else { t_max };
            uses(w, out, inp, &[t_max, te], rows_dx);
        }
    }
    uses(m.lm_head, d.v, d.c, &[chunk, te], chunk);
    let positions = 4 * t_max.max(te);
    2 * used(half) + 4 * used(f32_scratch) + positions
}
