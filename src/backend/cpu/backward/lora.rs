//! LoRA adapter on a frozen projection: forward term and backward.
//!
//! A LoRA-adapted projection computes (PEFT's `Linear.forward`)
//! ```text
//! y = x·Wᵀ + s · (x̃·Aᵀ)·Bᵀ,   x̃ = dropout(x) = x ⊙ keep,   A [r, in], B [out, r], s = α / r
//! ```
//! The base term `x·Wᵀ` is the ordinary (dense or NF4) matmul; [`lora_forward_add`] adds the
//! adapter term to `y` and keeps `xa = x̃·Aᵀ` `[m, r]` for the backward.
//!
//! Derivation, with `g = s · dy·B` `[m, r]` (the gradient reaching `xa`):
//! ```text
//! dB  += s · dyᵀ·xa        [out, r]   (y_io depends on B_oq through s · xa_iq)
//! dA  += gᵀ·x̃              [r, in]    (xa_iq = Σ_p x̃_ip A_qp)
//! dx  += keep ⊙ (g·A)      [m, in]    (x̃ = x ⊙ keep is linear in x)
//! ```
//! The base weight's share of `dx` (`dy·W`) is added separately by [`super::matmul_dx`] or
//! [`crate::quant::nf4_matmul`]. `dA`, `dB` **accumulate** (gradient accumulation over
//! micro-batches); `dx` **accumulates** too, so the base and adapter shares, and the shares of
//! projections that read the same input (q, k, v; gate, up), sum in one buffer.
//!
//! Dropout (PEFT applies `lora_dropout` to the adapter's input only, never to the base path):
//! `keep` is `None` (no dropout, or evaluation) or a `[m, in]` buffer holding `0` for dropped
//! elements and `1/(1 − p)` for kept ones, i.e. the already-scaled mask that PyTorch's inverted
//! dropout multiplies by. The forward multiplies `x` by it before `A`; the backward uses the same
//! mask twice: `x̃ = x ⊙ keep` in `dA`, and `keep ⊙` on the adapter's share of `dx`. The caller
//! must pass the identical mask to both calls (e.g. regenerate it from a saved seed).
//!
//! All products go through the `gemm` crate (rayon-parallel).

use super::{gemm, Float, Mat};

/// Dimensions of one adapted projection: `rows` tokens, `W` `[out_features, in_features]`,
/// adapter rank `rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraShape {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub rank: usize,
}

/// `x̃ = x ⊙ keep` as a fresh buffer, or `x` itself when there is no dropout.
fn dropped<'a, T: Float>(x: &'a [T], keep: Option<&[T]>, n: usize) -> std::borrow::Cow<'a, [T]> {
    match keep {
        None => std::borrow::Cow::Borrowed(&x[..n]),
        Some(keep) => {
            assert!(keep.len() >= n, "lora: dropout mask too small");
            std::borrow::Cow::Owned(x[..n].iter().zip(keep).map(|(&x, &k)| x * k).collect())
        }
    }
}

fn check<T>(sh: LoraShape, x: &[T], a: &[T], b: &[T], xa: &[T], y: &[T]) {
    let LoraShape {
        rows: m,
        in_features: k,
        out_features: n,
        rank: r,
    } = sh;
    assert!(
        x.len() >= m * k
            && a.len() >= r * k
            && b.len() >= n * r
            && xa.len() >= m * r
            && y.len() >= m * n,
        "lora: buffers too small for {sh:?}"
    );
}

/// `xa = (x ⊙ keep)·Aᵀ` (written) and `y += scale · xa·Bᵀ`. `x` `[m, in]`, `y` `[m, out]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_add<T: Float>(
    y: &mut [T],
    xa: &mut [T],
    x: &[T],
    keep: Option<&[T]>,
    a: &[T],
    b: &[T],
    scale: T,
    sh: LoraShape,
) {
    check(sh, x, a, b, xa, y);
    let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
    let xt = dropped(x, keep, m * k);
    gemm(
        &mut xa[..m * r],
        Mat::rm(&xt, m, k),
        Mat::rm(&a[..r * k], r, k).t(),
        false,
        T::ONE,
    );
    gemm(
        &mut y[..m * n],
        Mat::rm(&xa[..m * r], m, r),
        Mat::rm(&b[..n * r], n, r).t(),
        true,
        scale,
    );
}

/// Accumulates `dA`, `dB` and the adapter's share of `dx` (see the module docs). `dy` `[m, out]`
/// is the projection's output gradient; `x`, `keep`, `xa` are what the forward saw and kept.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward<T: Float>(
    dx: &mut [T],
    da: &mut [T],
    db: &mut [T],
    dy: &[T],
    x: &[T],
    keep: Option<&[T]>,
    xa: &[T],
    a: &[T],
    b: &[T],
    scale: T,
    sh: LoraShape,
) {
    check(sh, x, a, b, xa, dy);
    let (m, k, n, r) = (sh.rows, sh.in_features, sh.out_features, sh.rank);
    assert!(
        dx.len() >= m * k && da.len() >= r * k && db.len() >= n * r,
        "lora_backward: gradient buffers too small for {sh:?}"
    );
    let dy = Mat::rm(&dy[..m * n], m, n);
    // dB += s · dyᵀ·xa
    gemm(
        &mut db[..n * r],
        dy.t(),
        Mat::rm(&xa[..m * r], m, r),
        true,
        scale,
    );
    // g = s · dy·B
    let mut g = vec![T::ZERO; m * r];
    gemm(&mut g, dy, Mat::rm(&b[..n * r], n, r), false, scale);
    let g = Mat::rm(&g, m, r);
    // dA += gᵀ·x̃
    let xt = dropped(x, keep, m * k);
    gemm(&mut da[..r * k], g.t(), Mat::rm(&xt, m, k), true, T::ONE);
    // dx += keep ⊙ (g·A)
    let a = Mat::rm(&a[..r * k], r, k);
    match keep {
        None => gemm(&mut dx[..m * k], g, a, true, T::ONE),
        Some(keep) => {
            let mut ga = vec![T::ZERO; m * k];
            gemm(&mut ga, g, a, false, T::ONE);
            for ((dx, &v), &kp) in dx.iter_mut().zip(&ga).zip(keep) {
                *dx += v * kp;
            }
        }
    }
}
