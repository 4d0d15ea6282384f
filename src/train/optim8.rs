//! AdamW with 8-bit blockwise states (`--optim paged_adamw_8bit`): bitsandbytes' 8-bit
//! optimizer, the CPU specification of `kernels/adamw8.cu`.
//!
//! # Format (bitsandbytes' `Optimizer2State` with `optim_bits=8`)
//! A tensor of `n ≥` [`MIN_8BIT_SIZE`] values keeps its moments as one byte each ([`Quant8`]):
//! `m` as codes of the **signed** dynamic map ([`signed_map`], bnb's
//! `create_dynamic_map(signed=True)`, the map NF4 double quantization uses), `v` as codes of the
//! **unsigned** one ([`unsigned_map`], `signed=False`), each with one f32 absmax per block of
//! [`BLOCK`] = 256 consecutive values; the value of code `c` in block `b` is `map[c]·absmax[b]`.
//! Fresh states are all-zero codes and absmax (bnb's `torch.zeros` buffers). Smaller tensors keep
//! f32 moments as bnb does (`min_8bit_size = 4096`, the default transformers uses) and are updated
//! by bnb's 32-bit kernel rule ([`update_f32`]).
//!
//! # One step of one 8-bit tensor ([`update_q8`]), bnb's `kOptimizerStatic8bit2StateBlockwise`
//! (`csrc/kernels.cu`, ADAM case, the kernel `bnb.optim.PagedAdamW8bit` runs on CUDA), per block
//! of 256, f32:
//! ```text
//! for every position j of the block (positions past the tensor's end are padded with
//!                                    g = 0, m-code 128, v-code 0, exactly as bnb's block loads):
//!     if g finite:  v = (map₂[cv]·absmax₂)·β2 + ((1−β2)·g)·g
//!                   m = (map₁[cm]·absmax₁)·β1 + (1−β1)·g
//!     else:         m = v = 0
//! absmax₁ = max_j |m|,  absmax₂ = max_j |v|           (padded positions included)
//! for every real position:
//!     if g finite:  p = p + step_size·(m / (√v + ε̂));   if wd > 0: p = p·(1 − lr·wd)
//!     cm = quantize(map₁, m / absmax₁), then bnb's sign fix: if the code's sign differs from
//!          m's, cm ± 1 (+1 when m > 0, else −1, wrapping as u8)
//!     cv = quantize(map₂, v / absmax₂)
//! step_size = −lr·c₂/c₁,  ε̂ = c₂·ε,  c₁ = 1 − β1ᵗ,  c₂ = √(1 − β2ᵗ)
//! ```
//! `quantize` ([`quantize_2d`]) is bnb's `quantize_2D`: a 7-step binary search of the sorted map
//! from index 127, then the nearer of the two bracketing codes by comparison with their midpoint
//! `(a + b)·0.5` (ties go to the inner code); deterministic ("nearest"), never stochastic. A
//! block whose moments are all zero divides 0/0: the NaN searches down to code 0, so an
//! all-zero `m` block stores code 255 (+0's sign differs from `map₁[0] < 0`) and `v` code 0;
//! with absmax 0 both still decode to 0 (bnb does exactly this).
//!
//! # Where this differs from bitsandbytes and from torch
//! - **Versus torch's AdamW** (the 32-bit path, [`crate::train::AdamW::update`]): bnb applies
//!   the decoupled weight decay **after** the update (`p ← (p + Δ)·(1 − lr·wd)`, torch decays
//!   first), and folds the bias corrections into `step_size = −lr·c₂/c₁` and `ε̂ = c₂·ε`
//!   (algebraically torch's `−lr/c₁ · m/(√v/c₂ + ε)`, rounded differently). The moments are the
//!   same quantities, so a state converts between the two (see [`for_kind`]).
//! - **Versus bnb's CUDA kernel**: bnb is compiled with `--use_fast_math` (`__powf`,
//!   `__fdividef`, approximate `sqrtf`, flush-to-zero, FMA contraction). Here every f32
//!   operation is one IEEE round-to-nearest-even operation in the order written above, no
//!   operation is fused, subnormals are kept, and the scalars are computed as bnb computes them
//!   from the f32 hyper-parameters it receives but with correctly rounded pow/sqrt/division
//!   ([`Scalars8::new`]). Results agree with bnb's to a few f32 ulps per operation; a code can
//!   differ by one where `m/absmax` lies within those ulps of a midpoint. `absmax` is the
//!   maximum of the bit patterns of `|x|` (equal to bnb's `fmaxf` for every non-NaN value).
//! - **Versus bnb's CPU backend** (`backends/cpu/ops.py`, a torch re-implementation): it decays
//!   before the update, uses torch's `ε` placement, quantizes through a 65536-entry table
//!   without the sign fix, and has no non-finite guard; `scripts/fixtures_adam8.py` measures
//!   how far it lands from this rule (`tests/fixtures/optim8/`).
//! - Gradient clipping is not bnb's (`gnorm_scale`, percentile clipping) but the trainer's, as
//!   for the 32-bit path: `torch.nn.utils.clip_grad_norm_` scales the gradients before the step
//!   (`CpuBackend::adamw_step`), so bnb's `gnorm_scale` is 1.
//!
//! Memory: [`state_bytes_per_param`]: 2 bytes of codes + 8 bytes of absmax per 256 values =
//! 2.03125 bytes per parameter (32-bit states: 8).

