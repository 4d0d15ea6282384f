//! CPU backend: the plain, readable specification of every op, multi-threaded with rayon.
//!
//! Each op sits in its own file beside the CUDA kernel that must agree with it. Buffers are
//! `Vec<f32>`; linear weights are dense f32 `[out, in]` and multiplied with the `gemm` crate.

mod attention;
pub mod backward;
mod cross_entropy;
pub mod decode_attention;
pub mod dropout;
mod elementwise;
pub mod flash_attention;
mod matmul;
mod nf4_gemm;
pub mod nf4_gemm_dx;
mod rmsnorm;
mod rope;
pub mod sample;
mod train;
pub use train::CpuOptState;

pub use attention::attention;
pub use cross_entropy::cross_entropy;
pub use elementwise::{add_assign, embedding, swiglu};
pub use matmul::matmul_wt;
pub use nf4_gemm::{bf16_round, nf4_bf16_weights, nf4_gemm_bf16};
pub use rmsnorm::rmsnorm;
pub use rope::rope;

use super::{AttnShape, Backend, HostLinear, LoraShape};
use crate::error::{Error, Result};

/// The CPU backend. Work is spread over rayon's global thread pool.
#[derive(Debug, Default, Clone)]
pub struct CpuBackend {
    /// Round what is written to the KV cache to bf16, as the CUDA backend stores it (off: the
    /// f32 specification).
    bf16_kv: bool,
}

/// A linear weight `[rows = out, cols = in]` as the CPU backend keeps it.
#[derive(Debug, Clone)]
pub struct CpuLinear {
    pub rows: usize,
    pub cols: usize,
    pub weight: CpuWeight,
}

