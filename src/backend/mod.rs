//! The compute backend: the op set one Llama step needs, implemented once per device.
//!
//! Model code (`crate::model`) is written once against [`Backend`]; the CPU implementation
//! (`cpu/`) is the plain, readable specification of every op, and the CUDA implementation
//! (`cuda/`, feature `cuda`) must agree with it. Each op lives in three places side by side:
//! `kernels/<op>.cu`, `src/backend/cuda/<op>.rs`, `src/backend/cpu/<op>.rs`.
//!
//! Conventions shared by all ops:
//! - Activations are row-major f32 buffers; a "row" is one token. Shapes are given explicitly in
//!   each call (like llm.c), so buffers may be larger than the region an op touches.
//! - Linear weights follow PyTorch: `W` is `[out, in]` and a projection computes `y = x · Wᵀ`.
//! - Token ids and positions are host slices; a device backend uploads them itself.

pub mod cpu;
pub mod cuda;
mod train;

pub use train::{LoraShape, TrainBackend};

use crate::error::Result;
use crate::quant::Nf4Tensor;
use crate::weights::DType;

/// A linear projection's weight as it arrives from the checkpoint, on the host.
#[derive(Debug, Clone)]
pub enum HostLinear {
    /// Dense weight `[rows = out_features, cols = in_features]`, row-major, already widened to f32.
    Dense {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
    /// NF4 weight in bitsandbytes' layout, shape `[out_features, in_features]`; backends keep it
    /// packed and dequantize inside the matmul.
    Nf4(Nf4Tensor),
}

impl HostLinear {
    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            HostLinear::Dense { rows, cols, .. } => (*rows, *cols),
            HostLinear::Nf4(t) => (t.shape[0], t.shape[1]),
        }
    }

    /// Bytes this weight occupies on the host.
    pub fn nbytes(&self) -> usize {
        match self {
            HostLinear::Dense { data, .. } => 4 * data.len(),
            HostLinear::Nf4(t) => t.nbytes(),
        }
    }
}

/// A checkpoint tensor as stored: its dtype and its little-endian, row-major bytes, borrowed from
/// the memory map (unaligned possibly). What [`Backend::quantize_linear`] reads.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
}

impl RawTensor<'_> {
    /// Element `i` widened to f32 (exactly, as [`crate::weights::Checkpoint::load_f32`] does);
    /// `None` past the end or for a dtype other than F32, F16, BF16.
    pub fn get_f32(&self, i: usize) -> Option<f32> {
        let at = |w: usize| self.bytes.get(i * w..(i + 1) * w);
        Some(match self.dtype {
            DType::F32 => f32::from_le_bytes(at(4)?.try_into().ok()?),
            DType::F16 => half::f16::from_le_bytes(at(2)?.try_into().ok()?).to_f32(),
            DType::BF16 => half::bf16::from_le_bytes(at(2)?.try_into().ok()?).to_f32(),
            _ => return None,
        })
    }
}

