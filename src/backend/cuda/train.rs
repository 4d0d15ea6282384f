//! [`TrainBackend`] on a CUDA device: the training step's backward ops, activations stashed in
//! bf16, and the optimizer (paged AdamW) with its states on the device.
//!
//! Each op dispatches to its launcher (`flash_attention.rs`, `nf4_gemm_dx.rs`, `lora.rs`,
//! `rmsnorm.rs`, `ops.rs`, `cross_entropy.rs`, `dropout.rs`, `adamw.rs`, `adamw8.rs`), which checks buffer
//! sizes and is tested against the CPU specification by `qlora check` (`crate::check`).
//!
//! Mixed precision (as QLoRA trains): GEMM operands are rounded to bf16 and multiplied on
//! tensor cores with f32 accumulation (the NF4 `x·Wᵀ` and `dy·W`, attention's `q·kᵀ` and
//! `P·v`, the LoRA products); norms, softmax, cross-entropy, the residual stream and every
//! reduction stay f32; activations kept for the backward are stored as bf16
//! ([`TrainBackend::stash`]); the LoRA matrices, their gradients and the AdamW states are f32
//! (master copies), rounded to bf16 only as GEMM operands, except under `paged_adamw_8bit`, whose
//! moments are bitsandbytes' 8-bit blockwise codes ([`DeviceOptState::Q8`]).

use super::adamw::DeviceAdamW;
use super::adamw8::DeviceAdamW8;
use super::backend::{CudaBackend, CudaLinear, Prefill};
use super::blas::{gemm_f32, RowMajor};
use super::flash_attention;
use super::runtime::DevBuf;
use super::{cross_entropy, dropout, lora, ops, rmsnorm};
use crate::backend::{LoraShape, Packed, TrainBackend};
use crate::error::{Error, Result};
use crate::train::{optim8, AdamParamState, AdamW, OptimKind};

/// The device optimizer's states: 32-bit AdamW (`paged_adamw_32bit`, `adamw`; bit-exact with
/// torch's rule) or bitsandbytes' 8-bit AdamW (`paged_adamw_8bit`).
pub enum DeviceOptState {
    F32(DeviceAdamW),
    Q8(DeviceAdamW8),
}

impl DeviceOptState {
    /// Whether the states live in managed (pageable) memory.
    pub fn paged(&self) -> bool {
        match self {
            DeviceOptState::F32(s) => s.paged(),
            DeviceOptState::Q8(s) => s.paged(),
        }
    }

    /// Device bytes of the states.
    pub fn nbytes(&self) -> usize {
        match self {
            DeviceOptState::F32(s) => s.nbytes(),
            DeviceOptState::Q8(s) => s.nbytes(),
        }
    }
}

impl CudaBackend {
    /// `dx (+)= dy · W` on the path the weight's format chooses: cuBLAS for dense weights, the
    /// fused NF4 tensor-core kernel (or the baseline [`Prefill`] selects) for NF4 ones.
    fn product_dx(
        &self,
        dx: &mut DevBuf<f32>,
        dy: &DevBuf<f32>,
        w: &CudaLinear,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        let beta = if accumulate { 1.0 } else { 0.0 };
        match w {
            CudaLinear::Dense { rows: n, cols, w } => {
                let p = RowMajor::xw(rows, *n, *cols).scaled(1.0, beta);
                gemm_f32(&self.blas, dx, dy, w, p)
            }
            CudaLinear::Half(h) => {
                let mut scratch = self.bf16_scratch.lock().unwrap_or_else(|p| p.into_inner());
                h.gemm_dx(
                    &self.dev,
                    &self.blas,
                    &mut scratch,
                    dx,
                    dy,
                    rows,
                    accumulate,
                )
            }
            CudaLinear::Nf4(t) if self.prefill == Prefill::Fused && t.gemm_dx_supported() => {
                t.gemm_dx(&self.dev, dx, dy, rows, accumulate)
            }
            CudaLinear::Nf4(t) if self.prefill == Prefill::DequantCublasBf16 => {
                let mut scratch = self.bf16_scratch.lock().unwrap_or_else(|p| p.into_inner());
                scratch.gemm_dx(&self.dev, &self.blas, t, dx, dy, rows, accumulate)
            }
            CudaLinear::Nf4(t) => {
                let mut guard = self.f32_scratch.lock().unwrap_or_else(|p| p.into_inner());
                let w = self.dev.grown(&mut guard, t.rows * t.cols)?;
                t.dequantize(&self.dev, w)?;
                let p = RowMajor::xw(rows, t.rows, t.cols).scaled(1.0, beta);
                gemm_f32(&self.blas, dx, dy, w, p)
            }
        }
    }
}

