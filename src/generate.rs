//! Text generation: sampling (greedy, temperature, top-k, top-p) over a KV-cached forward.
//!
//! The prompt is run once (prefill) and each new token is fed back one at a time (decode). The
//! last position's logits stay on the device: [`crate::backend::Backend::sample`] picks the token
//! there (`cpu/sample.rs` is the specification, `kernels/sample.cu` the CUDA version) and only its
//! id comes back; the host draws the one uniform it needs (see [`draw_uniform`]).

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Llama, Logits};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `p` (1 = off).
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::InvalidArg(format!(
                "--temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::InvalidArg(format!(
                "--top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

pub use crate::backend::cpu::sample::argmax;

/// The uniform for the next token: one `rng.random::<f32>()` when `s` samples, none when greedy.
///
/// Draw order (the `--seed` contract, the same on every device): the generator is
/// `StdRng::seed_from_u64(seed)`; each generated token, prefill's first included, takes exactly
/// one `f32` draw before its logits are sampled, and greedy decoding takes none. The token is
/// then a function of the logits and this uniform only ([`crate::backend::Backend::sample`]), so
/// two devices whose logits agree write the same text.
pub fn draw_uniform(s: &Sampling, rng: &mut impl Rng) -> f32 {
    if s.temperature == 0.0 {
        0.0
    } else {
        rng.random::<f32>()
    }
}

/// Draws one token from `logits` under `s`, using `rng` (the CPU specification,
/// `backend/cpu/sample.rs`, fed with [`draw_uniform`]).
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
    let u = draw_uniform(s, rng);
    crate::backend::cpu::sample::sample(logits, s, u)
}

/// What a generation did, for the summary line.
#[derive(Debug, Clone, Default)]
pub struct GenStats {
    pub prompt_tokens: usize,
    pub ids: Vec<u32>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    pub stopped_at_eos: bool,
}

/// Generates up to `max_new` tokens after `prompt`, calling `on_token` for each as it is chosen.
/// Stops early at any id in `eos` (the EOS id is not passed to `on_token`).
pub fn generate<B: Backend>(
    model: &Llama<B>,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenStats> {
    sampling.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidArg(
            "the prompt encodes to zero tokens".into(),
        ));
    }
    let cap = prompt.len() + max_new;
    let max_pos = model.cfg.max_position_embeddings;
    if cap > max_pos {
        return Err(Error::InvalidArg(format!(
            "prompt ({} tokens) + max new tokens ({max_new}) exceed the model's {max_pos} positions",
            prompt.len()
        )));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(sampling.seed);
    let mut cache = model.new_cache(cap)?;
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let vocab = model.cfg.vocab_size;
    let be = &model.backend;
    let mut pick =
        |logits: &B::Buf| be.sample(logits, vocab, sampling, draw_uniform(sampling, &mut rng));
    // Prefill ends when the first token is known: on a device, reading the sampled id is the
    // first wait for the queued work.
    let t0 = Instant::now();
    let logits = model.forward(prompt, &mut cache, Logits::Last)?;
    let mut next = if max_new > 0 { pick(&logits)? } else { 0 };
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for step in 0..max_new {
        if eos.contains(&next) {
            stats.stopped_at_eos = true;
            break;
        }
        stats.ids.push(next);
        on_token(next)?;
        if step + 1 < max_new {
            next = pick(model.decode(next, &mut cache)?)?;
        }
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_filters() {
        let logits = [0.0f32, 3.0, 1.0, 3.0];
        assert_eq!(argmax(&logits), 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let s = Sampling {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 0,
        };
        for _ in 0..20 {
            let t = sample(&logits, &s, &mut rng);
            assert!(t == 1 || t == 3);
        }
        // top-p small enough keeps only the single best token.
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.01,
            seed: 0,
        };
        let logits = [0.0f32, 5.0, 1.0];
        for _ in 0..20 {
            assert_eq!(sample(&logits, &s, &mut rng), 1);
        }
    }

    /// The sampler before it moved behind `Backend::sample` (drawing inside), verbatim.
    fn sample_before(logits: &[f32], s: &Sampling, rng: &mut impl Rng) -> u32 {
        if s.temperature == 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as u32, v / s.temperature))
            .collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if s.top_k > 0 {
            cand.truncate(s.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|&(_, v)| (v - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if s.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc >= s.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = rng.random::<f32>() * total;
        for (i, &p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }

    /// `--seed` keeps its meaning: on logits without ties or NaN, the same seed gives the same
    /// tokens as before the sampler took its uniform from the host (one f32 per sampled token,
    /// none when greedy).
    #[test]
    fn seeded_tokens_are_unchanged() {
        let logits = crate::check::test_values(5, 3000, 6.0);
        for (i, &(temperature, top_k, top_p)) in [
            (1.0, 0, 1.0),
            (0.7, 40, 0.9),
            (1.3, 0, 0.5),
            (0.0, 0, 1.0),
            (0.9, 1, 1.0),
        ]
        .iter()
        .enumerate()
        {
            let s = Sampling {
                temperature,
                top_k,
                top_p,
                seed: i as u64,
            };
            let mut before = rand::rngs::StdRng::seed_from_u64(s.seed);
            let mut now = rand::rngs::StdRng::seed_from_u64(s.seed);
            for _ in 0..200 {
                assert_eq!(
                    sample(&logits, &s, &mut now),
                    sample_before(&logits, &s, &mut before),
                    "{s:?}"
                );
            }
            // Both generators took the same number of draws.
            assert_eq!(now.random::<u64>(), before.random::<u64>());
        }
    }

    #[test]
    fn one_uniform_per_sampled_token_none_when_greedy() {
        let logits = [0.5f32, 1.0, -0.3, 2.0, 0.0];
        let s = Sampling {
            temperature: 0.8,
            top_k: 3,
            top_p: 0.9,
            seed: 0,
        };
        let mut a = rand::rngs::StdRng::seed_from_u64(42);
        let mut b = rand::rngs::StdRng::seed_from_u64(42);
        for _ in 0..50 {
            let u: f32 = b.random();
            assert_eq!(
                sample(&logits, &s, &mut a),
                crate::backend::cpu::sample::sample(&logits, &s, u)
            );
            assert_eq!(sample(&logits, &Sampling::GREEDY, &mut a), 3);
        }
        assert_eq!(a.random::<u64>(), b.random::<u64>());
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let ones = (0..4000)
            .filter(|_| sample(&logits, &s, &mut rng) == 1)
            .count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }
}