/// Shape of one causal-attention call (prefill, chunked prefill or decode).
///
/// Layouts: `q` and `out` are `[batch, q_len, heads, head_dim]`; the key/value caches are
/// `[batch, cache_cap, kv_heads, head_dim]` and hold valid entries at positions `0..pos0 + q_len`.
/// Query `t` sits at absolute position `pos0 + t` and attends to keys `0..=pos0 + t` (causal).
/// Query head `h` reads key/value head `h / (heads / kv_heads)` (grouped-query attention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub pos0: usize,
    pub cache_cap: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A packed batch of causal sequences, as training attention sees it (FlashAttention's varlen
/// layout): sequence `i` holds `lens[i]` tokens at rows `start_i..start_i + lens[i]`
/// (`start_i = Σ_{j<i} lens[j]`) of `q`, `out` `[rows, heads, head_dim]`, `k`, `v`
/// `[rows, kv_heads, head_dim]` and `lse` `[rows, heads]`. Each sequence attends causally within
/// itself from position 0; no token sees another sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packed<'a> {
    pub lens: &'a [usize],
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Packed<'_> {
    /// Total rows (tokens) of the batch.
    pub fn rows(&self) -> usize {
        self.lens.iter().sum()
    }

    /// `(first row, length)` of every sequence, in order.
    pub fn spans(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.lens.iter().scan(0usize, |start, &len| {
            let s = *start;
            *start += len;
            Some((s, len))
        })
    }

    /// The single-sequence [`AttnShape`] of a sequence of `len` tokens.
    pub fn seq(&self, len: usize) -> AttnShape {
        AttnShape {
            batch: 1,
            q_len: len,
            pos0: 0,
            cache_cap: len,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// The op set of a Llama forward step. Every op writes its full output region.
pub trait Backend: Send + Sync {
    /// An f32 buffer in the backend's memory.
    type Buf: Send + Sync;
    /// A linear weight `[out, in]` in whatever form the backend keeps it.
    type Linear: Send + Sync;
    /// One layer's key or value cache (f32 on the CPU, the spec; bf16 on CUDA, rounded to
    /// nearest even when written): written with [`Backend::kv_write`], read by
    /// [`Backend::attention`].
    type Kv: Send + Sync;

    /// Human-readable device name, e.g. `cpu (2 threads)`.
    fn name(&self) -> String;

    /// A zero-filled buffer of `len` floats.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// Copies host data into a new buffer.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// Copies a buffer back to the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// High-water mark of the device memory this backend's buffers took, for accelerators
    /// (`None` on the CPU, where the process' peak RSS says it).
    fn device_memory_peak(&self) -> Option<usize> {
        None
    }
    /// Prepares a linear weight for [`Backend::matmul`].
    fn linear(&self, w: HostLinear) -> Result<Self::Linear>;
    /// Quantizes a decoder projection `[rows, cols]` to NF4 in the backend's memory straight from
    /// its stored bytes (F32, F16 or BF16), bit-identical with
    /// [`crate::quant::quantize_nf4`]`(widened, [rows, cols], blocksize, double_quant)`. A
    /// non-finite element is an [`crate::Error::InvalidArg`] reading `non-finite weight {value}
    /// at flat index {i}`. `Ok(None)` means "not here": the caller quantizes on the host and
    /// calls [`Backend::linear`] (the default, and the CPU's behaviour).
    fn quantize_linear(
        &self,
        raw: RawTensor<'_>,
        rows: usize,
        cols: usize,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Option<Self::Linear>> {
        let _ = (raw, rows, cols, blocksize, double_quant);
        Ok(None)
    }
    /// `(out_features, in_features)` of a prepared weight.
    fn linear_shape(&self, w: &Self::Linear) -> (usize, usize);
    /// Bytes a prepared weight occupies in the backend's memory.
    fn linear_bytes(&self, w: &Self::Linear) -> usize;

    /// `dst[dst_off..dst_off+len] = src[src_off..src_off+len]`.
    fn copy(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        len: usize,
    ) -> Result<()>;

    /// A zero-filled key/value cache of `len` values.
    fn kv_new(&self, len: usize) -> Result<Self::Kv>;
    /// `cache[off..off+len] = src[0..len]` (in the cache's precision).
    fn kv_write(&self, cache: &mut Self::Kv, off: usize, src: &Self::Buf, len: usize)
        -> Result<()>;

    /// Row gather: `out[i, :] = table[ids[i], :]`; `table` is a dense `[vocab, dim]` weight from
    /// [`Backend::linear`] (so a device keeps it in 16 bits where that is lossless, as it does
    /// lm_head), `out` is `[ids.len(), dim]` f32. An NF4 table or an id ≥ vocab is an error.
    fn embedding(
        &self,
        out: &mut Self::Buf,
        table: &Self::Linear,
        ids: &[u32],
        dim: usize,
    ) -> Result<()>;

    /// RMSNorm per row: `out = x / sqrt(mean(x²) + eps) * weight`; `x`, `out` are `[rows, dim]`.
    fn rmsnorm(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        weight: &Self::Buf,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()>;

    /// `out[rows, out_f] = x[rows, in_f] · Wᵀ` with `W` `[out_f, in_f]` (NF4 weights are
    /// dequantized inside the product, never materialised).
    fn matmul(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Linear,
        rows: usize,
    ) -> Result<()>;

    /// `out[rows, out_f] += x[rows, in_f] · Wᵀ`: a projection with the residual add fused (the
    /// attention output and down projections). The default computes into a temporary and adds;
    /// a device backend accumulates inside the product.
    fn matmul_add(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Linear,
        rows: usize,
    ) -> Result<()> {
        matmul_then_add(self, out, x, w, rows)
    }

    /// `out (+)= x·Wᵀ + scale · (x·Aᵀ)·Bᵀ`: a projection with its inference LoRA term (no
    /// dropout) and, with `add`, the residual add. The default is [`matmul_lora_unfused`] (the
    /// spec: [`Backend::matmul`] or [`Backend::matmul_add`], then
    /// [`Backend::lora_forward_add`]); a device backend fuses the adapter into its decode GEMV.
    fn matmul_lora(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Linear,
        lora: Option<LoraTerm<'_, Self>>,
        rows: usize,
        add: bool,
    ) -> Result<()> {
        matmul_lora_unfused(self, out, x, w, lora, rows, add)
    }

    /// An inference copy of a LoRA matrix `m` `[rows, cols]` of an adapter that will not change
    /// again (generate, chat, eval: see `Llama::freeze_adapter`), in the form the backend's
    /// [`Backend::matmul_lora`] reads fastest; it arrives there as [`LoraTerm::frozen`]. The
    /// f32 buffer stays the truth (training updates it in place and never asks for copies).
    /// `Ok(None)`: no copy, `matmul_lora` reads the f32 matrices (the default, and the CPU's
    /// behaviour: it is the spec). CUDA makes a bf16 copy (round to nearest even), half the bytes
    /// the decode GEMV reads.
    fn lora_inference_copy(
        &self,
        m: &Self::Buf,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Self::Linear>> {
        let _ = (m, rows, cols);
        Ok(None)
    }

    /// In-place rotary embedding, transformers' rotate-half convention. `x` is `[rows, heads, head_dim]`
    /// with `rows = positions.len()`; for pair `i < head_dim/2` at position `p`, with
    /// `θ = p · inv_freq[i]` (f32 product): `(x_i, x_{i+d/2}) ← (x_i cosθ − x_{i+d/2} sinθ, x_{i+d/2} cosθ + x_i sinθ)`.
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &[u32],
        inv_freq: &Self::Buf,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;

    /// Causal grouped-query attention, `softmax(q·kᵀ / sqrt(head_dim)) · v`; see [`AttnShape`].
    fn attention(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        k_cache: &Self::Kv,
        v_cache: &Self::Kv,
        shape: AttnShape,
    ) -> Result<()>;

    /// SwiGLU: `out = silu(gate) * up` elementwise over `len` values, `silu(g) = g / (1 + e^{-g})`.
    fn swiglu(
        &self,
        out: &mut Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        len: usize,
    ) -> Result<()>;

    /// Residual add: `x += y` over `len` values.
    fn add_assign(&self, x: &mut Self::Buf, y: &Self::Buf, len: usize) -> Result<()>;

    /// LoRA adapter term of a projection (PEFT's `Linear.forward`): writes `xa = (x ⊙ keep)·Aᵀ`
    /// `[rows, rank]` and accumulates `y += scale · xa·Bᵀ`. `x` `[rows, in]`, `y` `[rows, out]`,
    /// `A` `[rank, in]`, `B` `[out, rank]`; `keep` is an inverted-dropout mask `[rows, in]`
    /// (`None`: no dropout). Derivation and backward in `cpu/backward/lora.rs`.
    #[allow(clippy::too_many_arguments)]
    fn lora_forward_add(
        &self,
        y: &mut Self::Buf,
        xa: &mut Self::Buf,
        x: &Self::Buf,
        keep: Option<&Self::Buf>,
        a: &Self::Buf,
        b: &Self::Buf,
        scale: f32,
        shape: LoraShape,
    ) -> Result<()>;

    /// Per-row cross-entropy of `logits` `[rows, vocab]` against `targets` (`-100` = ignored, loss 0):
    /// `losses[r] = logsumexp(logits[r]) − logits[r, targets[r]]`.
    fn cross_entropy(
        &self,
        losses: &mut Self::Buf,
        logits: &Self::Buf,
        targets: &[i32],
        vocab: usize,
    ) -> Result<()>;

    /// The next token from one row of logits `[vocab]` (the first `vocab` values of `logits`)
    /// under `s`, with `u ∈ [0, 1)` the only random input (drawn by the host, ignored when
    /// greedy). Specification: `cpu/sample.rs`. The default downloads the row and runs it; a
    /// device backend samples in place and returns only the id.
    fn sample(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        s: &crate::generate::Sampling,
        u: f32,
    ) -> Result<u32> {
        let row = self.download(logits)?;
        if row.len() < vocab || vocab == 0 {
            return Err(crate::Error::Backend(format!(
                "sample: logits hold {} values, vocab is {vocab}",
                row.len()
            )));
        }
        Ok(cpu::sample::sample(&row[..vocab], s, u))
    }

    /// An address identifying `buf` for [`Backend::decode_step`]'s recordings: on a device
    /// backend where its data lives (two buffers with the same address and length are then
    /// interchangeable to a recorded step); the default, for backends that record nothing, is
    /// the buffer object's own address.
    fn buf_addr(&self, buf: &Self::Buf) -> usize {
        std::ptr::from_ref(buf) as usize
    }

    /// [`Backend::buf_addr`] for a projection weight (the adapter's inference copies).
    fn linear_addr(&self, w: &Self::Linear) -> usize {
        std::ptr::from_ref(w) as usize
    }

    /// Issues `body`, the ops of one decode step (`step.token` at `step.pos`). The default runs
    /// it. A device backend may record the ops of a cache's step once and replay the recording
    /// at that cache's later steps (CUDA: one graph launch per token, `cuda/step.rs`), so `body`
    /// must issue the same ops on the same buffers at every step of a cache, with the token and
    /// the position as the only inputs that change, read nothing back, and pass those two to the
    /// ops that take them (`embedding`, `rope`, `kv_write`, `attention`) unchanged. A step
    /// whose ops differ from the cache's earlier steps (another adapter) must carry another
    /// `step.cache`.
    fn decode_step(&self, step: DecodeStep, body: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let _ = step;
        body()
    }
}

/// A one-token decode step, for [`Backend::decode_step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeStep {
    /// The KV cache's id (unique for the process: a new cache is a new id).
    pub cache: u64,
    pub token: u32,
    /// The token's position (the cache's length before the step).
    pub pos: usize,
}

/// An adapter's inference term `scale · (x·Aᵀ)·Bᵀ` for [`Backend::matmul_lora`]: `A` `[rank,
/// in]`, `B` `[out, rank]` (PEFT's `lora_A`, `lora_B`).
pub struct LoraTerm<'a, B: Backend + ?Sized> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    pub scale: f32,
    pub rank: usize,
    /// The [`Backend::lora_inference_copy`] of `A` and `B` when the adapter is frozen (`None`
    /// while training, or where the backend makes none). A backend may read these instead of
    /// `a`, `b`; the unfused default ([`matmul_lora_unfused`]) ignores them.
    pub frozen: Option<(&'a B::Linear, &'a B::Linear)>,
}

/// [`Backend::matmul_lora`] as separate ops: the projection (with its residual add when `add`),
/// then the adapter term through [`Backend::lora_forward_add`] with a temporary `x·Aᵀ`.
pub fn matmul_lora_unfused<B: Backend + ?Sized>(
    b: &B,
    out: &mut B::Buf,
    x: &B::Buf,
    w: &B::Linear,
    lora: Option<LoraTerm<'_, B>>,
    rows: usize,
    add: bool,
) -> Result<()> {
    if add {
        b.matmul_add(out, x, w, rows)?;
    } else {
        b.matmul(out, x, w, rows)?;
    }
    let Some(l) = lora else {
        return Ok(());
    };
    let (out_features, in_features) = b.linear_shape(w);
    let mut xa = b.zeros(rows * l.rank)?;
    let shape = LoraShape {
        rows,
        in_features,
        out_features,
        rank: l.rank,
    };
    b.lora_forward_add(out, &mut xa, x, None, l.a, l.b, l.scale, shape)
}

/// [`Backend::matmul_add`] without a fused path: the product into a temporary, then the add.
pub fn matmul_then_add<B: Backend + ?Sized>(
    b: &B,
    out: &mut B::Buf,
    x: &B::Buf,
    w: &B::Linear,
    rows: usize,
) -> Result<()> {
    let n = b.linear_shape(w).0;
    let mut tmp = b.zeros(rows * n)?;
    b.matmul(&mut tmp, x, w, rows)?;
    b.add_assign(out, &tmp, rows * n)
}

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    Cpu,
    /// The GPU when one is usable, else the CPU.
    Auto,
    /// A specific CUDA device ordinal.
    Cuda(usize),
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceRequest::Cpu),
            "auto" => Ok(DeviceRequest::Auto),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; use auto, cpu, cuda or cuda:N")),
        }
    }
}

