//! [`TrainBackend`] for the CPU: bounds checks, then the f32 instantiation of the generic
//! backward ops in `backward/` (the readable specification, checked against finite differences
//! in f64 by `tests/gradcheck.rs`).

use super::backward::{
    cross_entropy_fused, lora_backward, matmul_dx, rmsnorm_backward, rope_backward, swiglu_backward,
};
use super::flash_attention::{flash_attention_backward, flash_attention_forward};
use super::{check_len, CpuBackend, CpuLinear, CpuWeight};
use crate::backend::{LoraShape, Packed, TrainBackend};
use crate::error::{Error, Result};
use crate::train::{clip_grad_norm, grad_norm, optim8, AdamParamState, AdamW, OptimKind};

/// The CPU backend's optimizer state: host states of every tensor, in the form `kind` keeps
/// them ([`optim8::for_kind`]), and the rule that updates them (torch's AdamW for the 32-bit
/// kinds, bitsandbytes' for `paged_adamw_8bit`).
#[derive(Debug, Clone, PartialEq)]
pub struct CpuOptState {
    pub kind: OptimKind,
    pub states: Vec<AdamParamState>,
}

/// Reads as the per-tensor states (what the 32-bit optimizer's state used to be).
impl std::ops::Deref for CpuOptState {
    type Target = [AdamParamState];
    fn deref(&self) -> &[AdamParamState] {
        &self.states
    }
}

/// Checks the buffers of a packed training attention call: `(name, length)` of the query-shaped
/// (`[rows, heads, D]`) and key-shaped (`[rows, kv_heads, D]`) buffers and of `lse`.
fn check_attention(p: Packed, q: &[(&str, usize)], kv: &[(&str, usize)], lse: usize) -> Result<()> {
    if p.kv_heads == 0 || p.heads % p.kv_heads != 0 {
        return Err(Error::Backend(format!(
            "cpu attention: {} heads cannot share {} kv heads",
            p.heads, p.kv_heads
        )));
    }
    let rows = p.rows();
    for (what, len) in q {
        check_len(
            &format!("attention {what}"),
            *len,
            rows * p.heads * p.head_dim,
        )?;
    }
    for (what, len) in kv {
        check_len(
            &format!("attention {what}"),
            *len,
            rows * p.kv_heads * p.head_dim,
        )?;
    }
    check_len("attention lse", lse, rows * p.heads)
}

/// `(query, key/value, lse)` element ranges of the sequence at rows `start..start + len`.
fn seq_ranges(p: Packed, start: usize, len: usize) -> [std::ops::Range<usize>; 3] {
    let (qw, kw) = (p.heads * p.head_dim, p.kv_heads * p.head_dim);
    [
        start * qw..(start + len) * qw,
        start * kw..(start + len) * kw,
        start * p.heads..(start + len) * p.heads,
    ]
}

/// Checks the buffers of a LoRA op against its shape.
pub(super) fn check_lora(
    sh: LoraShape,
    x: &[f32],
    keep: Option<&Vec<f32>>,
    a: &[f32],
    b: &[f32],
    xa: &[f32],
    y: &[f32],
) -> Result<()> {
    let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
    check_len("lora x", x.len(), m * k)?;
    if let Some(keep) = keep {
        check_len("lora dropout mask", keep.len(), m * k)?;
    }
    check_len("lora A", a.len(), r * k)?;
    check_len("lora B", b.len(), n * r)?;
    check_len("lora xa", xa.len(), m * r)?;
    check_len("lora y", y.len(), m * n)
}

impl TrainBackend for CpuBackend {
    type Saved = Vec<f32>;
    type OptState = CpuOptState;

    fn stash(&self, buf: Vec<f32>, len: usize) -> Result<Vec<f32>> {
        check_len("stash", buf.len(), len)?;
        Ok(buf)
    }

    fn unstash(&self, saved: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        check_len("unstash", saved.len(), len)?;
        Ok(saved[..len].to_vec())
    }