fn as_slices<'a>(bufs: &'a mut [&mut DevBuf<f32>]) -> Vec<&'a mut cudarc::driver::CudaSlice<f32>> {
    bufs.iter_mut().map(|b| &mut ***b).collect()
}

impl TrainBackend for CudaBackend {
    /// bf16 bits.
    type Saved = DevBuf<u16>;
    type OptState = DeviceOptState;

    fn stash(&self, buf: DevBuf<f32>, len: usize) -> Result<DevBuf<u16>> {
        let mut out = self.dev.zeros::<u16>(len)?;
        ops::to_half(&self.dev, &mut out, &buf, len, false)?;
        Ok(out)
    }

    fn unstash(&self, saved: &DevBuf<u16>, len: usize) -> Result<DevBuf<f32>> {
        let mut out = self.dev.zeros::<f32>(len)?;
        ops::bf16_to_f32(&self.dev, &mut out, saved, len)?;
        Ok(out)
    }

    fn matmul_dx(
        &self,
        dx: &mut DevBuf<f32>,
        dy: &DevBuf<f32>,
        w: &CudaLinear,
        rows: usize,
        accumulate: bool,
    ) -> Result<()> {
        self.product_dx(dx, dy, w, rows, accumulate)
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut DevBuf<f32>,
        dy: &DevBuf<f32>,
        x: &DevBuf<f32>,
        weight: &DevBuf<f32>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        rmsnorm::rmsnorm_backward(&self.dev, dx, dy, x, weight, rows, dim, eps)
    }

    fn rope_backward(
        &self,
        dx: &mut DevBuf<f32>,
        positions: &[u32],
        inv_freq: &DevBuf<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.rope_signed(dx, positions, inv_freq, heads, head_dim, -1.0)
    }

    fn attention_train(
        &self,
        out: &mut DevBuf<f32>,
        lse: &mut DevBuf<f32>,
        q: &DevBuf<f32>,
        k: &DevBuf<f32>,
        v: &DevBuf<f32>,
        p: Packed,
    ) -> Result<()> {
        // One launch for the whole packed batch; the sequence tables are uploaded once per
        // distinct batch layout (every layer of a step shares them).
        let mut scratch = self.flash.lock().unwrap_or_else(|p| p.into_inner());
        flash_attention::forward_packed(&self.dev, &mut scratch, out, lse, q, k, v, p)
    }

    fn attention_backward(
        &self,
        dq: &mut DevBuf<f32>,
        dk: &mut DevBuf<f32>,
        dv: &mut DevBuf<f32>,
        dout: &DevBuf<f32>,
        q: &DevBuf<f32>,
        k: &DevBuf<f32>,
        v: &DevBuf<f32>,
        out: &DevBuf<f32>,
        lse: &DevBuf<f32>,
        p: Packed,
    ) -> Result<()> {
        let mut scratch = self.flash.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *scratch;
        flash_attention::backward_packed(&self.dev, s, dq, dk, dv, dout, q, k, v, out, lse, p)
    }

    fn swiglu_backward(
        &self,
        dgate: &mut DevBuf<f32>,
        dup: &mut DevBuf<f32>,
        dh: &DevBuf<f32>,
        gate: &DevBuf<f32>,
        up: &DevBuf<f32>,
        len: usize,
    ) -> Result<()> {
        ops::swiglu_backward(&self.dev, dgate, dup, dh, gate, up, len)
    }

    fn cross_entropy_fused(
        &self,
        logits: &mut DevBuf<f32>,
        losses: &mut DevBuf<f32>,
        targets: &[i32],
        vocab: usize,
        scale: f32,
    ) -> Result<()> {
        if let Some(&bad) = targets
            .iter()
            .find(|&&t| t != -100 && (t < 0 || t as usize >= vocab))
        {
            return Err(Error::InvalidArg(format!(
                "target id {bad} outside vocab {vocab}"
            )));
        }
        cross_entropy::cross_entropy_fused(&self.dev, logits, losses, targets, vocab, scale)
    }