use super::optim::{AdamParamState, AdamW, OptimKind};
use crate::quant::double_quant::dynamic_code;
use std::sync::OnceLock;

/// Values per quantization block (bnb's `BLOCKSIZE_2STATE`).
pub const BLOCK: usize = 256;
/// Tensors with fewer values keep f32 moments (bnb's `min_8bit_size` default).
pub const MIN_8BIT_SIZE: usize = 4096;
/// The m-code of a padded position (bnb loads the last partial block's state1 with 128).
const PAD_M_CODE: u8 = 128;

/// Whether a tensor of `n` values keeps 8-bit moments under `paged_adamw_8bit`.
pub fn uses_q8(n: usize) -> bool {
    n >= MIN_8BIT_SIZE
}

/// Quantization blocks of a tensor of `n` values.
pub fn blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

/// Host/device bytes of the 8-bit states of a tensor of `n` values (f32 moments below
/// [`MIN_8BIT_SIZE`]): `2n` code bytes + `8·⌈n/256⌉` absmax bytes, or `8n`.
pub fn state_nbytes(n: usize) -> usize {
    if uses_q8(n) {
        2 * n + 8 * blocks(n)
    } else {
        8 * n
    }
}

/// Bytes per parameter of the 8-bit states of a large tensor: 2 + 8/256 = 2.03125.
pub fn state_bytes_per_param() -> f64 {
    2.0 + 8.0 / BLOCK as f64
}

/// bnb's `create_dynamic_map(signed=True)`: the m map (sorted; `[127] = 0`, `[255] = 1`).
pub fn signed_map() -> &'static [f32; 256] {
    dynamic_code()
}

/// bnb's `create_dynamic_map(signed=False)`: the v map (sorted; `[0] = 0`, `[255] = 1`).
///
/// For exponent `i` in 0..7: the `2^(i+1)` pairwise f32 means of `torch.linspace(0.1, 1,
/// 2^(i+1) + 1)` times `10^(i−6)` (the Python double rounded to f32 by torch's scalar multiply);
/// plus 0 and 1; sorted (the signed map's construction with twice the fraction items and no
/// negatives).
pub fn unsigned_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| {
        const POW10: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
        let mut data: Vec<f32> = Vec::with_capacity(256);
        for (i, &p) in POW10.iter().enumerate() {
            let b = torch_linspace(0.1, 1.0, (2usize << i) + 1);
            let scale = p as f32;
            for w in b.windows(2) {
                data.push(scale * ((w[0] + w[1]) / 2.0));
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(f32::total_cmp);
        let mut out = [0f32; 256];
        out.copy_from_slice(&data);
        out
    })
}

