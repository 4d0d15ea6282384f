//! Where [`Llama`](super::Llama)'s weights come from while it is assembled: a checkpoint ([`TensorSource`]:
//! names and shapes checked, projections quantized per [`BaseQuant`] or by the backend, an
//! adapter optionally merged in first) or random values ([`RandomSource`], tests and benches).

use super::llama::{BaseQuant, LoadStats};
use crate::backend::{Backend, HostLinear, RawTensor};
use crate::error::{Error, Result};
use crate::quant::quantize_nf4;
use crate::weights::Checkpoint;

/// An adapter added into the base weights while loading ([`Llama::load_merged`]): each adapted
/// projection becomes `W + scale · B·A` before it is quantized.
#[derive(Clone, Copy)]
pub struct MergeLora<'a> {
    pub weights: &'a crate::lora::LoraWeights,
    pub scale: f32,
}

/// Reads tensors for [`Llama::load`], counting progress.
pub(super) struct TensorSource<'a, P: FnMut(usize, usize)> {
    pub(super) ckpt: &'a Checkpoint,
    pub(super) quant: BaseQuant,
    pub(super) merge: Option<MergeLora<'a>>,
    pub(super) done: usize,
    pub(super) total: usize,
    pub(super) progress: P,
    pub(super) stats: LoadStats,
}

impl<'a, P: FnMut(usize, usize)> TensorSource<'a, P> {
    fn tick(&mut self) {
        self.done += 1;
        (self.progress)(self.done, self.total);
    }

    /// A float tensor widened to f32, rejected if it holds NaN or ±Inf.
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let v = self.ckpt.load_f32(name, shape)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.bad(
                name,
                format!("non-finite weight {} at flat index {i}", v[i]),
            ));
        }
        Ok(v)
    }

    /// The adapter pair to merge into tensor `name`, if any.
    fn merge_pair(&self, name: &str) -> Option<(&'a crate::lora::LoraPair, f32)> {
        let m = self.merge?;
        let module = crate::merge::module_of(name)?;
        m.weights.modules.get(&module).map(|p| (p, m.scale))
    }

    /// `W + scale · B·A` for an adapted projection `[rows, cols]` (a pre-quantized base is
    /// dequantized first), then held as `quant` asks: QLoRA's merge, in memory.
    fn merged_linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<HostLinear> {
        let (pair, scale) = self.merge_pair(name).expect("called for adapted tensors");
        let mut w = if crate::quant::bnb::is_prequantized(self.ckpt, name) {
            let t = crate::quant::bnb::load_prequantized(self.ckpt, name, &[rows, cols])?;
            crate::quant::dequantize_nf4(&t)
        } else {
            self.load(name, &[rows, cols])?
        };
        crate::merge::add_lora(&mut w, pair, scale);
        Ok(match self.quant {
            BaseQuant::None => HostLinear::Dense {
                rows,
                cols,
                data: w,
            },
            BaseQuant::Nf4 {
                blocksize,
                double_quant,
            } => {
                let t = std::time::Instant::now();
                let q = quantize_nf4(&w, &[rows, cols], blocksize, double_quant)
                    .map_err(|e| self.bad(name, format!("cannot quantize to NF4: {e}")))?;
                self.stats.quantize_secs += t.elapsed().as_secs_f64();
                self.stats.host_quantized += 1;
                HostLinear::Nf4(q)
            }
        })
    }

    fn bad(&self, name: &str, msg: String) -> Error {
        let path = self
            .ckpt
            .get(name)
            .map(|i| i.file.clone())
            .unwrap_or_else(|| self.ckpt.dir().to_path_buf());
        Error::BadTensor {
            path,
            name: name.to_string(),
            msg,
        }
    }

    /// `--quant nf4` on a backend that quantizes by itself ([`Backend::quantize_linear`]): the
    /// stored bytes go to it from the memory map as they are. `None`: quantize on the host (also
    /// for a pre-quantized tensor, or a shape or dtype the host path then reports).
    fn backend_linear<B: Backend>(
        &mut self,
        b: &B,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<B::Linear>> {
        let BaseQuant::Nf4 {
            blocksize,
            double_quant,
        } = self.quant
        else {
            return Ok(None);
        };
        if crate::quant::bnb::is_prequantized(self.ckpt, name) {
            return Ok(None);
        }
        let (info, bytes) = self.ckpt.bytes(name)?;
        if info.shape != [rows, cols] || !info.dtype.is_loadable_float() {
            return Ok(None);
        }
        let raw = RawTensor {
            dtype: info.dtype,
            bytes,
        };
        let t = std::time::Instant::now();
        let w = b
            .quantize_linear(raw, rows, cols, blocksize, double_quant)
            .map_err(|e| match e {
                Error::InvalidArg(msg) => self.bad(name, msg),
                e => e,
            })?;
        if w.is_some() {
            self.stats.quantize_secs += t.elapsed().as_secs_f64();
            self.stats.device_quantized += 1;
        }
        Ok(w)
    }

    /// A decoder projection `[rows, cols]` on the host, quantized as asked.
    fn host_linear(&mut self, name: &str, rows: usize, cols: usize) -> Result<HostLinear> {
        // A checkpoint saved by transformers + bitsandbytes in 4-bit: use its NF4 bytes as they are.
        if crate::quant::bnb::is_prequantized(self.ckpt, name) {
            let t = crate::quant::bnb::load_prequantized(self.ckpt, name, &[rows, cols])?;
            return Ok(match self.quant {
                BaseQuant::None => HostLinear::Dense {
                    rows,
                    cols,
                    data: crate::quant::dequantize_nf4(&t),
                },
                BaseQuant::Nf4 { .. } => HostLinear::Nf4(t),
            });
        }
        let data = self.load(name, &[rows, cols])?;
        Ok(match self.quant {
            BaseQuant::None => HostLinear::Dense { rows, cols, data },
            BaseQuant::Nf4 {
                blocksize,
                double_quant,
            } => {
                let t = std::time::Instant::now();
                let q = quantize_nf4(&data, &[rows, cols], blocksize, double_quant)
                    .map_err(|e| self.bad(name, format!("cannot quantize to NF4: {e}")))?;
                self.stats.quantize_secs += t.elapsed().as_secs_f64();
                self.stats.host_quantized += 1;
                HostLinear::Nf4(q)
            }
        })
    }
}

