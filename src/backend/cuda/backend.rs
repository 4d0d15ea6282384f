//! [`Backend`] on a CUDA device: buffers are metered device `f32` slices ([`DevBuf`]), dense
//! projections go through cuBLAS sgemm, NF4 projections through the fused GEMV (≤ 8 rows,
//! decoding) or, for prefill and evaluation, the fused tensor-core NF4 GEMM (bf16 inputs, f32
//! accumulation). [`Prefill`] switches the latter (and the backward's `dy·W`) to one of the
//! baselines it is measured against. The LoRA term runs in bf16 on cuBLAS (`lora.rs`), except
//! at decode over NF4 weights, where it is fused into the GEMV (`lora_decode.rs`).
//! Training ops (`TrainBackend`) are in `train.rs`.

use super::dense_half::{DeviceHalf, HALF_GEMV_MAX_M};
use super::lora::LoraScratch;
use super::lora_decode;
use super::nf4::{DeviceNf4, GEMV_MAX_M};
use super::nf4_gemm::Bf16Scratch;
use super::ops::{self, DevU32};
use super::runtime::{CudaDevice, DevBuf};
use super::step::{StepMode, StepWord, Steps};
use crate::backend::{AttnShape, Backend, DecodeStep, HostLinear, LoraShape, LoraTerm, RawTensor};
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use std::sync::{Arc, Mutex};

/// How NF4 projections of more than [`GEMV_MAX_M`] rows are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefill {
    /// `kernels/nf4_gemm.cu`: decode inside the tile loader, bf16 tensor cores (the default;
    /// shapes it does not take fall back to [`Prefill::DequantSgemm`]).
    #[default]
    Fused,
    /// Baseline: dequantize W to a bf16 scratch buffer, then cuBLAS bf16 GEMM (f32 accumulate).
    DequantCublasBf16,
    /// Baseline: dequantize W to an f32 scratch buffer, then cuBLAS sgemm (exact f32).
    DequantSgemm,
}

/// A CUDA device with cuBLAS, usable as a [`Backend`].
pub struct CudaBackend {
    pub dev: Arc<CudaDevice>,
    pub(super) blas: CudaBlas,
    /// The NF4 prefill path (see [`Prefill`]).
    pub prefill: Prefill,
    pub(super) bf16_scratch: Mutex<Bf16Scratch>,
    pub(super) f32_scratch: Mutex<Option<DevBuf<f32>>>,
    pub(super) lora_scratch: Mutex<LoraScratch>,
    /// Training attention's sequence tables and Δ buffer, reused while the batch layout holds.
    pub(super) flash: Mutex<super::flash_attention::FlashScratch>,
    /// Flash-decoding's split partials.
    pub(super) decode: Mutex<super::decode_attention::DecodeScratch>,
    /// `x·Aᵀ` of the fused decode LoRA GEMV.
    lora_xa: Mutex<Option<DevBuf<f32>>>,
    /// The last RoPE positions uploaded: every layer of a forward pass rotates at the same
    /// positions, so they cross the bus once per pass instead of twice per layer.
    positions: Mutex<Option<(Vec<u32>, DevBuf<u32>)>>,
    /// The sampled token id (`Backend::sample`), one u32 reused every token.
    sample_out: Mutex<Option<DevBuf<u32>>>,
    /// Decode-step graphs (`step.rs`).
    pub(super) steps: Mutex<Steps>,
    /// Set while a decode step's ops are issued: where its token and position words are.
    pub(super) step_mode: Mutex<Option<StepMode>>,
}

