//! CPU backward ops: the readable specification of every gradient a LoRA training step of a Llama
//! decoder needs, one file per op beside its forward in `src/backend/cpu/`.
//!
//! Conventions (llm.c style, shapes passed explicitly):
//! - `d<name>` is the gradient of the scalar loss with respect to buffer `<name>`, same layout.
//! - Gradients of *activations* (op inputs) are **written** unless an op says it accumulates;
//!   each op's doc comment states which. Gradients of *parameters* (LoRA `A`, `B` only — the base
//!   model is frozen, norms included) are **accumulated** with `+=`, so micro-batches sum their
//!   gradients into the same buffers and the optimizer zeroes them after a step.
//! - Every op is generic over [`Float`] (`f32` in production, `f64` in the finite-difference
//!   checks of `tests/gradcheck.rs`), so the gradient check exercises the very code that trains.
//!   Reductions that the forward performs in f32 are performed in `T` here as well.
//!
//! Ops:
//! - [`rmsnorm_backward`] (frozen weight, `dx` only) — `rmsnorm.rs`
//! - [`rope_backward`] (in place: rotation by `−θ`) — `rope.rs`
//! - [`attention_backward`] (causal GQA, softmax recomputed, no saved probabilities) — `attention.rs`
//! - [`swiglu_backward`] — `swiglu.rs`
//! - [`cross_entropy_backward`], [`cross_entropy_fused`] (loss + gradient, in place) — `cross_entropy.rs`
//! - [`lora_forward_add`], [`lora_backward`] (adapter `y += s·dropout(x)·Aᵀ·Bᵀ`) — `lora.rs`
//! - [`matmul_dx`] (`dx = dy · W` for a frozen dense base weight; NF4 weights use
//!   [`crate::quant::nf4_matmul`]) — `linear.rs`
//!
//! The embedding table is frozen and the input ids carry no gradient, so there is no embedding
//! backward: the chain stops at the first layer's input.

mod attention;
mod cross_entropy;
mod linear;
mod lora;
mod rmsnorm;
mod rope;
mod swiglu;

pub use attention::attention_backward;
pub use cross_entropy::{cross_entropy_backward, cross_entropy_fused, mean_scale};
pub use linear::matmul_dx;
pub use lora::{lora_backward, lora_forward_add, LoraShape};
pub use rmsnorm::rmsnorm_backward;
pub use rope::rope_backward;
pub use swiglu::swiglu_backward;

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// The scalar types the backward ops run in: `f32` (training) and `f64` (gradient checks).
pub trait Float:
    Copy
    + Debug
    + Default
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// Rounds an `f64` to `Self`.
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn sin_cos(self) -> (Self, Self);
    fn max(self, other: Self) -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn sin_cos(self) -> (Self, Self) {
                <$t>::sin_cos(self)
            }
            #[inline]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
impl_float!(f32);
impl_float!(f64);

/// A read-only strided matrix view: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major `[rows, cols]`.
    fn rm(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view (no copy).
    fn t(self) -> Self {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst[m, n] = beta · lhs · rhs` (`accumulate = false`) or `dst += beta · lhs · rhs`
/// (`accumulate = true`), `dst` row-major `[m, n]`; rayon-parallel through the `gemm` crate.
fn gemm<T: Float>(dst: &mut [T], lhs: Mat<T>, rhs: Mat<T>, accumulate: bool, beta: T) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "gemm: inner dimensions differ");
    assert!(
        dst.len() >= m * n && lhs.fits() && rhs.fits(),
        "gemm: buffers too small for [{m}, {k}] · [{k}, {n}]"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(T::ZERO);
        }
        return;
    }
    // SAFETY: `fits` and the assert above keep every index the strides describe inside its
    // slice: dst (i, j) -> i*n + j < m*n; lhs/rhs checked by `Mat::fits`. `dst` is exclusively
    // borrowed, so it cannot alias the inputs. T is f32 or f64, both supported by `gemm`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::ONE,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_gemm_matches_naive() {
        // dst[2,3] (+)= beta · Aᵀ · B with A [4,2], B [4,3].
        let a: Vec<f64> = (0..8).map(|i| i as f64 * 0.5 - 1.0).collect();
        let b: Vec<f64> = (0..12).map(|i| (i % 5) as f64 - 2.0).collect();
        let naive = |i: usize, j: usize| (0..4).map(|p| a[p * 2 + i] * b[p * 3 + j]).sum::<f64>();
        let mut d = vec![1.0f64; 6];
        gemm(&mut d, Mat::rm(&a, 4, 2).t(), Mat::rm(&b, 4, 3), true, 2.0);
        for i in 0..2 {
            for j in 0..3 {
                assert!((d[i * 3 + j] - (1.0 + 2.0 * naive(i, j))).abs() < 1e-12);
            }
        }
        gemm(&mut d, Mat::rm(&a, 4, 2).t(), Mat::rm(&b, 4, 3), false, 1.0);
        assert!((d[5] - naive(1, 2)).abs() < 1e-12);
    }
}
