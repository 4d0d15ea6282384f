//! Inference over a [`KvCache`]: [`Llama::forward`] runs a chunk of tokens (prefill,
//! evaluation), [`Llama::decode`] one token through [`Backend::decode_step`], which a device
//! backend may record once and replay (CUDA graphs, `backend/cuda/step.rs`). Both run the same
//! `blocks` (the math is in `llama.rs`'s module doc): the new keys and values are
//! written at positions `pos0..pos0 + T` first, so prefill (`pos0 = 0`) and decoding (`T = 1`)
//! are the same ops.

use super::llama::Llama;
use crate::backend::{AttnShape, Backend, DecodeStep};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::LoraTarget;
use std::sync::atomic::{AtomicU64, Ordering};

/// Per-layer key/value cache, `[cap, kv_heads, head_dim]` per layer (batch 1), in the backend's
/// cache precision ([`Backend::Kv`]: f32 on the CPU, bf16 on CUDA).
pub struct KvCache<B: Backend> {
    k: Vec<B::Kv>,
    v: Vec<B::Kv>,
    cap: usize,
    /// Number of positions already filled.
    pub len: usize,
    /// Activation buffers kept between short forward passes (≤ [`KEEP_SCRATCH_ROWS`] tokens).
    scratch: Option<Scratch<B>>,
    /// The buffers of [`Llama::decode`]'s steps: allocated at the first step, then the same at
    /// every step (a device that replays a recorded step reads them where it recorded them).
    step: Option<StepBufs<B>>,
    /// Unique for the process ([`DecodeStep::cache`]); renewed when the adapter the steps
    /// run with changes ([`Llama::adapter_signature`]).
    id: u64,
    /// The adapter signature of the last decode step.
    adapter: u64,
}

impl<B: Backend> KvCache<B> {
    /// Positions the cache holds (its buffers, like its id, never change: a recorded decode
    /// step reads them where it recorded them).
    pub fn cap(&self) -> usize {
        self.cap
    }
}

/// A decode step's activations and logits `[vocab]`.
struct StepBufs<B: Backend> {
    s: Scratch<B>,
    logits: B::Buf,
}

/// The next [`KvCache`] id.
static NEXT_CACHE_ID: AtomicU64 = AtomicU64::new(1);

/// Forward passes of at most this many tokens keep their activation buffers in the cache.
pub(crate) const KEEP_SCRATCH_ROWS: usize = 8;

/// Which rows of logits a forward pass should produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// `[T, vocab]`, for evaluation.
    All,
    /// `[1, vocab]` for the last token only, for generation.
    Last,
}

/// Activation buffers for a chunk of up to `rows` tokens, reused across layers.
struct Scratch<B: Backend> {
    /// Tokens the buffers have room for.
    rows: usize,
    x: B::Buf,
    xn: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    att: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    h: B::Buf,
}

impl<B: Backend> Scratch<B> {
    fn new(b: &B, cfg: &ModelConfig, rows: usize) -> Result<Self> {
        let (c, qd, kvd, f) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        Ok(Scratch {
            rows,
            x: b.zeros(rows * c)?,
            xn: b.zeros(rows * c)?,
            q: b.zeros(rows * qd)?,
            k: b.zeros(rows * kvd)?,
            v: b.zeros(rows * kvd)?,
            att: b.zeros(rows * qd)?,
            gate: b.zeros(rows * f)?,
            up: b.zeros(rows * f)?,
            h: b.zeros(rows * f)?,
        })
    }
}