/// Picks the backend for training. Like [`select`], but with `auto` a GPU that is present and
/// cannot be used (a library missing, a driver too old, a card below sm_80) is an error that says
/// why and what to install, never a silent fall-back to the CPU (where a 7B step takes minutes).
pub fn select_for_training(req: DeviceRequest) -> Result<AnyBackend> {
    if req != DeviceRequest::Auto {
        return select(req);
    }
    #[cfg(feature = "cuda")]
    if cuda::driver_present() && cuda::runtime::device_count()? > 0 {
        return match cuda::backend::CudaBackend::new(0) {
            Ok(b) => {
                tracing::info!("device auto: training on {}", b.name());
                Ok(AnyBackend::Cuda(Box::new(b)))
            }
            Err(e) => Err(crate::Error::Backend(format!(
                "{e}\n(a GPU is present but cannot be used; fix the above, or pass --device cpu to train on the CPU)"
            ))),
        };
    }
    if cfg!(feature = "cuda") {
        tracing::info!("device auto: no GPU found, training on the CPU");
    } else {
        tracing::info!(
            "device auto: this qlora was built without CUDA (--features cuda), training on the CPU"
        );
    }
    select(DeviceRequest::Cpu)
}

/// A backend chosen at run time.
pub enum AnyBackend {
    Cpu(cpu::CpuBackend),
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::backend::CudaBackend>),
}