/// Storage of a [`CpuLinear`].
#[derive(Debug, Clone)]
pub enum CpuWeight {
    /// Row-major f32 `[rows, cols]`.
    Dense(Vec<f32>),
    /// bitsandbytes NF4, multiplied by the fused kernels in [`crate::quant::matmul`].
    Nf4(crate::quant::Nf4Tensor),
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend::default()
    }

    /// The CPU specification of a device whose KV cache is bf16 (`kv_write` rounds to nearest
    /// even, as `kv_write_bf16` does; everything else unchanged), so that a comparison with the
    /// CUDA backend sees the same cached values on both sides.
    pub fn with_bf16_kv_cache() -> Self {
        CpuBackend { bf16_kv: true }
    }
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::Backend(format!(
            "cpu {what}: buffer holds {have} values, op needs {need}"
        )));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Linear = CpuLinear;
    type Kv = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn linear(&self, w: HostLinear) -> Result<CpuLinear> {
        match w {
            HostLinear::Dense { rows, cols, data } => {
                check_len("linear", data.len(), rows * cols)?;
                Ok(CpuLinear {
                    rows,
                    cols,
                    weight: CpuWeight::Dense(data),
                })
            }
            HostLinear::Nf4(t) => {
                if t.shape.len() != 2 {
                    return Err(Error::Backend(format!(
                        "NF4 linear weight must be 2-D, got shape {:?}",
                        t.shape
                    )));
                }
                t.validate()?;
                Ok(CpuLinear {
                    rows: t.shape[0],
                    cols: t.shape[1],
                    weight: CpuWeight::Nf4(t),
                })
            }
        }
    }

    fn linear_shape(&self, w: &CpuLinear) -> (usize, usize) {
        (w.rows, w.cols)
    }

    fn linear_bytes(&self, w: &CpuLinear) -> usize {
        match &w.weight {
            CpuWeight::Dense(d) => 4 * d.len(),
            CpuWeight::Nf4(t) => t.nbytes(),
        }
    }

    fn copy(
        &self,
        dst: &mut Vec<f32>,
        dst_off: usize,
        src: &Vec<f32>,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        check_len("copy dst", dst.len(), dst_off + len)?;
        check_len("copy src", src.len(), src_off + len)?;
        dst[dst_off..dst_off + len].copy_from_slice(&src[src_off..src_off + len]);
        Ok(())
    }

    fn kv_new(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn kv_write(&self, cache: &mut Vec<f32>, off: usize, src: &Vec<f32>, len: usize) -> Result<()> {
        self.copy(cache, off, src, 0, len)?;
        if self.bf16_kv {
            cache[off..off + len]
                .iter_mut()
                .for_each(|v| *v = bf16_round(*v));
        }
        Ok(())
    }

    fn embedding(
        &self,
        out: &mut Vec<f32>,
        table: &CpuLinear,
        ids: &[u32],
        dim: usize,
    ) -> Result<()> {
        check_len("embedding out", out.len(), ids.len() * dim)?;
        let CpuWeight::Dense(table) = &table.weight else {
            return Err(Error::Backend(
                "embedding: the table must be dense, not NF4".into(),
            ));
        };
        let vocab = table.len() / dim.max(1);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::InvalidArg(format!(
                "token id {bad} is outside the embedding table (vocab {vocab})"
            )));
        }
        embedding(&mut out[..ids.len() * dim], table, ids, dim);
        Ok(())
    }

    fn rmsnorm(
        &self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        check_len("rmsnorm x", x.len(), rows * dim)?;
        check_len("rmsnorm out", out.len(), rows * dim)?;
        check_len("rmsnorm weight", weight.len(), dim)?;
        rmsnorm(
            &mut out[..rows * dim],
            &x[..rows * dim],
            &weight[..dim],
            dim,
            eps,
        );
        Ok(())
    }

    fn matmul(&self, out: &mut Vec<f32>, x: &Vec<f32>, w: &CpuLinear, rows: usize) -> Result<()> {
        check_len("matmul x", x.len(), rows * w.cols)?;
        check_len("matmul out", out.len(), rows * w.rows)?;
        let (out, x) = (&mut out[..rows * w.rows], &x[..rows * w.cols]);
        match &w.weight {
            CpuWeight::Dense(data) => matmul_wt(out, x, data, rows, w.cols, w.rows),
            CpuWeight::Nf4(t) => crate::quant::nf4_matmul_wt(out, x, t, rows),
        }
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        positions: &[u32],
        inv_freq: &Vec<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let n = positions.len() * heads * head_dim;
        check_len("rope x", x.len(), n)?;
        check_len("rope inv_freq", inv_freq.len(), head_dim / 2)?;
        rope(
            &mut x[..n],
            positions,
            &inv_freq[..head_dim / 2],
            heads,
            head_dim,
        );
        Ok(())
    }

    fn attention(
        &self,
        out: &mut Vec<f32>,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        s: AttnShape,
    ) -> Result<()> {
        let q_n = s.batch * s.q_len * s.heads * s.head_dim;
        let kv_n = s.batch * s.cache_cap * s.kv_heads * s.head_dim;
        if s.pos0 + s.q_len > s.cache_cap || s.kv_heads == 0 || s.heads % s.kv_heads != 0 {
            return Err(Error::Backend(format!(
                "cpu attention: inconsistent shape {s:?}"
            )));
        }
        check_len("attention q", q.len(), q_n)?;
        check_len("attention out", out.len(), q_n)?;
        check_len("attention k", k_cache.len(), kv_n)?;
        check_len("attention v", v_cache.len(), kv_n)?;
        attention(
            &mut out[..q_n],
            &q[..q_n],
            &k_cache[..kv_n],
            &v_cache[..kv_n],
            s,
        );
        Ok(())
    }

    fn swiglu(&self, out: &mut Vec<f32>, gate: &Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        check_len("swiglu out", out.len(), len)?;
        check_len("swiglu gate", gate.len(), len)?;
        check_len("swiglu up", up.len(), len)?;
        swiglu(&mut out[..len], &gate[..len], &up[..len]);
        Ok(())
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
        check_len("add x", x.len(), len)?;
        check_len("add y", y.len(), len)?;
        add_assign(&mut x[..len], &y[..len]);
        Ok(())
    }

    fn lora_forward_add(
        &self,
        y: &mut Vec<f32>,
        xa: &mut Vec<f32>,
        x: &Vec<f32>,
        keep: Option<&Vec<f32>>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        scale: f32,
        sh: LoraShape,
    ) -> Result<()> {
        train::check_lora(sh, x, keep, a, b, xa, y)?;
        backward::lora_forward_add(y, xa, x, keep.map(Vec::as_slice), a, b, scale, sh);
        Ok(())
    }

    fn cross_entropy(
        &self,
        losses: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &[i32],
        vocab: usize,
    ) -> Result<()> {
        let rows = targets.len();
        check_len("cross_entropy logits", logits.len(), rows * vocab)?;
        check_len("cross_entropy losses", losses.len(), rows)?;
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| t != -100 && (t < 0 || t as usize >= vocab))
        {
            return Err(Error::InvalidArg(format!(
                "target id {bad} outside vocab {vocab}"
            )));
        }
        cross_entropy(&mut losses[..rows], &logits[..rows * vocab], targets, vocab);
        Ok(())
    }

    fn sample(
        &self,
        logits: &Vec<f32>,
        vocab: usize,
        s: &crate::generate::Sampling,
        u: f32,
    ) -> Result<u32> {
        check_len("sample logits", logits.len(), vocab)?;
        if vocab == 0 {
            return Err(Error::Backend("cpu sample: empty vocabulary".into()));
        }
        Ok(sample::sample(&logits[..vocab], s, u))
    }
}

#[cfg(test)]
mod matmul_add_tests {
    use super::*;

    #[test]
    fn matmul_add_is_matmul_plus_the_residual() {
        let b = CpuBackend::new();
        let (m, k, n) = (3, 64, 5);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 13.0)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 5 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let y0: Vec<f32> = (0..m * n).map(|i| i as f32 - 7.0).collect();
        for host in [
            HostLinear::Dense {
                rows: n,
                cols: k,
                data: w.clone(),
            },
            HostLinear::Nf4(crate::quant::quantize_nf4(&w, &[n, k], 64, true).unwrap()),
        ] {
            let lin = b.linear(host).unwrap();
            let mut plain = vec![0f32; m * n];
            b.matmul(&mut plain, &x, &lin, m).unwrap();
            let mut y = y0.clone();
            b.matmul_add(&mut y, &x, &lin, m).unwrap();
            for i in 0..m * n {
                assert_eq!(y[i], y0[i] + plain[i]);
            }
        }
    }
}