    fn matmul_dx(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        w: &CpuLinear,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        check_len("matmul_dx dx", dx.len(), rows * w.cols)?;
        check_len("matmul_dx dy", dy.len(), rows * w.rows)?;
        let (dx, dy) = (&mut dx[..rows * w.cols], &dy[..rows * w.rows]);
        match &w.weight {
            CpuWeight::Dense(data) => matmul_dx(dx, dy, data, rows, w.cols, w.rows, accumulate),
            CpuWeight::Nf4(t) => {
                if accumulate {
                    let mut tmp = vec![0.0f32; dx.len()];
                    crate::quant::nf4_matmul(&mut tmp, dy, t, rows);
                    super::add_assign(dx, &tmp);
                } else {
                    crate::quant::nf4_matmul(dx, dy, t, rows);
                }
            }
        }
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        for (what, len) in [("dx", dx.len()), ("dy", dy.len()), ("x", x.len())] {
            check_len(&format!("rmsnorm_backward {what}"), len, rows * dim)?;
        }
        check_len("rmsnorm_backward weight", weight.len(), dim)?;
        rmsnorm_backward(dx, dy, x, weight, rows, dim, eps);
        Ok(())
    }

    fn rope_backward(
        &self,
        dx: &mut Vec<f32>,
        positions: &[u32],
        inv_freq: &Vec<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        check_len(
            "rope_backward dx",
            dx.len(),
            positions.len() * heads * head_dim,
        )?;
        check_len("rope_backward inv_freq", inv_freq.len(), head_dim / 2)?;
        rope_backward(dx, positions, inv_freq, heads, head_dim);
        Ok(())
    }

    fn attention_train(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        p: Packed,
    ) -> Result<()> {
        let qs = [("out", out.len()), ("q", q.len())];
        check_attention(p, &qs, &[("k", k.len()), ("v", v.len())], lse.len())?;
        for (start, len) in p.spans() {
            let [qr, kr, lr] = seq_ranges(p, start, len);
            let (o, l) = (&mut out[qr.clone()], &mut lse[lr]);
            let (k, v) = (&k[kr.clone()], &v[kr]);
            flash_attention_forward(o, l, &q[qr], k, v, p.seq(len));
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        p: Packed,
    ) -> Result<()> {
        let qs = [
            ("dq", dq.len()),
            ("dout", dout.len()),
            ("q", q.len()),
            ("out", out.len()),
        ];
        let kvs = [
            ("dk", dk.len()),
            ("dv", dv.len()),
            ("k", k.len()),
            ("v", v.len()),
        ];
        check_attention(p, &qs, &kvs, lse.len())?;
        for (start, len) in p.spans() {
            let [qr, kr, lr] = seq_ranges(p, start, len);
            let (dq, dk, dv) = (
                &mut dq[qr.clone()],
                &mut dk[kr.clone()],
                &mut dv[kr.clone()],
            );
            let (q, k, v) = (&q[qr.clone()], &k[kr.clone()], &v[kr]);
            let (dout, out, lse) = (&dout[qr.clone()], &out[qr], &lse[lr]);
            flash_attention_backward(dq, dk, dv, dout, q, k, v, out, lse, p.seq(len));
        }
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
        dh: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        len: usize,
    ) -> Result<()> {
        for (what, have) in [
            ("dgate", dgate.len()),
            ("dup", dup.len()),
            ("dh", dh.len()),
            ("gate", gate.len()),
            ("up", up.len()),
        ] {
            check_len(&format!("swiglu_backward {what}"), have, len)?;
        }
        swiglu_backward(dgate, dup, &dh[..len], gate, up);
        Ok(())
    }

    fn cross_entropy_fused(
        &self,
        logits: &mut Vec<f32>,
        losses: &mut Vec<f32>,
        targets: &[i32],
        vocab: usize,
        scale: f32,
    ) -> Result<()> {
        let rows = targets.len();
        check_len("cross_entropy_fused logits", logits.len(), rows * vocab)?;
        check_len("cross_entropy_fused losses", losses.len(), rows)?;
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| t != -100 && (t < 0 || t as usize >= vocab))
        {
            return Err(Error::InvalidArg(format!(
                "target id {bad} outside vocab {vocab}"
            )));
        }
        cross_entropy_fused(logits, losses, targets, vocab, scale);
        Ok(())
    }