/// A projection weight on the device.
pub enum CudaLinear {
    Dense {
        rows: usize,
        cols: usize,
        w: DevBuf<f32>,
    },
    /// A dense weight whose values are exactly bf16 or f16 (see [`DeviceHalf`]).
    Half(DeviceHalf),
    Nf4(Box<DeviceNf4>),
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` (see [`CudaDevice::new`] for the checks).
    pub fn new(ordinal: usize) -> Result<Self> {
        let dev = Arc::new(CudaDevice::new(ordinal)?);
        // cudarc panics when libcublas cannot be loaded: check (and find it) first.
        super::libs::ensure_cublas()?;
        let blas = CudaBlas::new(dev.stream.clone())
            .map_err(|e| Error::Backend(format!("cuBLAS: {e}")))?;
        Ok(CudaBackend {
            dev,
            blas,
            prefill: Prefill::default(),
            bf16_scratch: Mutex::default(),
            f32_scratch: Mutex::default(),
            lora_scratch: Mutex::default(),
            flash: Mutex::default(),
            decode: Mutex::default(),
            lora_xa: Mutex::default(),
            positions: Mutex::default(),
            sample_out: Mutex::default(),
            steps: Mutex::default(),
            step_mode: Mutex::default(),
        })
    }

    /// The cuBLAS handle (bound to the device's stream).
    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// RoPE (`sign = 1`) or its transpose (`sign = −1`) at `positions`, uploaded once per
    /// distinct position list.
    pub(super) fn rope_signed(
        &self,
        x: &mut DevBuf<f32>,
        positions: &[u32],
        inv_freq: &DevBuf<f32>,
        heads: usize,
        head_dim: usize,
        sign: f32,
    ) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        if let [p] = positions {
            let word = self.step_word(StepWord::Pos, *p as usize)?;
            if !matches!(word, DevU32::Addr(0)) {
                return ops::rope(&self.dev, x, word, 1, inv_freq, heads, head_dim, sign);
            }
        }
        let mut cached = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        if cached.as_ref().is_none_or(|(p, _)| p != positions) {
            *cached = None;
            *cached = Some((positions.to_vec(), self.dev.upload(positions)?));
        }
        let (_, pos) = cached.as_ref().expect("uploaded above");
        let rows = positions.len();
        let pos = DevU32::Buf(pos);
        ops::rope(&self.dev, x, pos, rows, inv_freq, heads, head_dim, sign)
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` through cuBLAS sgemm on a dense f32 device weight.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_dense_f32(
        &self,
        y: &mut DevBuf<f32>,
        x: &DevBuf<f32>,
        w: &DevBuf<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        ops::gemm_wt(&self.blas, y, x, w, m, k, n, 1.0, 0.0)
    }

    /// `out (+)= x · Wᵀ` on the path the weight's format and `rows` choose (see the module doc);
    /// `add` accumulates into `out` (fused in the GEMV/GEMM epilogues and sgemm's beta; the
    /// 16-bit and baseline paths compute into a temporary and add).
    fn product(
        &self,
        out: &mut DevBuf<f32>,
        x: &DevBuf<f32>,
        w: &CudaLinear,
        rows: usize,
        add: bool,
    ) -> Result<()> {
        match w {
            CudaLinear::Dense { rows: n, cols, w } => {
                let beta = if add { 1.0 } else { 0.0 };
                ops::gemm_wt(&self.blas, out, x, w, rows, *cols, *n, 1.0, beta)
            }
            CudaLinear::Nf4(t) if rows <= GEMV_MAX_M => t.gemv(&self.dev, out, x, rows, add),
            CudaLinear::Nf4(t) if self.prefill == Prefill::Fused && t.gemm_supported() => {
                t.gemm(&self.dev, out, x, rows, add)
            }
            _ if add => crate::backend::matmul_then_add(self, out, x, w, rows),
            CudaLinear::Half(h) if rows <= HALF_GEMV_MAX_M => h.gemv(&self.dev, out, x, rows),
            CudaLinear::Half(h) => h.gemm(
                &self.dev,
                &self.blas,
                &mut self.bf16_scratch.lock().unwrap_or_else(|p| p.into_inner()),
                out,
                x,
                rows,
            ),
            CudaLinear::Nf4(t) if self.prefill == Prefill::DequantCublasBf16 => self
                .bf16_scratch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .gemm(&self.dev, &self.blas, t, out, x, rows),
            CudaLinear::Nf4(t) => self.nf4_dequant_sgemm(out, x, t, rows),
        }
    }