/// Picks the backend for a `--device` request. `auto` uses the GPU when this build can and one
/// is usable (and says which), else the CPU.
pub fn select(req: DeviceRequest) -> Result<AnyBackend> {
    match req {
        DeviceRequest::Cpu => Ok(AnyBackend::Cpu(cpu::CpuBackend::new())),
        DeviceRequest::Auto => {
            #[cfg(feature = "cuda")]
            if cuda::driver_present() {
                match cuda::backend::CudaBackend::new(0) {
                    Ok(b) => {
                        tracing::info!("device auto: using {}", b.name());
                        return Ok(AnyBackend::Cuda(Box::new(b)));
                    }
                    Err(e) => tracing::info!("device auto: GPU not usable ({e}), using the CPU"),
                }
                return Ok(AnyBackend::Cpu(cpu::CpuBackend::new()));
            }
            if cuda::driver_present() {
                tracing::info!(
                    "device auto: a CUDA driver is present, but {}",
                    cuda::unavailable()
                );
            } else {
                tracing::info!("device auto: no usable GPU, using the CPU");
            }
            Ok(AnyBackend::Cpu(cpu::CpuBackend::new()))
        }
        #[cfg(feature = "cuda")]
        DeviceRequest::Cuda(n) => Ok(AnyBackend::Cuda(Box::new(cuda::backend::CudaBackend::new(
            n,
        )?))),
        #[cfg(not(feature = "cuda"))]
        DeviceRequest::Cuda(_) => Err(cuda::unavailable()),
    }
}