/// torch's CPU `linspace` for f32 (as `double_quant`'s, which builds the signed map): `step =
/// (end − start)/(steps − 1)`, the first half `fma(step, i, start)`, the second counted back
/// from `end`.
fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// bnb's `quantize_2D<SIGNED>` (non-stochastic): the code of `map` nearest to `x` (`x` is a
/// moment divided by its block's absmax, so in [−1, 1] or NaN). Comparisons are IEEE (a NaN
/// `x` compares false everywhere and ends at code 0).
pub fn quantize_2d(map: &[f32; 256], signed: bool, x: f32) -> u8 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    let mut lower = if signed { -1.0f32 } else { 0.0 };
    let mut upper = 1.0f32;
    let mut val = map[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = map[pivot];
        i >>= 1;
    }
    let code = if x > val {
        if x > (upper + val) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + val) * 0.5 {
        lower_pivot
    } else {
        pivot
    };
    code as u8
}

/// The m code of `m` (scaled: `x = m / absmax`): [`quantize_2d`] on the signed map, then bnb's
/// sign fix (a code whose sign bit differs from `m`'s moves one step towards `m`'s side,
/// wrapping as u8 as bnb's `unsigned char` does).
pub fn quantize_m(x: f32, m: f32) -> u8 {
    let map = signed_map();
    let c = quantize_2d(map, true, x);
    if map[c as usize].is_sign_negative() != m.is_sign_negative() {
        if m > 0.0 {
            c.wrapping_add(1)
        } else {
            c.wrapping_sub(1)
        }
    } else {
        c
    }
}

/// The v code of a scaled `v / absmax`.
pub fn quantize_v(x: f32) -> u8 {
    quantize_2d(unsigned_map(), false, x)
}

/// The bits of the largest `|x|` (0 for none): bnb's block absmax (`fmaxf` from `−FLT_MAX`),
/// compared as bit patterns so the device gets the same answer under flush-to-zero.
#[inline]
fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// 8-bit blockwise moments of one tensor (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Quant8 {
    /// `exp_avg` codes (signed map), one per value.
    pub m_codes: Vec<u8>,
    /// `exp_avg` absmax, one per block of 256.
    pub m_absmax: Vec<f32>,
    /// `exp_avg_sq` codes (unsigned map).
    pub v_codes: Vec<u8>,
    pub v_absmax: Vec<f32>,
}

impl Quant8 {
    /// Fresh states of `n` values: zero codes and zero absmax (bnb's init).
    pub fn zeros(n: usize) -> Self {
        Quant8 {
            m_codes: vec![0; n],
            m_absmax: vec![0.0; blocks(n)],
            v_codes: vec![0; n],
            v_absmax: vec![0.0; blocks(n)],
        }
    }

    pub fn len(&self) -> usize {
        self.m_codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.m_codes.is_empty()
    }

    /// Whether the four vectors have consistent lengths.
    pub fn is_consistent(&self) -> bool {
        let n = self.m_codes.len();
        self.v_codes.len() == n
            && self.m_absmax.len() == blocks(n)
            && self.v_absmax.len() == blocks(n)
    }

    /// Quantizes f32 moments blockwise as a step requantizes them (absmax = max |x| over the
    /// block's values, codes by [`quantize_m`] / [`quantize_v`]): a 32-bit state converted.
    pub fn from_f32(m: &[f32], v: &[f32]) -> Self {
        assert_eq!(m.len(), v.len(), "Quant8: m and v lengths differ");
        let quant = |x: &[f32], f: &dyn Fn(f32, f32) -> u8| -> (Vec<u8>, Vec<f32>) {
            let mut codes = Vec::with_capacity(x.len());
            let mut absmax = Vec::with_capacity(blocks(x.len()));
            for blk in x.chunks(BLOCK) {
                let a = f32::from_bits(blk.iter().map(|&y| abs_bits(y)).max().unwrap_or(0));
                absmax.push(a);
                codes.extend(blk.iter().map(|&y| f(y / a, y)));
            }
            (codes, absmax)
        };
        let (m_codes, m_absmax) = quant(m, &quantize_m);
        let (v_codes, v_absmax) = quant(v, &|x, _| quantize_v(x));
        Quant8 {
            m_codes,
            m_absmax,
            v_codes,
            v_absmax,
        }
    }