    /// `out = x · dequant(W)ᵀ` by dequantizing into a reused f32 scratch buffer, then sgemm.
    fn nf4_dequant_sgemm(
        &self,
        out: &mut DevBuf<f32>,
        x: &DevBuf<f32>,
        t: &DeviceNf4,
        rows: usize,
    ) -> Result<()> {
        let mut guard = self.f32_scratch.lock().unwrap_or_else(|p| p.into_inner());
        let scratch = self.dev.grown(&mut guard, t.rows * t.cols)?;
        t.dequantize(&self.dev, scratch)?;
        ops::gemm_wt(&self.blas, out, x, scratch, rows, t.cols, t.rows, 1.0, 0.0)
    }
}

impl Backend for CudaBackend {
    type Buf = DevBuf<f32>;
    type Linear = CudaLinear;
    /// bf16 bits, written by `kv_write_bf16` (round to nearest even).
    type Kv = DevBuf<u16>;

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

    fn device_memory_peak(&self) -> Option<usize> {
        Some(self.dev.peak_bytes())
    }

    fn linear(&self, w: HostLinear) -> Result<CudaLinear> {
        Ok(match w {
            HostLinear::Dense { rows, cols, data } => {
                match DeviceHalf::lossless(&self.dev, rows, cols, &data)? {
                    Some(h) => CudaLinear::Half(h),
                    None => CudaLinear::Dense {
                        rows,
                        cols,
                        w: self.dev.upload(&data)?,
                    },
                }
            }
            HostLinear::Nf4(t) => CudaLinear::Nf4(Box::new(DeviceNf4::upload(&self.dev, &t)?)),
        })
    }

