//! [`TrainBackend`] for the CPU: bounds checks, then the f32 instantiation of the generic
//! backward ops in `backward/` (the readable specification, checked against finite differences
//! in f64 by `tests/gradcheck.rs`).

use super::backward::{
    attention_backward, cross_entropy_fused, lora_backward, matmul_dx, rmsnorm_backward,
    rope_backward, swiglu_backward,
};
use super::{check_len, CpuBackend, CpuLinear, CpuWeight};
use crate::backend::{AttnShape, LoraShape, TrainBackend};
use crate::error::{Error, Result};

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

    fn attention_backward(
        &self,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dout: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: AttnShape,
    ) -> Result<()> {
        if s.pos0 + s.q_len > s.cache_cap || s.kv_heads == 0 || s.heads % s.kv_heads != 0 {
            return Err(Error::Backend(format!(
                "cpu attention_backward: inconsistent shape {s:?}"
            )));
        }
        let q_n = s.batch * s.q_len * s.heads * s.head_dim;
        let kv_n = s.batch * s.cache_cap * s.kv_heads * s.head_dim;
        for (what, len) in [("dq", dq.len()), ("dout", dout.len()), ("q", q.len())] {
            check_len(&format!("attention_backward {what}"), len, q_n)?;
        }
        for (what, len) in [
            ("dk", dk.len()),
            ("dv", dv.len()),
            ("k", k.len()),
            ("v", v.len()),
        ] {
            check_len(&format!("attention_backward {what}"), len, kv_n)?;
        }
        attention_backward(dq, dk, dv, dout, q, k, v, s);
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

    fn dropout_mask(&self, keep: &mut Vec<f32>, len: usize, p: f32, seed: u64) -> Result<()> {
        check_len("dropout mask", keep.len(), len)?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidArg(format!(
                "dropout probability {p} must be in [0, 1)"
            )));
        }
        super::dropout::dropout_mask(&mut keep[..len], p, seed);
        Ok(())
    }
}
