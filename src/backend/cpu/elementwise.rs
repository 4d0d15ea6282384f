//! Elementwise and gather ops: embedding lookup, SwiGLU, residual add.
//!
//! - `embedding`: `out[i, :] = table[ids[i], :]`, table `[vocab, dim]`.
//! - `swiglu`: `out = silu(gate) · up`, `silu(g) = g · σ(g) = g / (1 + e^{−g})`.
//! - `add_assign`: `x += y` (residual connection).

use rayon::prelude::*;

pub fn embedding(out: &mut [f32], table: &[f32], ids: &[u32], dim: usize) {
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| {
            let id = id as usize;
            o.copy_from_slice(&table[id * dim..(id + 1) * dim]);
        });
}

pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

pub fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(4096)
        .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
        .for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = silu(g) * u;
            }
        });
}

pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.par_chunks_mut(4096)
        .zip(y.par_chunks(4096))
        .for_each(|(x, y)| {
            for (a, &b) in x.iter_mut().zip(y) {
                *a += b;
            }
        });
}

#[cfg(test)]
mod tests {
    #[test]
    fn silu_values() {
        assert_eq!(super::silu(0.0), 0.0);
        assert!((super::silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!(super::silu(-100.0).abs() < 1e-30);
    }
}