    /// The f32 moments the codes stand for, `(m, v)`: `map[c]·absmax` (exact as a step reads
    /// them).
    pub fn to_f32(&self) -> (Vec<f32>, Vec<f32>) {
        let deq = |codes: &[u8], absmax: &[f32], map: &[f32; 256]| -> Vec<f32> {
            codes
                .iter()
                .enumerate()
                .map(|(i, &c)| map[c as usize] * absmax[i / BLOCK])
                .collect()
        };
        (
            deq(&self.m_codes, &self.m_absmax, signed_map()),
            deq(&self.v_codes, &self.v_absmax, unsigned_map()),
        )
    }

    /// Host bytes of these states.
    pub fn nbytes(&self) -> usize {
        self.m_codes.len() + self.v_codes.len() + 4 * (self.m_absmax.len() + self.v_absmax.len())
    }
}

/// The step-independent f32 constants of an 8-bit step at learning rate `lr`, as bnb's kernels
/// receive and derive them: `β1`, `β2`, `lr`, `wd` passed as f32 (`c_float`), `1 − β` and
/// `1 − lr·wd` computed in f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Consts8 {
    pub beta1: f32,
    /// `1 − β1` (f32).
    pub w1: f32,
    pub beta2: f32,
    /// `1 − β2` (f32).
    pub w2: f32,
    /// `1 − lr·wd` (f32, two roundings).
    pub decay: f32,
    /// `wd > 0` (bnb's `if (weight_decay > 0.0f)`).
    pub use_decay: bool,
}

impl Consts8 {
    pub fn new(hyper: &AdamW, lr: f64) -> Self {
        let (beta1, beta2) = (hyper.beta1 as f32, hyper.beta2 as f32);
        let (lr, wd) = (lr as f32, hyper.weight_decay as f32);
        Consts8 {
            beta1,
            w1: 1.0 - beta1,
            beta2,
            w2: 1.0 - beta2,
            decay: 1.0 - lr * wd,
            use_decay: wd > 0.0,
        }
    }
}

/// The per-tensor scalars of update number `k` (the tensor's step count after it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scalars8 {
    /// `−lr·c₂/c₁` (f32: `(−lr·c₂)/c₁`, two roundings, as bnb's `__fdividef(-lr * correction2,
    /// correction1)`).
    pub step_size: f32,
    /// `c₂·ε` (f32 product, bnb's `correction2 * eps`).
    pub eps_hat: f32,
}

impl Scalars8 {
    /// `c₁ = 1 − β1ᵏ` and `c₂ = √(1 − β2ᵏ)` from the f32 betas, computed in f64 (pow of the C
    /// library, as Python's `**`) and rounded once to f32; bnb computes them in f32 with
    /// `__powf` and `sqrtf`.
    pub fn new(hyper: &AdamW, lr: f64, k: u64) -> Self {
        let t = k as f64;
        let c1 = (1.0 - (hyper.beta1 as f32 as f64).powf(t)) as f32;
        let c2 = (1.0 - (hyper.beta2 as f32 as f64).powf(t)).sqrt() as f32;
        let lr = lr as f32;
        Scalars8 {
            step_size: (-lr * c2) / c1,
            eps_hat: c2 * hyper.eps as f32,
        }
    }
}

/// One step of an 8-bit tensor with (already clipped) gradients `g` (see the module docs;
/// bnb's `kOptimizerStatic8bit2StateBlockwise`, ADAM). Panics on mismatched lengths.
pub fn update_q8(c: &Consts8, s: Scalars8, p: &mut [f32], g: &[f32], q: &mut Quant8) {
    let n = p.len();
    assert!(
        g.len() == n && q.len() == n && q.is_consistent(),
        "8-bit AdamW: param, grad and state lengths differ"
    );
    let (map1, map2) = (signed_map(), unsigned_map());
    let mut m = [0f32; BLOCK];
    let mut v = [0f32; BLOCK];
    for b in 0..blocks(n) {
        let lo = b * BLOCK;
        let hi = (lo + BLOCK).min(n);
        let (a1, a2) = (q.m_absmax[b], q.v_absmax[b]);
        let (mut max1, mut max2) = (0u32, 0u32);
        for j in 0..BLOCK {
            let i = lo + j;
            let (gi, cm, cv) = if i < hi {
                (g[i], q.m_codes[i], q.v_codes[i])
            } else {
                (0.0, PAD_M_CODE, 0)
            };
            if gi.is_finite() {
                v[j] = (map2[cv as usize] * a2) * c.beta2 + (c.w2 * gi) * gi;
                m[j] = (map1[cm as usize] * a1) * c.beta1 + c.w1 * gi;
            } else {
                m[j] = 0.0;
                v[j] = 0.0;
            }
            max1 = max1.max(abs_bits(m[j]));
            max2 = max2.max(abs_bits(v[j]));
        }
        let (n1, n2) = (f32::from_bits(max1), f32::from_bits(max2));
        q.m_absmax[b] = n1;
        q.v_absmax[b] = n2;
        for i in lo..hi {
            let j = i - lo;
            if g[i].is_finite() {
                let mut pi = p[i] + s.step_size * (m[j] / (v[j].sqrt() + s.eps_hat));
                if c.use_decay {
                    pi *= c.decay;
                }
                p[i] = pi;
            }
            q.m_codes[i] = quantize_m(m[j] / n1, m[j]);
            q.v_codes[i] = quantize_v(v[j] / n2);
        }
    }
}