/// Where [`Llama::assemble`] gets each tensor: the checkpoint, or random values for benchmarks.
pub(super) trait WeightSource<B: Backend> {
    /// Embeddings, norms, lm_head, widened to f32.
    fn vector(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// A decoder projection `[rows, cols]`, prepared on backend `b`.
    fn linear(&mut self, b: &B, name: &str, rows: usize, cols: usize) -> Result<B::Linear>;
}

impl<B: Backend, P: FnMut(usize, usize)> WeightSource<B> for TensorSource<'_, P> {
    fn vector(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut v = self.load(name, shape)?;
        if let Some((pair, scale)) = self.merge_pair(name) {
            crate::merge::add_lora(&mut v, pair, scale); // lm_head
        }
        self.ckpt.release(name);
        self.tick();
        Ok(v)
    }

    fn linear(&mut self, b: &B, name: &str, rows: usize, cols: usize) -> Result<B::Linear> {
        let t = std::time::Instant::now();
        let w = if self.merge_pair(name).is_some() {
            b.linear(self.merged_linear(name, rows, cols)?)?
        } else {
            match self.backend_linear(b, name, rows, cols)? {
                Some(w) => w,
                None => b.linear(self.host_linear(name, rows, cols)?)?,
            }
        };
        self.stats.linear_secs += t.elapsed().as_secs_f64();
        // What we keep is a copy: let the kernel drop the file pages behind it.
        self.ckpt.release(name);
        self.tick();
        Ok(w)
    }
}

/// Random weights: uniform in ±0.05, norms 1, a fixed pattern for the embedding; with `nf4`,
/// decoder projections are random NF4 tensors (random codes, absmax in [0.01, 0.05], blocks of
/// 64, f32 scales) built directly, without quantizing a dense matrix (fast at 7B scale).
pub(super) struct RandomSource(pub(super) rand::rngs::StdRng, pub(super) bool);

impl RandomSource {
    fn uniform(&mut self, n: usize) -> Vec<f32> {
        use rand::Rng;
        (0..n)
            .map(|_| self.0.random_range(-0.05f32..0.05))
            .collect()
    }
}

impl<B: Backend> WeightSource<B> for RandomSource {
    fn vector(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n = shape.iter().product();
        Ok(if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name == "model.embed_tokens.weight" {
            (0..n)
                .map(|i| ((i * 2654435761) % 1000) as f32 * 1e-4 - 0.05)
                .collect()
        } else if self.1 {
            // Dense tensors of the NF4 benchmark model hold bf16 values, as a real checkpoint's
            // do (so a device backend may keep them in 16 bits, as it would a real lm_head).
            self.uniform(n)
                .into_iter()
                .map(|v| half::bf16::from_f32(v).to_f32())
                .collect()
        } else {
            self.uniform(n)
        })
    }

    fn linear(&mut self, b: &B, _name: &str, rows: usize, cols: usize) -> Result<B::Linear> {
        b.linear(self.host_linear(rows, cols))
    }
}

impl RandomSource {
    fn host_linear(&mut self, rows: usize, cols: usize) -> HostLinear {
        use rand::Rng;
        if self.1 {
            let n = rows * cols;
            let mut packed = vec![0u8; n.div_ceil(2)];
            self.0.fill(&mut packed[..]);
            let absmax: Vec<f32> = (0..n.div_ceil(64))
                .map(|_| self.0.random_range(0.01f32..0.05))
                .collect();
            // QLoRA's setting: blocksize 64 with double-quantized scales.
            return HostLinear::Nf4(crate::quant::Nf4Tensor {
                shape: vec![rows, cols],
                blocksize: 64,
                packed,
                absmax: crate::quant::double_quant::compress_absmax(&absmax),
            });
        }
        HostLinear::Dense {
            rows,
            cols,
            data: self.uniform(rows * cols),
        }
    }
}