    fn lora_backward(
        &self,
        dx: &mut Vec<f32>,
        da: &mut Vec<f32>,
        db: &mut Vec<f32>,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        keep: Option<&Vec<f32>>,
        xa: &Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        scale: f32,
        sh: LoraShape,
    ) -> Result<()> {
        check_lora(sh, x, keep, a, b, xa, dy)?;
        check_len("lora_backward dx", dx.len(), sh.rows * sh.in_features)?;
        check_len("lora_backward dA", da.len(), sh.rank * sh.in_features)?;
        check_len("lora_backward dB", db.len(), sh.out_features * sh.rank)?;
        lora_backward(
            dx,
            da,
            db,
            dy,
            x,
            keep.map(Vec::as_slice),
            xa,
            a,
            b,
            scale,
            sh,
        );
        Ok(())
    }

    fn dropout_mask(
        &self,
        keep: &mut Vec<f32>,
        len: usize,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        check_len("dropout mask", keep.len(), len)?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidArg(format!(
                "dropout probability {p} must be in [0, 1)"
            )));
        }
        super::dropout::dropout_mask(&mut keep[..len], p, seed, offset);
        Ok(())
    }

    fn adamw_init(
        &self,
        sizes: &[usize],
        host: Option<Vec<AdamParamState>>,
        kind: OptimKind,
    ) -> Result<CpuOptState> {
        let Some(states) = host else {
            let states = sizes.iter().map(|&n| optim8::fresh(n, kind)).collect();
            return Ok(CpuOptState { kind, states });
        };
        let lens: Vec<usize> = states.iter().map(AdamParamState::len).collect();
        if lens != sizes {
            return Err(Error::InvalidArg(format!(
                "optimizer state holds tensors of sizes {lens:?}, the adapter has {sizes:?}"
            )));
        }
        let states = states
            .into_iter()
            .map(|s| optim8::for_kind(s, kind))
            .collect();
        Ok(CpuOptState { kind, states })
    }

    fn adamw_download(&self, state: &CpuOptState) -> Result<Vec<AdamParamState>> {
        Ok(state.states.clone())
    }

    fn adamw_step(
        &self,
        state: &mut CpuOptState,
        params: &mut [&mut Vec<f32>],
        grads: &mut [&mut Vec<f32>],
        hyper: &AdamW,
        lr: f64,
        max_norm: f32,
    ) -> Result<f32> {
        let (kind, state) = (state.kind, &mut state.states);
        if params.len() != grads.len() || params.len() != state.len() {
            return Err(Error::InvalidArg(format!(
                "adamw_step: {} parameters, {} gradients, {} states",
                params.len(),
                grads.len(),
                state.len()
            )));
        }
        for ((p, g), st) in params.iter().zip(grads.iter()).zip(state.iter()) {
            check_len("adamw_step param", p.len(), st.len())?;
            check_len("adamw_step grad", g.len(), st.len())?;
        }
        let mut slices: Vec<&mut [f32]> = grads
            .iter_mut()
            .zip(state.iter())
            .map(|(g, st)| &mut g[..st.len()])
            .collect();
        let norm = if max_norm > 0.0 {
            clip_grad_norm(&mut slices, max_norm)
        } else {
            grad_norm(slices.iter().map(|s| &**s))
        };
        if !norm.is_finite() {
            return Ok(norm);
        }
        for ((p, g), st) in params.iter_mut().zip(slices).zip(state.iter_mut()) {
            let n = st.len();
            match kind {
                OptimKind::PagedAdamW8bit => optim8::step(hyper, lr, &mut p[..n], g, st),
                OptimKind::PagedAdamW32bit | OptimKind::AdamW => {
                    hyper.update(lr, &mut p[..n], g, st)
                }
            }
        }
        Ok(norm)
    }

    fn zero(&self, buf: &mut Vec<f32>, len: usize) -> Result<()> {
        check_len("zero", buf.len(), len)?;
        buf[..len].fill(0.0);
        Ok(())
    }
}