impl<B: Backend> Llama<B> {
    /// An empty cache with room for `cap` positions.
    pub fn new_cache(&self, cap: usize) -> Result<KvCache<B>> {
        let n = cap * self.cfg.kv_dim();
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(self.backend.kv_new(n)?);
            v.push(self.backend.kv_new(n)?);
        }
        Ok(KvCache {
            k,
            v,
            cap,
            len: 0,
            scratch: None,
            step: None,
            id: NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed),
            adapter: 0,
        })
    }

    /// Runs `ids` (one sequence) at positions `cache.len..cache.len + ids.len()`, appends their keys
    /// and values to the cache, and returns the requested logits (`[rows, vocab]`, on the backend).
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache<B>, which: Logits) -> Result<B::Buf> {
        let cfg = &self.cfg;
        let b = &self.backend;
        let t = ids.len();
        let pos0 = cache.len;
        if t == 0 || pos0 + t > cache.cap {
            return Err(Error::InvalidArg(format!(
                "forward: {t} tokens at position {pos0} do not fit a cache of {} positions",
                cache.cap
            )));
        }
        // Every op writes its full output region, so reused buffers need no clearing.
        let mut s = match cache.scratch.take() {
            Some(s) if s.rows >= t => s,
            _ => Scratch::new(b, cfg, t)?,
        };
        self.blocks(&mut s, ids, pos0, (&mut cache.k, &mut cache.v), cache.cap)?;
        cache.len = pos0 + t;
        // Head: only the rows the caller wants. When that is all of `s.x` (every row, or the
        // one row of a decode step) the head runs on the scratch buffers directly.
        if t == 1 || which == Logits::All {
            let mut logits = b.zeros(t * cfg.vocab_size)?;
            self.head(&mut s, &mut logits, t)?;
            if t <= KEEP_SCRATCH_ROWS {
                cache.scratch = Some(s);
            }
            return Ok(logits);
        }
        // The last row of a longer chunk.
        let c = cfg.hidden_size;
        let mut last = b.zeros(c)?;
        b.copy(&mut last, 0, &s.x, (t - 1) * c, c)?;
        b.rmsnorm(&mut s.xn, &last, &self.norm, 1, c, cfg.rms_norm_eps)?;
        let mut logits = b.zeros(cfg.vocab_size)?;
        self.project(&mut logits, &s.xn, None, LoraTarget::LmHead, 1)?;
        Ok(logits)
    }

    /// One decode step: `token` at position `cache.len`, its key and value appended to the
    /// cache, issued through [`Backend::decode_step`] (on CUDA, after the first steps, one graph
    /// launch). Returns the step's logits `[vocab]`, held by the cache until its next step; the
    /// same values as [`Llama::forward`] of the one token.
    pub fn decode<'c>(&self, token: u32, cache: &'c mut KvCache<B>) -> Result<&'c B::Buf> {
        let (cfg, b) = (&self.cfg, &self.backend);
        let pos = cache.len;
        if pos >= cache.cap {
            return Err(Error::InvalidArg(format!(
                "decode: the cache's {} positions are all filled",
                cache.cap
            )));
        }
        // Checked here: a replayed step does not run the embedding's own check.
        if token as usize >= cfg.vocab_size {
            return Err(Error::InvalidArg(format!(
                "token id {token} is outside the embedding table (vocab {})",
                cfg.vocab_size
            )));
        }
        if cache.step.is_none() {
            cache.step = Some(StepBufs {
                s: Scratch::new(b, cfg, 1)?,
                logits: b.zeros(cfg.vocab_size)?,
            });
        }
        let adapter = self.adapter_signature();
        if adapter != cache.adapter {
            // Other adapter ops: not the steps a device may have recorded for this cache.
            cache.id = NEXT_CACHE_ID.fetch_add(1, Ordering::Relaxed);
            cache.adapter = adapter;
        }
        let step = DecodeStep {
            cache: cache.id,
            token,
            pos,
        };
        let KvCache { k, v, cap, .. } = cache;
        let bufs = cache.step.as_mut().expect("allocated above");
        b.decode_step(step, &mut || {
            self.blocks(&mut bufs.s, &[token], pos, (k, v), *cap)?;
            self.head(&mut bufs.s, &mut bufs.logits, 1)
        })?;
        cache.len = pos + 1;
        Ok(&cache.step.as_ref().expect("allocated above").logits)
    }

    /// The embedding and every decoder layer for `ids` at positions `pos0..`, their keys and
    /// values written into the cache `(k, v)` of `cap` positions; leaves the last hidden states
    /// in `s.x`.
    fn blocks(
        &self,
        s: &mut Scratch<B>,
        ids: &[u32],
        pos0: usize,
        (kc, vc): (&mut [B::Kv], &mut [B::Kv]),
        cap: usize,
    ) -> Result<()> {
        let (cfg, b) = (&self.cfg, &self.backend);
        let t = ids.len();
        let (c, kvd, f) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size);
        let positions: Vec<u32> = (pos0..pos0 + t).map(|p| p as u32).collect();
        let shape = AttnShape {
            batch: 1,
            q_len: t,
            pos0,
            cache_cap: cap,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
        };
        let (heads, kv_heads, hd) = (shape.heads, shape.kv_heads, shape.head_dim);
        b.embedding(&mut s.x, &self.embed, ids, c)?;
        for (l, w) in self.layers.iter().enumerate() {
            // Attention block.
            b.rmsnorm(&mut s.xn, &s.x, &w.attn_norm, t, c, cfg.rms_norm_eps)?;
            self.project(&mut s.q, &s.xn, Some(l), LoraTarget::QProj, t)?;
            self.project(&mut s.k, &s.xn, Some(l), LoraTarget::KProj, t)?;
            self.project(&mut s.v, &s.xn, Some(l), LoraTarget::VProj, t)?;
            b.rope(&mut s.q, &positions, &self.inv_freq, heads, hd)?;
            b.rope(&mut s.k, &positions, &self.inv_freq, kv_heads, hd)?;
            b.kv_write(&mut kc[l], pos0 * kvd, &s.k, t * kvd)?;
            b.kv_write(&mut vc[l], pos0 * kvd, &s.v, t * kvd)?;
            b.attention(&mut s.att, &s.q, &kc[l], &vc[l], shape)?;
            self.project_add(&mut s.x, &s.att, Some(l), LoraTarget::OProj, t)?;
            // MLP block.
            b.rmsnorm(&mut s.xn, &s.x, &w.mlp_norm, t, c, cfg.rms_norm_eps)?;
            self.project(&mut s.gate, &s.xn, Some(l), LoraTarget::GateProj, t)?;
            self.project(&mut s.up, &s.xn, Some(l), LoraTarget::UpProj, t)?;
            b.swiglu(&mut s.h, &s.gate, &s.up, t * f)?;
            self.project_add(&mut s.x, &s.h, Some(l), LoraTarget::DownProj, t)?;
        }
        Ok(())
    }

    /// A hash of what the attached adapter makes a decode step issue: each adapted module's
    /// buffers and inference copies (addresses and shapes), the rank and the scale; 0 without
    /// an adapter.
    fn adapter_signature(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let Some(lora) = &self.lora else { return 0 };
        let p = &lora.params;
        let mut h = std::hash::DefaultHasher::new();
        (p.rank, lora.scale.to_bits()).hash(&mut h);
        let layers = p.layers.iter().flat_map(|l| l.iter().map(Option::as_ref));
        for (i, m) in layers.chain([p.lm_head.as_ref()]).enumerate() {
            if let Some(m) = m {
                let b = &self.backend;
                (i, b.buf_addr(&m.a), b.buf_addr(&m.b)).hash(&mut h);
                (m.in_features, m.out_features).hash(&mut h);
                let frozen = m.frozen.as_ref();
                frozen
                    .map(|(fa, fb)| (b.linear_addr(fa), b.linear_addr(fb)))
                    .hash(&mut h);
            }
        }
        h.finish() | 1
    }

    /// `logits[t, vocab] = lm_head(rmsnorm(s.x) · w_norm)` for the first `t` rows of `s.x`.
    fn head(&self, s: &mut Scratch<B>, logits: &mut B::Buf, t: usize) -> Result<()> {
        let c = self.cfg.hidden_size;
        let eps = self.cfg.rms_norm_eps;
        self.backend
            .rmsnorm(&mut s.xn, &s.x, &self.norm, t, c, eps)?;
        self.project(logits, &s.xn, None, LoraTarget::LmHead, t)
    }
}
