//! SwiGLU backward.
//!
//! Forward, elementwise: `h = silu(g) · u`, `silu(g) = g · σ(g)`, `σ(g) = 1 / (1 + e^{−g})`.
//!
//! Derivation: `σ' = σ(1 − σ)`, so `silu'(g) = σ + g σ (1 − σ) = σ · (1 + g (1 − σ))`, and
//! ```text
//! dg = dh · u · σ(g) · (1 + g (1 − σ(g)))
//! du = dh · silu(g)
//! ```
//! Shapes: all buffers hold `len = dh.len()` values (`[rows, intermediate]`). `dgate` and `dup`
//! are **written**.

use super::Float;
use rayon::prelude::*;

const CHUNK: usize = 4096;

pub fn swiglu_backward<T: Float>(dgate: &mut [T], dup: &mut [T], dh: &[T], gate: &[T], up: &[T]) {
    let n = dh.len();
    assert!(
        dgate.len() >= n && dup.len() >= n && gate.len() >= n && up.len() >= n,
        "swiglu_backward: buffers too small for {n} values"
    );
    dgate[..n]
        .par_chunks_mut(CHUNK)
        .zip(dup[..n].par_chunks_mut(CHUNK))
        .zip(dh.par_chunks(CHUNK))
        .zip(gate[..n].par_chunks(CHUNK).zip(up[..n].par_chunks(CHUNK)))
        .for_each(|(((dg, du), dh), (g, u))| {
            for ((((dg, du), &dh), &g), &u) in dg.iter_mut().zip(du).zip(dh).zip(g).zip(u) {
                let sig = T::ONE / (T::ONE + (-g).exp());
                *dg = dh * u * sig * (T::ONE + g * (T::ONE - sig));
                *du = dh * g * sig;
            }
        });
}