    fn quantize_linear(
        &self,
        raw: RawTensor<'_>,
        rows: usize,
        cols: usize,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Option<CudaLinear>> {
        let t = super::nf4_quantize::quantize_to_device(
            &self.dev,
            raw,
            (rows, cols),
            blocksize,
            double_quant,
        )?;
        Ok(t.map(|t| CudaLinear::Nf4(Box::new(t))))
    }

    fn linear_shape(&self, w: &CudaLinear) -> (usize, usize) {
        match w {
            CudaLinear::Dense { rows, cols, .. } => (*rows, *cols),
            CudaLinear::Half(h) => (h.rows, h.cols),
            CudaLinear::Nf4(t) => (t.rows, t.cols),
        }
    }

    fn linear_bytes(&self, w: &CudaLinear) -> usize {
        match w {
            CudaLinear::Dense { w, .. } => 4 * w.len(),
            CudaLinear::Half(h) => h.nbytes(),
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

    fn kv_new(&self, len: usize) -> Result<DevBuf<u16>> {
        self.dev.zeros(len)
    }

    fn kv_write(
        &self,
        cache: &mut DevBuf<u16>,
        off: usize,
        src: &Self::Buf,
        len: usize,
    ) -> Result<()> {
        let pos = self.step_word(StepWord::Pos, off / len.max(1))?;
        super::decode_attention::kv_write(&self.dev, cache, off, src, len, pos)
    }

    fn embedding(
        &self,
        out: &mut Self::Buf,
        table: &CudaLinear,
        ids: &[u32],
        dim: usize,
    ) -> Result<()> {
        let (vocab, cols) = self.linear_shape(table);
        if cols != dim {
            return Err(Error::Backend(format!(
                "embedding: table rows hold {cols} values, not {dim}"
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::InvalidArg(format!(
                "token id {bad} is outside the embedding table (vocab {vocab})"
            )));
        }
        let word = match ids {
            [id] => self.step_word(StepWord::Token, *id as usize)?,
            _ => DevU32::NULL,
        };
        let uploaded;
        let ids_dev = match word {
            DevU32::Addr(0) if ids.is_empty() => word,
            DevU32::Addr(0) => {
                uploaded = self.dev.upload(ids)?;
                DevU32::Buf(&uploaded)
            }
            step => step,
        };
        let rows = ids.len();
        match table {
            CudaLinear::Dense { w, .. } => ops::embedding(&self.dev, out, w, ids_dev, rows, dim),
            CudaLinear::Half(h) => {
                ops::embedding_half(&self.dev, out, &h.w, h.f16, ids_dev, rows, dim)
            }
            CudaLinear::Nf4(_) => Err(Error::Backend(
                "embedding: the table must be dense, not NF4".into(),
            )),
        }
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
        self.product(out, x, w, rows, false)
    }

    fn matmul_add(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &CudaLinear,
        rows: usize,
    ) -> Result<()> {
        self.product(out, x, w, rows, true)
    }

    fn lora_inference_copy(
        &self,
        m: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<Option<CudaLinear>> {
        let copy = DeviceHalf::bf16_of(&self.dev, m, rows, cols)?;
        Ok(copy.map(CudaLinear::Half))
    }

    fn matmul_lora(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &CudaLinear,
        lora: Option<LoraTerm<'_, Self>>,
        rows: usize,
        add: bool,
    ) -> Result<()> {
        match (w, &lora) {
            (CudaLinear::Nf4(t), Some(l)) if lora_decode::fused_supported(t, rows, l.rank) => {
                let mut xa = self.lora_xa.lock().unwrap_or_else(|p| p.into_inner());
                let adapter = match l.frozen {
                    Some((CudaLinear::Half(a), CudaLinear::Half(b))) if !a.f16 && !b.f16 => {
                        lora_decode::Adapter::Bf16(&a.w, &b.w)
                    }
                    _ => lora_decode::Adapter::F32(l.a, l.b),
                };
                let term = (adapter, l.scale, l.rank);
                lora_decode::nf4_lora_gemv(&self.dev, &mut xa, t, out, x, term, rows, add)
            }
            _ => crate::backend::matmul_lora_unfused(self, out, x, w, lora, rows, add),
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
        self.rope_signed(x, positions, inv_freq, heads, head_dim, 1.0)
    }

    fn attention(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        k_cache: &Self::Kv,
        v_cache: &Self::Kv,
        shape: AttnShape,
    ) -> Result<()> {
        let pos = match (shape.batch, shape.q_len) {
            (1, 1) => self.step_word(StepWord::Pos, shape.pos0)?,
            _ => DevU32::NULL,
        };
        let mut scratch = self.decode.lock().unwrap_or_else(|p| p.into_inner());
        let (dev, sc) = (&self.dev, &mut *scratch);
        super::decode_attention::attention(dev, sc, out, q, k_cache, v_cache, shape, pos)
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
        let mut scratch = self.lora_scratch.lock().unwrap_or_else(|p| p.into_inner());
        super::lora::lora_forward_add(
            &self.dev,
            &self.blas,
            &mut scratch,
            y,
            xa,
            x,
            keep.map(|k| &**k),
            a,
            b,
            scale,
            sh,
        )
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

    fn sample(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        s: &crate::generate::Sampling,
        u: f32,
    ) -> Result<u32> {
        let mut slot = self.sample_out.lock().unwrap_or_else(|p| p.into_inner());
        let out = self.dev.grown(&mut slot, 1)?;
        super::sample::sample(&self.dev, logits, vocab, s, u, out)
    }

    fn buf_addr(&self, buf: &Self::Buf) -> usize {
        use cudarc::driver::DevicePtr;
        buf.device_ptr(&self.dev.stream).0 as usize
    }

    fn linear_addr(&self, w: &CudaLinear) -> usize {
        use cudarc::driver::DevicePtr;
        let s = &self.dev.stream;
        (match w {
            CudaLinear::Dense { w, .. } => w.device_ptr(s).0,
            CudaLinear::Half(h) => h.w.device_ptr(s).0,
            CudaLinear::Nf4(t) => t.packed().device_ptr(s).0,
        }) as usize
    }

    fn decode_step(&self, step: DecodeStep, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        self.run_step(step, body)
    }
}