/// One step of a tensor below [`MIN_8BIT_SIZE`] (f32 moments), bnb's `kOptimizer32bit2State`
/// (ADAM, no update-norm limit, `skip_zeros` off):
/// `m = m·β1 + (1−β1)·g`, `v = v·β2 + (1−β2)·(g·g)`, `p = p + step_size·(m / (√v + ε̂))`, then the
/// decay. Note `(1−β2)·(g·g)` where the 8-bit kernel rounds `((1−β2)·g)·g`.
pub fn update_f32(
    c: &Consts8,
    s: Scalars8,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    assert!(
        g.len() == p.len() && m.len() == p.len() && v.len() == p.len(),
        "8-bit AdamW: param, grad and state lengths differ"
    );
    for i in 0..p.len() {
        let gi = g[i];
        m[i] = m[i] * c.beta1 + c.w1 * gi;
        v[i] = v[i] * c.beta2 + c.w2 * (gi * gi);
        let mut pi = p[i] + s.step_size * (m[i] / (v[i].sqrt() + s.eps_hat));
        if c.use_decay {
            pi *= c.decay;
        }
        p[i] = pi;
    }
}

/// One `paged_adamw_8bit` step of one tensor at learning rate `lr` with (already clipped)
/// gradients: [`update_q8`] when the state is 8-bit, else [`update_f32`]; the step count
/// advances. The state must be in this optimizer's form ([`for_kind`]).
pub fn step(hyper: &AdamW, lr: f64, p: &mut [f32], g: &[f32], st: &mut AdamParamState) {
    st.step += 1;
    let c = Consts8::new(hyper, lr);
    let s = Scalars8::new(hyper, lr, st.step);
    match &mut st.q8 {
        Some(q) => update_q8(&c, s, p, g, q),
        None => update_f32(&c, s, p, g, &mut st.m, &mut st.v),
    }
}

/// The state in the form optimizer `kind` keeps it (same step count): under
/// `paged_adamw_8bit`, 8-bit for tensors of at least [`MIN_8BIT_SIZE`] values (an f32 state
/// quantized by [`Quant8::from_f32`]) and f32 below; under the 32-bit optimizers f32 (8-bit
/// states dequantized, exactly). So a checkpoint of either optimizer resumes under the other:
/// the moments are the same quantities, only stored differently.
pub fn for_kind(st: AdamParamState, kind: OptimKind) -> AdamParamState {
    let want_q8 = kind == OptimKind::PagedAdamW8bit && uses_q8(st.len());
    match (st.q8, want_q8) {
        (Some(q), true) => AdamParamState {
            step: st.step,
            m: Vec::new(),
            v: Vec::new(),
            q8: Some(q),
        },
        (Some(q), false) => {
            let (m, v) = q.to_f32();
            AdamParamState {
                step: st.step,
                m,
                v,
                q8: None,
            }
        }
        (None, true) => AdamParamState {
            step: st.step,
            q8: Some(Quant8::from_f32(&st.m, &st.v)),
            m: Vec::new(),
            v: Vec::new(),
        },
        (None, false) => AdamParamState { q8: None, ..st },
    }
}

