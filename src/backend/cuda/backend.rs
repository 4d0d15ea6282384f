//! [`Backend`] on a CUDA device: buffers are device `f32` slices, dense projections go through
//! cuBLAS sgemm, NF4 projections through the fused GEMV (≤ 8 rows, decoding) or, for prefill,
//! dequantize-into-scratch + sgemm (the baseline a fused tensor-core GEMM must beat). The LoRA
//! term is two sgemms (inference only: no dropout mask on this backend yet).

use super::nf4::{DeviceNf4, GEMV_MAX_M};
use super::ops;
use super::runtime::CudaDevice;
use crate::backend::{AttnShape, Backend, HostLinear, LoraShape};
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::CudaSlice;
use std::sync::Arc;

/// A CUDA device with cuBLAS, usable as a [`Backend`].
pub struct CudaBackend {
    pub dev: Arc<CudaDevice>,
    blas: CudaBlas,
}

/// A projection weight on the device.
pub enum CudaLinear {
    Dense {
        rows: usize,
        cols: usize,
        w: CudaSlice<f32>,
    },
    Nf4(Box<DeviceNf4>),
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` (see [`CudaDevice::new`] for the checks).
    pub fn new(ordinal: usize) -> Result<Self> {
        let dev = Arc::new(CudaDevice::new(ordinal)?);
        let blas = CudaBlas::new(dev.stream.clone())
            .map_err(|e| Error::Backend(format!("cuBLAS: {e}")))?;
        Ok(CudaBackend { dev, blas })
    }
}

impl Backend for CudaBackend {
    type Buf = CudaSlice<f32>;
    type Linear = CudaLinear;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{})",
            self.dev.ordinal, self.dev.name, self.dev.capability.0, self.dev.capability.1
        )
    }

    fn zeros(&self, len: usize) -> Result<Self::Buf> {
        self.dev.zeros(len)
    }

    fn upload(&self, data: &[f32]) -> Result<Self::Buf> {
        self.dev.upload(data)
    }

    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        self.dev.download(buf)
    }

    fn linear(&self, w: HostLinear) -> Result<CudaLinear> {
        Ok(match w {
            HostLinear::Dense { rows, cols, data } => CudaLinear::Dense {
                rows,
                cols,
                w: self.dev.upload(&data)?,
            },
            HostLinear::Nf4(t) => CudaLinear::Nf4(Box::new(DeviceNf4::upload(&self.dev, &t)?)),
        })
    }

    fn linear_shape(&self, w: &CudaLinear) -> (usize, usize) {
        match w {
            CudaLinear::Dense { rows, cols, .. } => (*rows, *cols),
            CudaLinear::Nf4(t) => (t.rows, t.cols),
        }
    }

    fn linear_bytes(&self, w: &CudaLinear) -> usize {
        match w {
            CudaLinear::Dense { w, .. } => 4 * w.len(),
            CudaLinear::Nf4(t) => t.nbytes(),
        }
    }

    fn copy(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        if dst.len() < dst_off + len || src.len() < src_off + len {
            return Err(Error::Backend("cuda copy: range out of bounds".into()));
        }
        if len == 0 {
            return Ok(());
        }
        let s = src.slice(src_off..src_off + len);
        let mut d = dst.slice_mut(dst_off..dst_off + len);
        self.dev
            .stream
            .memcpy_dtod(&s, &mut d)
            .map_err(|e| Error::Backend(format!("cuda copy: {e}")))
    }

    fn embedding(
        &self,
        out: &mut Self::Buf,
        table: &Self::Buf,
        ids: &[u32],
        dim: usize,
    ) -> Result<()> {
        let vocab = table.len() / dim.max(1);
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::InvalidArg(format!(
                "token id {bad} is outside the embedding table (vocab {vocab})"
            )));
        }
        ops::embedding(&self.dev, out, table, ids, dim)
    }

    fn rmsnorm(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        weight: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        super::rmsnorm::rmsnorm(&self.dev, out, x, weight, rows, dim, eps)
    }

    fn matmul(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &CudaLinear,
        rows: usize,
    ) -> Result<()> {
        match w {
            CudaLinear::Dense { rows: n, cols, w } => {
                ops::gemm_wt(&self.blas, out, x, w, rows, *cols, *n, 1.0, 0.0)
            }
            CudaLinear::Nf4(t) if rows <= GEMV_MAX_M => t.gemv(&self.dev, out, x, rows),
            CudaLinear::Nf4(t) => {
                let mut scratch = self.dev.zeros::<f32>(t.rows * t.cols)?;
                t.dequantize(&self.dev, &mut scratch)?;
                ops::gemm_wt(&self.blas, out, x, &scratch, rows, t.cols, t.rows, 1.0, 0.0)
            }
        }
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &[u32],
        inv_freq: &Self::Buf,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        ops::rope(&self.dev, x, positions, inv_freq, heads, head_dim, 1.0)
    }

    fn attention(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        shape: AttnShape,
    ) -> Result<()> {
        ops::attention(&self.dev, out, q, k_cache, v_cache, shape)
    }

    fn swiglu(
        &self,
        out: &mut Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        len: usize,
    ) -> Result<()> {
        ops::swiglu(&self.dev, out, gate, up, len)
    }

    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()> {
        ops::add_assign(&self.dev, x, y, len)
    }

    fn lora_forward_add(
        &self,
        y: &mut Self::Buf,
        xa: &mut Self::Buf,
        x: &Self::Buf,
        keep: Option<&Self::Buf>,
        a: &Self::Buf,
        b: &Self::Buf,
        scale: f32,
        sh: LoraShape,
    ) -> Result<()> {
        if keep.is_some() {
            return Err(Error::Backend(
                "LoRA dropout (training) is not implemented on the CUDA backend yet".into(),
            ));
        }
        let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
        ops::gemm_wt(&self.blas, xa, x, a, m, k, r, 1.0, 0.0)?;
        ops::gemm_wt(&self.blas, y, xa, b, m, r, n, scale, 1.0)
    }

    fn cross_entropy(
        &self,
        losses: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &[i32],
        vocab: usize,
    ) -> Result<()> {
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| t != -100 && (t < 0 || t as usize >= vocab))
        {
            return Err(Error::InvalidArg(format!(
                "target id {bad} outside vocab {vocab}"
            )));
        }
        ops::cross_entropy(&self.dev, losses, logits, targets, vocab)
    }
}
