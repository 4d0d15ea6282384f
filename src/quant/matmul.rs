//! Fused CPU matmuls over NF4 weights: `W` (shape `[n, k]`) is dequantized tile by tile into a
//! small per-task buffer and never materialised whole.
//!
//! - [`nf4_matmul_wt`]: `out[m, n] = x[m, k] · Wᵀ` (the forward of a linear layer). `m == 1`
//!   (decode) is a GEMV straight over the packed bytes, parallel over rows of `W`; larger `m`
//!   dequantizes tiles of whole `W` rows and hands each to `gemm`, rayon-parallel over tiles.
//! - [`nf4_matmul`]: `dx[m, k] = dy[m, n] · W` (the input gradient), parallel over column chunks
//!   of `W` (so each task owns a column range of `dx`), accumulating over row tiles.
//!
//! The products are the f32 values of [`super::dequantize_nf4`], so results agree with the dense
//! path up to summation order.

use rayon::prelude::*;

use super::nf4::{dequantize_run, scaled_table, Nf4Tensor};

/// `W`'s 2-D view: `[rows, cols]` with `cols` the last dimension.
fn dims(w: &Nf4Tensor) -> (usize, usize) {
    let k = *w.shape.last().unwrap_or(&1);
    (w.numel() / k.max(1), k)
}

/// Dequantizes the flat elements `start..start + out.len()`, however they straddle blocks.
fn dequantize_range(w: &Nf4Tensor, absmax: &[f32], start: usize, out: &mut [f32]) {
    let bs = w.blocksize;
    let mut pos = 0;
    while pos < out.len() {
        let e = start + pos;
        let b = e / bs;
        let seg = ((b + 1) * bs - e).min(out.len() - pos);
        dequantize_run(
            &w.packed,
            e,
            &scaled_table(absmax[b]),
            &mut out[pos..pos + seg],
        );
        pos += seg;
    }
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint index sets of one exclusively borrowed buffer to rayon tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows of `W` per dequantized tile: about 128 KiB of f32.
fn row_tile(k: usize) -> usize {
    (32 * 1024 / k.max(1)).clamp(4, 64)
}

/// `out[m, n] = x[m, k] · Wᵀ` with `W = dequant(w)` of shape `[n, k]` (all row-major).
pub fn nf4_matmul_wt(out: &mut [f32], x: &[f32], w: &Nf4Tensor, m: usize) {
    let (n, k) = dims(w);
    assert!(
        out.len() >= m * n && x.len() >= m * k,
        "nf4_matmul_wt: buffers too small for [{m}, {k}] · [{n}, {k}]ᵀ"
    );
    if m == 0 || n == 0 {
        return;
    }
    let absmax = w.block_absmax();
    if m == 1 {
        return gemv_wt(&mut out[..n], &x[..k], w, &absmax, k);
    }
    let tn = row_tile(k);
    let dst = SendPtr(out.as_mut_ptr());
    (0..n.div_ceil(tn))
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, t| {
            let r0 = t * tn;
            let rows = tn.min(n - r0);
            buf.resize(rows * k, 0.0);
            dequantize_range(w, &absmax, r0 * k, &mut buf[..rows * k]);
            // SAFETY: dst (i, j) -> i*n + r0 + j with j < rows: inside `out` (asserted above) and in
            // this task's own columns r0..r0+rows; lhs (i, p) -> i*k + p < m*k; rhs (p, j) -> j*k + p
            // < rows*k. No two tasks share an output column.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    k,
                    dst.get().add(r0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    buf.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}

/// The decode path: one dot product per row of `W`, decoding bytes through the block's scaled
/// table, 8 independent accumulators so the loop vectorizes.
fn gemv_wt(out: &mut [f32], x: &[f32], w: &Nf4Tensor, absmax: &[f32], k: usize) {
    const CHUNK: usize = 16;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let mut row = vec![0f32; k];
        for (r, dst) in o.iter_mut().enumerate() {
            let j = c * CHUNK + r;
            dequantize_range(w, absmax, j * k, &mut row);
            *dst = dot(&row, x);
        }
    });
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, ar) = a.split_at(a.len() / 16 * 16);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(16).zip(bc.chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// `dx[m, k] = dy[m, n] · W` with `W = dequant(w)` of shape `[n, k]` (all row-major).
pub fn nf4_matmul(dx: &mut [f32], dy: &[f32], w: &Nf4Tensor, m: usize) {
    let (n, k) = dims(w);
    assert!(
        dx.len() >= m * k && dy.len() >= m * n,
        "nf4_matmul: buffers too small for [{m}, {n}] · [{n}, {k}]"
    );
    if m == 0 || k == 0 {
        return;
    }
    if n == 0 {
        dx[..m * k].fill(0.0);
        return;
    }
    let absmax = w.block_absmax();
    const KC: usize = 256;
    const TN: usize = 64;
    let dst = SendPtr(dx.as_mut_ptr());
    (0..k.div_ceil(KC))
        .into_par_iter()
        .for_each_init(Vec::new, |buf: &mut Vec<f32>, c| {
            let c0 = c * KC;
            let cols = KC.min(k - c0);
            buf.resize(TN * cols, 0.0);
            for (t, r0) in (0..n).step_by(TN).enumerate() {
                let rows = TN.min(n - r0);
                for r in 0..rows {
                    dequantize_range(
                        w,
                        &absmax,
                        (r0 + r) * k + c0,
                        &mut buf[r * cols..(r + 1) * cols],
                    );
                }
                // SAFETY: dst (i, j) -> i*k + c0 + j with j < cols: inside `dx` and in this task's own
                // columns; lhs (i, p) -> i*n + r0 + p < m*n; rhs (p, j) -> p*cols + j < rows*cols.
                // The first tile overwrites (read_dst = false), later tiles accumulate.
                unsafe {
                    gemm::gemm(
                        m,
                        cols,
                        rows,
                        dst.get().add(c0),
                        1,
                        k as isize,
                        t > 0,
                        dy.as_ptr().add(r0),
                        1,
                        n as isize,
                        buf.as_ptr(),
                        1,
                        cols as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::nf4::{dequantize_nf4, quantize_nf4};
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                "{what} [{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn matches_naive_on_odd_shapes() {
        for &(n, k, bs, dq) in &[
            (7, 13, 64, false),
            (33, 100, 128, true),
            (70, 129, 64, true),
            (5, 700, 256, false),
        ] {
            let w = quantize_nf4(&data(n * k, 1), &[n, k], bs, dq).unwrap();
            let wd = dequantize_nf4(&w);
            for m in [1usize, 3, 17] {
                let x = data(m * k, 2);
                let mut want = vec![0f32; m * n];
                for i in 0..m {
                    for j in 0..n {
                        want[i * n + j] = (0..k).map(|p| x[i * k + p] * wd[j * k + p]).sum();
                    }
                }
                let mut got = vec![f32::NAN; m * n];
                nf4_matmul_wt(&mut got, &x, &w, m);
                close(&got, &want, &format!("wt m={m} n={n} k={k}"));

                let dy = data(m * n, 3);
                let mut want = vec![0f32; m * k];
                for i in 0..m {
                    for p in 0..k {
                        want[i * k + p] = (0..n).map(|j| dy[i * n + j] * wd[j * k + p]).sum();
                    }
                }
                let mut got = vec![f32::NAN; m * k];
                nf4_matmul(&mut got, &dy, &w, m);
                close(&got, &want, &format!("w m={m} n={n} k={k}"));
            }
        }
    }
}