/// Fresh state of a tensor of `n` values under `kind`.
pub fn fresh(n: usize, kind: OptimKind) -> AdamParamState {
    for_kind(AdamParamState::new(n), kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::test_values;

    #[test]
    fn maps_are_sorted_and_bracketed() {
        let (s, u) = (signed_map(), unsigned_map());
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(u.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((s[127], s[255]), (0.0, 1.0));
        assert_eq!((u[0], u[255]), (0.0, 1.0));
        assert!(s[..127].iter().all(|&x| x < 0.0) && s[128..].iter().all(|&x| x > 0.0));
        // Smallest magnitudes: 1e-6 · mean(0.1, 1) for the signed map, 1e-6 · mean(0.1, 0.55)
        // for the unsigned one.
        assert!((s[128] - 5.5e-7).abs() < 1e-12, "{}", s[128]);
        assert!((u[1] - 3.25e-7).abs() < 1e-12, "{}", u[1]);
    }

    /// The binary search with midpoints is the nearest code (ties aside), for every code, every
    /// midpoint and its neighbours, and random points.
    #[test]
    fn quantize_is_nearest_code() {
        for (map, signed) in [(signed_map(), true), (unsigned_map(), false)] {
            let nearest = |x: f32| -> f32 {
                map.iter()
                    .map(|&c| (c - x).abs())
                    .fold(f32::INFINITY, f32::min)
            };
            let mut xs: Vec<f32> = map.to_vec();
            for w in map.windows(2) {
                let mid = (w[0] + w[1]) * 0.5;
                xs.extend([
                    mid,
                    f32::from_bits(mid.to_bits() + 1),
                    f32::from_bits(mid.to_bits() - 1),
                ]);
            }
            xs.extend(test_values(7, 5000, 1.0));
            xs.extend(test_values(8, 2000, 1e-5));
            for x in xs {
                let x = if signed { x } else { x.abs() };
                let c = quantize_2d(map, signed, x);
                let got = (map[c as usize] - x).abs();
                // A midpoint is a tie: either neighbour is nearest, to the f32 rounding of the
                // midpoint and of the distances (a couple of ulps of x).
                let slack = 2.0 * f32::EPSILON * x.abs();
                assert!(
                    got <= nearest(x) + slack,
                    "x {x:e}: code {c} ({}) at {got:e}, nearest at {:e}",
                    map[c as usize],
                    nearest(x)
                );
            }
            for (i, &c) in map.iter().enumerate() {
                assert_eq!(
                    quantize_2d(map, signed, c) as usize,
                    i,
                    "code {i} maps to itself"
                );
            }
        }
    }

    #[test]
    fn sign_fix_and_zero_blocks() {
        let s = signed_map();
        // A tiny negative m rounds to the code 0.0 and is moved to the smallest negative code.
        assert_eq!(quantize_m(-1e-9, -1e-9), 126);
        assert!(s[126] < 0.0);
        // A tiny positive one keeps code 127 (+0.0 has a positive sign).
        assert_eq!(quantize_m(1e-9, 1e-9), 127);
        // All-zero block: 0/0 = NaN searches down to code 0; +0 then moves to 255 (wrapping),
        // −0 stays at 0; v's NaN gives code 0. Both decode to 0 with absmax 0.
        assert_eq!(quantize_2d(s, true, f32::NAN), 0);
        assert_eq!(quantize_m(f32::NAN, 0.0), 255);
        assert_eq!(quantize_m(f32::NAN, -0.0), 0);
        assert_eq!(quantize_v(f32::NAN), 0);
        // −0 (not NaN: a nonzero absmax) lands on +0.0 and moves to 126, as bnb.
        assert_eq!(quantize_m(-0.0, -0.0), 126);
    }

    /// A zero-gradient first step (LoRA's A matrices: B starts at zero) keeps everything zero.
    #[test]
    fn zero_gradient_step_keeps_zero_states() {
        let h = AdamW {
            lr: 1e-3,
            ..AdamW::default()
        };
        let n = 4096 + 77;
        let mut st = fresh(n, OptimKind::PagedAdamW8bit);
        let mut p = test_values(1, n, 1.0);
        let p0 = p.clone();
        step(&h, h.lr, &mut p, &vec![0.0; n], &mut st);
        let q = st.q8.as_ref().unwrap();
        assert!(q.m_absmax.iter().chain(&q.v_absmax).all(|&a| a == 0.0));
        assert!(q.m_codes.iter().all(|&c| c == 255) && q.v_codes.iter().all(|&c| c == 0));
        let (m, v) = q.to_f32();
        assert!(m.iter().chain(&v).all(|&x| x == 0.0));
        // p only decays: (p + step·0/(0 + ε̂))·(1 − lr·wd).
        let decay = Consts8::new(&h, h.lr).decay;
        for (a, b) in p.iter().zip(&p0) {
            assert_eq!(*a, b * decay);
        }
    }

    /// Without quantization error (a block where every moment is exactly representable) the
    /// 8-bit rule is the 32-bit bnb rule up to its `(1−β2)·g·g` association; in general it
    /// tracks an f64 Adam (bnb's formula) within the 8-bit resolution.
    #[test]
    fn tracks_f64_adam_within_quantization_error() {
        let h = AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let n = 3 * BLOCK + 17;
        let mut st = fresh(n, OptimKind::PagedAdamW8bit);
        assert!(st.q8.is_none(), "below min_8bit_size: f32 states");
        st = AdamParamState {
            q8: Some(Quant8::zeros(n)),
            m: Vec::new(),
            v: Vec::new(),
            step: 0,
        };
        let mut p = test_values(2, n, 1.0);
        let mut pr: Vec<f64> = p.iter().map(|&x| x as f64).collect();
        let (mut mr, mut vr) = (vec![0f64; n], vec![0f64; n]);
        for k in 1..=20u64 {
            let g = test_values(100 + k, n, 0.01);
            step(&h, h.lr, &mut p, &g, &mut st);
            let (b1, b2) = (h.beta1, h.beta2);
            let (c1, c2) = (1.0 - b1.powi(k as i32), (1.0 - b2.powi(k as i32)).sqrt());
            for i in 0..n {
                let gi = g[i] as f64;
                mr[i] = mr[i] * b1 + (1.0 - b1) * gi;
                vr[i] = vr[i] * b2 + (1.0 - b2) * gi * gi;
                pr[i] += -h.lr * c2 / c1 * mr[i] / (vr[i].sqrt() + h.eps * c2);
                pr[i] *= 1.0 - h.lr * h.weight_decay;
            }
        }
        let (m, v) = st.q8.as_ref().unwrap().to_f32();
        let rel = |a: &[f32], b: &[f64]| {
            let scale = b.iter().fold(0f64, |x, y| x.max(y.abs()));
            a.iter()
                .zip(b)
                .fold(0f64, |x, (&y, &z)| x.max((y as f64 - z).abs()))
                / scale
        };
        // The dynamic map's resolution near the block maximum is ~1/70 (signed: 64 steps over
        // [0.1, 1]) and ~1/140 (unsigned: 128 steps); each step's rounding (≤ half a step) decays
        // by β1 per step in m (worst case ~10 half-steps ≈ 7%), by β2 in v (20 steps ≈ 7%).
        // Measured: m 3.8%, v 1.7% of the largest value; p 0.27·lr over the 20 steps.
        assert!(rel(&m, &mr) < 0.05, "m {}", rel(&m, &mr));
        assert!(rel(&v, &vr) < 0.05, "v {}", rel(&v, &vr));
        // p moves by ≤ lr per step; its error stays a small fraction of the 20 updates.
        let dp = p
            .iter()
            .zip(&pr)
            .fold(0f64, |x, (&a, &b)| x.max((a as f64 - b).abs()));
        assert!(dp < 20.0 * h.lr * 0.05, "p {dp}");
    }

    #[test]
    fn partial_block_padding_enters_absmax() {
        // The last block holds 5 values whose m codes are all 127 (0.0) under absmax 1. With a
        // zero gradient the real m are 0, but the 251 padded positions read m-code 128
        // (map[128] = 5.5e-7) and give m = map[128]·1·β1: bnb's block absmax includes them.
        let h = AdamW {
            lr: 1e-3,
            weight_decay: 0.0,
            ..AdamW::default()
        };
        let n = MIN_8BIT_SIZE + 5;
        let last = blocks(n) - 1;
        let mut q = Quant8::zeros(n);
        q.m_codes[MIN_8BIT_SIZE..].fill(127);
        q.m_absmax[last] = 1.0;
        let mut st = AdamParamState {
            step: 3,
            m: Vec::new(),
            v: Vec::new(),
            q8: Some(q),
        };
        let mut p = vec![0.5f32; n];
        step(&h, h.lr, &mut p, &vec![0.0; n], &mut st);
        let q = st.q8.as_ref().unwrap();
        let pad_m = (signed_map()[128] * 1.0) * 0.9f32;
        assert_eq!(q.m_absmax[last], pad_m);
        // The real values (0 / pad_m = 0) keep code 127; a full block of zeros has absmax 0.
        assert!(q.m_codes[MIN_8BIT_SIZE..].iter().all(|&c| c == 127));
        assert_eq!(q.m_absmax[0], 0.0);
    }

    #[test]
    fn conversions_between_kinds() {
        let n = MIN_8BIT_SIZE + 300;
        let mut st = AdamParamState::new(n);
        st.step = 9;
        st.m = test_values(3, n, 0.02);
        st.v = test_values(4, n, 0.01).iter().map(|x| x * x).collect();
        let q = for_kind(st.clone(), OptimKind::PagedAdamW8bit);
        assert_eq!(q.step, 9);
        assert!(q.m.is_empty() && q.q8.is_some());
        assert_eq!(q.len(), n);
        // 8 → 32 is exact (the decoded values). 32 → 8 of those is not always the same codes:
        // a block whose largest |m| is negative decodes it to map[0]·absmax = −0.993·absmax (the
        // signed map has no −1), which becomes the new absmax; the values stay within the map's
        // resolution.
        let back = for_kind(q.clone(), OptimKind::PagedAdamW32bit);
        assert!(back.q8.is_none() && back.m.len() == n);
        assert_eq!(
            (back.m.clone(), back.v.clone()),
            q.q8.as_ref().unwrap().to_f32()
        );
        let again = for_kind(back.clone(), OptimKind::PagedAdamW8bit);
        let (m2, v2) = again.q8.as_ref().unwrap().to_f32();
        let far = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(0f32, |x, y| x.max(y.abs()));
            a.iter().zip(b).fold(0f32, |x, (p, q)| x.max((p - q).abs())) / scale
        };
        assert!(far(&m2, &back.m) < 0.02, "m {}", far(&m2, &back.m));
        assert!(far(&v2, &back.v) < 0.02, "v {}", far(&v2, &back.v));
        // Small tensors stay f32 under 8 bit.
        let small = for_kind(AdamParamState::new(100), OptimKind::PagedAdamW8bit);
        assert!(small.q8.is_none() && small.m.len() == 100);
        // The decoded moments are within the map's resolution.
        let (m, _) = q.q8.as_ref().unwrap().to_f32();
        for (a, b) in m.iter().zip(&st.m) {
            assert!((a - b).abs() <= 0.02 * 0.02 + 1e-9, "{a} vs {b}");
        }
        assert_eq!(state_nbytes(n), q.q8.as_ref().unwrap().nbytes());
        assert_eq!(state_bytes_per_param(), 2.03125);
    }

    #[test]
    fn non_finite_gradient_zeroes_the_moments_and_keeps_p() {
        let h = AdamW::default();
        let n = MIN_8BIT_SIZE;
        let mut st = fresh(n, OptimKind::PagedAdamW8bit);
        let mut p = test_values(5, n, 1.0);
        step(&h, h.lr, &mut p, &test_values(6, n, 0.1), &mut st);
        let mut g = test_values(7, n, 0.1);
        g[3] = f32::NAN;
        g[300] = f32::INFINITY;
        let before = p.clone();
        step(&h, h.lr, &mut p, &g, &mut st);
        assert_eq!(p[3], before[3]);
        assert_eq!(p[300], before[300]);
        let (m, v) = st.q8.as_ref().unwrap().to_f32();
        // Zeroed moments requantize to the code nearest 0 (sign fix: +0 keeps 127).
        assert_eq!((m[3], v[3]), (0.0, 0.0));
        assert_eq!((m[300], v[300]), (0.0, 0.0));
        assert!(p.iter().all(|x| x.is_finite()));
    }
}
