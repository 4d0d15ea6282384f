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

use super::nf4::{dequantize_run, scaled_table, Absmax, Nf4Tensor};

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

/// Rows of `W` per dequantized tile: about 1 MiB of f32 (an L2's worth), and at least 32 rows
/// so that each `gemm` call has a wide enough `n` to run at full speed (4 or 8 rows made the
/// M = 512 products 2–5× slower than dense at Llama-7B shapes).
fn row_tile(k: usize) -> usize {
    (256 * 1024 / k.max(1)).clamp(32, 128)
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
    if m == 1 {
        return gemv_wt(&mut out[..n], &x[..k], w, k);
    }
    let absmax = w.block_absmax();
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

/// The decode path: one dot product per row of `W`, parallel over chunks of rows.
///
/// Fast path (x86_64 with AVX2 + FMA, detected at run time, and `k` a multiple of the block size
/// so every row starts on a block and a byte): [`avx2::row_dot`] decodes 32 codes per step with
/// two 8-lane table permutes per 8 codes, straight from the packed bytes, against a copy of `x`
/// whose every 16 elements are reordered (evens, then odds) to match the nibble order, so no
/// codes need interleaving. The block scales are decoded per row, not for the whole tensor.
/// Otherwise: dequantize each row through the block's scaled table and take a dot product.
fn gemv_wt(out: &mut [f32], x: &[f32], w: &Nf4Tensor, k: usize) {
    const CHUNK: usize = 16;
    #[cfg(target_arch = "x86_64")]
    if k % w.blocksize == 0
        && w.blocksize % 32 == 0
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
    {
        let xp = avx2::permute_x(x);
        let bpr = k / w.blocksize;
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            let mut scales = vec![0f32; bpr];
            for (r, dst) in o.iter_mut().enumerate() {
                let j = c * CHUNK + r;
                block_scales(w, j * bpr, &mut scales);
                let row = &w.packed[j * k / 2..(j + 1) * k / 2];
                // SAFETY: AVX2 and FMA were detected above; `row` holds `bpr` whole blocks of
                // codes and `xp` has `k` elements, as `row_dot` requires.
                *dst = unsafe { avx2::row_dot(row, &xp, &scales, w.blocksize) };
            }
        });
        return;
    }
    let absmax = w.block_absmax();
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let mut row = vec![0f32; k];
        for (r, dst) in o.iter_mut().enumerate() {
            let j = c * CHUNK + r;
            dequantize_range(w, &absmax, j * k, &mut row);
            *dst = dot(&row, x);
        }
    });
}

/// The decoded absmax of blocks `first..first + out.len()`: the same f32 operations as
/// [`super::Absmax::decode`] (`nested_code[q] * nested_absmax + offset` for double quant).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn block_scales(w: &Nf4Tensor, first: usize, out: &mut [f32]) {
    match &w.absmax {
        Absmax::F32(v) => out.copy_from_slice(&v[first..first + out.len()]),
        Absmax::Double {
            q,
            offset,
            nested_absmax,
            nested_code,
            nested_blocksize,
        } => {
            for (i, o) in out.iter_mut().enumerate() {
                let b = first + i;
                *o = nested_code[q[b] as usize] * nested_absmax[b / nested_blocksize] + offset;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::nf4::NF4_TABLE;
    use std::arch::x86_64::*;

    /// `x` with each group of 16 reordered as `x[0], x[2], .., x[14], x[1], x[3], .., x[15]`: the
    /// order in which [`row_dot`] produces the high and low nibbles of 8 packed bytes. A tail
    /// shorter than 16 is copied as is (unused: rows are whole blocks of at least 32).
    pub fn permute_x(x: &[f32]) -> Vec<f32> {
        let mut xp = x.to_vec();
        for (dst, src) in xp.chunks_exact_mut(16).zip(x.chunks_exact(16)) {
            for i in 0..8 {
                dst[i] = src[2 * i];
                dst[8 + i] = src[2 * i + 1];
            }
        }
        xp
    }

    /// The 8 weights of 8 codes given as the low 3 bits (`idx`) and the high bit of each code in
    /// the sign bit of `sel`: two 8-entry table permutes and a blend.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn lookup(lo: __m256, hi: __m256, idx: __m256i, sel: __m256i) -> __m256 {
        _mm256_blendv_ps(
            _mm256_permutevar8x32_ps(lo, idx),
            _mm256_permutevar8x32_ps(hi, idx),
            _mm256_castsi256_ps(sel),
        )
    }

    /// `Σ_p dequant(row)[p] · x[p]` for one row of `scales.len()` whole blocks of `bs` codes
    /// (`bs` a multiple of 32), with `xp` = [`permute_x`] of `x`. The weights are the products
    /// `NF4_TABLE[code] * scale` exactly as the dequantizer forms them; only the summation
    /// order differs from a dense dot product.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `row.len() == scales.len() * bs / 2` and
    /// `xp.len() >= scales.len() * bs`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn row_dot(row: &[u8], xp: &[f32], scales: &[f32], bs: usize) -> f32 {
        debug_assert!(bs % 32 == 0 && row.len() == scales.len() * bs / 2);
        debug_assert!(xp.len() >= scales.len() * bs);
        let t_lo = _mm256_loadu_ps(NF4_TABLE.as_ptr());
        let t_hi = _mm256_loadu_ps(NF4_TABLE.as_ptr().add(8));
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut p = row.as_ptr();
        let mut xq = xp.as_ptr();
        for &s in scales {
            let sv = _mm256_set1_ps(s);
            let lo = _mm256_mul_ps(t_lo, sv);
            let hi = _mm256_mul_ps(t_hi, sv);
            for _ in 0..bs / 32 {
                // 16 bytes = 32 codes: bytes 0..8 then 8..16, each byte's high nibble first.
                let bytes = _mm_loadu_si128(p as *const __m128i);
                let v0 = _mm256_cvtepu8_epi32(bytes);
                let v1 = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(bytes, bytes));
                // high nibble: index bits 4..6, top bit 7 -> sign; low nibble: bits 0..2 (the
                // permute ignores higher bits), top bit 3 -> sign.
                let h0 = lookup(lo, hi, _mm256_srli_epi32(v0, 4), _mm256_slli_epi32(v0, 24));
                let l0 = lookup(lo, hi, v0, _mm256_slli_epi32(v0, 28));
                let h1 = lookup(lo, hi, _mm256_srli_epi32(v1, 4), _mm256_slli_epi32(v1, 24));
                let l1 = lookup(lo, hi, v1, _mm256_slli_epi32(v1, 28));
                acc[0] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xq), acc[0]);
                acc[1] = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xq.add(8)), acc[1]);
                acc[2] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xq.add(16)), acc[2]);
                acc[3] = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xq.add(24)), acc[3]);
                p = p.add(16);
                xq = xq.add(32);
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), s);
        lanes.iter().sum()
    }
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
            // k a multiple of the block size: the SIMD GEMV where the CPU has it
            (37, 192, 64, true),
            (9, 512, 256, false),
            (3, 64, 32, true),
            (2, 4096, 4096, false),
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