    fn lora_backward(
        &self,
        dx: &mut DevBuf<f32>,
        da: &mut DevBuf<f32>,
        db: &mut DevBuf<f32>,
        dy: &DevBuf<f32>,
        x: &DevBuf<f32>,
        keep: Option<&DevBuf<f32>>,
        xa: &DevBuf<f32>,
        a: &DevBuf<f32>,
        b: &DevBuf<f32>,
        scale: f32,
        sh: LoraShape,
    ) -> Result<()> {
        let mut scratch = self.lora_scratch.lock().unwrap_or_else(|p| p.into_inner());
        lora::lora_backward(
            &self.dev,
            &self.blas,
            &mut scratch,
            dx,
            da,
            db,
            dy,
            x,
            keep.map(|k| &**k),
            xa,
            a,
            b,
            scale,
            sh,
        )
    }

    fn dropout_mask(
        &self,
        keep: &mut DevBuf<f32>,
        len: usize,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidArg(format!(
                "dropout probability {p} must be in [0, 1)"
            )));
        }
        dropout::dropout_mask(&self.dev, keep, len, p, seed, offset)
    }

    fn adamw_init(
        &self,
        sizes: &[usize],
        host: Option<Vec<AdamParamState>>,
        kind: OptimKind,
    ) -> Result<DeviceOptState> {
        if let Some(h) = &host {
            let lens: Vec<usize> = h.iter().map(AdamParamState::len).collect();
            if lens != sizes {
                return Err(Error::InvalidArg(format!(
                    "optimizer state holds tensors of sizes {lens:?}, the adapter has {sizes:?}"
                )));
            }
        }
        // A checkpoint of the other optimizer converts (`optim8::for_kind`).
        let host: Option<Vec<AdamParamState>> =
            host.map(|h| h.into_iter().map(|s| optim8::for_kind(s, kind)).collect());
        match kind {
            OptimKind::PagedAdamW8bit => {
                let mut st = DeviceAdamW8::new(&self.dev, sizes, kind.paged())?;
                if let Some(h) = host {
                    st.upload_state(&self.dev, &h)?;
                }
                Ok(DeviceOptState::Q8(st))
            }
            OptimKind::PagedAdamW32bit | OptimKind::AdamW => {
                let mut st = DeviceAdamW::new(&self.dev, sizes, kind.paged())?;
                if let Some(h) = host {
                    st.upload_state(&self.dev, &h)?;
                }
                Ok(DeviceOptState::F32(st))
            }
        }
    }

    fn adamw_download(&self, state: &DeviceOptState) -> Result<Vec<AdamParamState>> {
        match state {
            DeviceOptState::F32(s) => s.download_state(&self.dev),
            DeviceOptState::Q8(s) => s.download_state(&self.dev),
        }
    }

    fn adamw_step(
        &self,
        state: &mut DeviceOptState,
        params: &mut [&mut DevBuf<f32>],
        grads: &mut [&mut DevBuf<f32>],
        hyper: &AdamW,
        lr: f64,
        max_norm: f32,
    ) -> Result<f32> {
        let mut p = as_slices(params);
        let g: Vec<&cudarc::driver::CudaSlice<f32>> = grads.iter().map(|b| &***b).collect();
        match state {
            DeviceOptState::F32(s) => s.step(&self.dev, &mut p, &g, hyper, lr, max_norm),
            DeviceOptState::Q8(s) => s.step(&self.dev, &mut p, &g, hyper, lr, max_norm),
        }
    }

    fn zero(&self, buf: &mut DevBuf<f32>, len: usize) -> Result<()> {
        if buf.len() < len {
            return Err(Error::Backend(format!(
                "cuda zero: buffer holds {} values, op needs {len}",
                buf.len()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let mut view = buf.slice_mut(..len);
        self.dev
            .stream
            .memset_zeros(&mut view)
            .map_err(|e| Error::Backend(format!("cuda zero: {e}")))
    }
}
