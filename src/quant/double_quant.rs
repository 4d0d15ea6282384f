//! bitsandbytes' double quantization ("compress_statistics") of the NF4 absmax.
//!
//! `offset = absmax.mean()` (torch, f32), then `absmax - offset` is quantized blockwise (blocks of
//! 256) to 8-bit codes of the signed dynamic map with bitsandbytes' CPU `quantize_blockwise`, one
//! f32 absmax per nested block. Decoding is `code[q] * nested_absmax[i / 256] + offset`.
//!
//! Bit-exactness notes (bitsandbytes 0.50.2, torch 2.15.0 on x86-64):
//! - `offset`: torch's CPU `sum` is a cascade sum whose shape depends on the SIMD width of the
//!   kernel; this mirrors the 8-lane (256-bit) kernel that torch 2.15 runs for f32 sums, also on
//!   the AVX-512 host that made the fixtures (checked: 16 or 4 lanes miss by 1-2 ulp), on one
//!   thread. Above 32768 blocks torch splits the sum across threads, so bnb's own offset then
//!   depends on the thread count (by an ulp or so); ours is fixed.
//! - the 8-bit quantizer is bnb's CPU one: it does not search the code but looks up a 65536-entry
//!   table indexed by `round((v / absmax + 1) / 2 * 65535)` (computed with a fused multiply-add, as
//!   the C++ is compiled with FMA), each entry holding the code nearest to that grid point.

use super::nf4::{Absmax, NESTED_BLOCKSIZE};
use std::sync::OnceLock;

/// bitsandbytes' `create_dynamic_map(signed=True)` (the default 8-bit code), exactly.
///
/// Mirrors the Python: for exponent `i` in 0..7, `2^i + 1` points of `torch.linspace(0.1, 1)`
/// (f32, each point a fused `start + step * i`), their pairwise f32 means times `10^(i - 6)` (the
/// scalar rounded to f32), both signs; plus 0 and 1; sorted.
pub fn dynamic_code_signed() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    // Python's `10 ** (i - 6)` as a double, then rounded to f32 by torch's scalar multiply.
    const POW10: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    for (i, &p) in POW10.iter().enumerate() {
        let b = torch_linspace(0.1, 1.0, (1usize << i) + 1);
        let scale = p as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// torch's CPU `linspace` for f32: `step = (end - start) / (steps - 1)` in f32, the first half
/// counted from `start`, the second from `end`, each point one rounding (torch's kernel compiles
/// `start + step * i` to a fused multiply-add).
fn torch_linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
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

/// The signed dynamic code, computed once.
pub fn dynamic_code() -> &'static [f32; 256] {
    static CODE: OnceLock<[f32; 256]> = OnceLock::new();
    CODE.get_or_init(dynamic_code_signed)
}

/// Compresses per-block absmax the way `quantize_4bit(..., compress_statistics=True)` does.
pub fn compress_absmax(absmax: &[f32]) -> Absmax {
    let offset = torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code = dynamic_code();
    let (q, nested_absmax) = quantize_blockwise_8bit(&centered, code, NESTED_BLOCKSIZE);
    Absmax::Double {
        q,
        offset,
        nested_absmax,
        nested_code: code.to_vec(),
        nested_blocksize: NESTED_BLOCKSIZE,
    }
}

/// bitsandbytes' CPU `quantize_blockwise(a, code, blocksize)`: per block `absmax = max |v|`, codes
/// from the 65536-entry nearest-code table (all-zero blocks get code 0). Returns `(q, absmax)`.
/// `code` must be sorted ascending (bnb's maps are).
pub fn quantize_blockwise_8bit(
    a: &[f32],
    code: &[f32; 256],
    blocksize: usize,
) -> (Vec<u8>, Vec<f32>) {
    let lut = build_lut(code);
    let mut q = vec![0u8; a.len()];
    let mut absmax = Vec::with_capacity(a.len().div_ceil(blocksize.max(1)));
    for (chunk, out) in a.chunks(blocksize).zip(q.chunks_mut(blocksize)) {
        let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            continue;
        }
        let inv = 1.0 / am;
        for (o, &v) in out.iter_mut().zip(chunk) {
            *o = lut[lut_index(v * inv)];
        }
    }
    (q, absmax)
}

/// bitsandbytes' (CPU and reference) `dequantize_blockwise`: `code[q] * absmax[i / blocksize]`.
pub fn dequantize_blockwise_8bit(
    q: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
) -> Vec<f32> {
    q.chunks(blocksize)
        .zip(absmax)
        .flat_map(|(chunk, &s)| chunk.iter().map(move |&c| code[c as usize] * s))
        .collect()
}

const LUT_SIZE: usize = 65536;

/// Grid point `i` of [-1, 1] → the first code whose upper midpoint is not below it.
fn build_lut(code: &[f32; 256]) -> Vec<u8> {
    let mut mid = [0f32; 255];
    for (i, m) in mid.iter_mut().enumerate() {
        *m = 0.5 * (code[i] + code[i + 1]);
    }
    let mut lut = vec![0u8; LUT_SIZE];
    let mut c = 0usize;
    for (i, l) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
        while c < 255 && mid[c] < val {
            c += 1;
        }
        *l = c as u8;
    }
    lut
}

#[inline]
fn lut_index(v: f32) -> usize {
    let t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
    t.mul_add((LUT_SIZE - 1) as f32, 0.5) as u16 as usize
}

/// torch's `Tensor.mean()` of a contiguous 1-D f32 tensor on CPU: the cascade `sum` (8 lanes,
/// 4-way ILP, 4 levels), then one f32 division by the count.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

/// torch's CPU cascade sum of a contiguous f32 vector (single thread, 8-lane vectors).
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const L: usize = 8;
    if x.len() < L {
        return row_sum::<1>(x, x.len())[0];
    }
    let nvec = x.len() / L;
    let lanes = row_sum::<L>(x, nvec);
    let mut acc = 0f32;
    for &v in &x[nvec * L..] {
        acc += v;
    }
    for v in lanes {
        acc += v;
    }
    acc
}

/// torch's `row_sum` over `count` elements of `L` lanes each (element `i` = `x[i*L..(i+1)*L]`).
fn row_sum<const L: usize>(x: &[f32], count: usize) -> [f32; L] {
    const ILP: usize = 4;
    let rows = count / ILP;
    let mut part = multi_row_sum::<L>(x, rows);
    for i in rows * ILP..count {
        add(&mut part[0], &x[i * L..(i + 1) * L]);
    }
    let mut out = part[0];
    for p in &part[1..] {
        add(&mut out, p);
    }
    out
}

#[inline]
fn add<const L: usize>(acc: &mut [f32; L], v: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// torch's `multi_row_sum` with 4 rows: row `r` holds elements `4r..4r+4`, accumulated in 4
/// cascade levels of `2^level_power` rows each.
fn multi_row_sum<const L: usize>(x: &[f32], size: usize) -> [[f32; L]; 4] {
    const LEVELS: usize = 4;
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; 4]; LEVELS];
    let elem = |i: usize, k: usize| &x[(4 * i + k) * L..(4 * i + k + 1) * L];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, elem(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lo, hi) = acc.split_at_mut(j);
            for (a, b) in hi[0].iter_mut().zip(lo[j - 1].iter_mut()) {
                add(a, b);
                *b = [0f32; L];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, elem(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        let (lo, hi) = acc.split_at_mut(j);
        for (a, b) in lo[0].iter_mut().zip(hi[0].iter()) {
            add(a, b);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_code_shape() {
        let c = dynamic_code_signed();
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(c[255], 1.0);
        assert!(c.contains(&0.0));
        assert!((c[0] + 0.99297).abs() < 1e-4, "{}", c[0]);
    }

    #[test]
    fn cascade_sum_is_close_to_f64_sum() {
        for n in [1usize, 5, 15, 16, 17, 63, 64, 65, 1000, 4097, 40000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 + 0.1)
                .collect();
            let exact: f64 = x.iter().map(|&v| v as f64).sum();
            let got = torch_sum_f32(&x) as f64;
            assert!(
                (got - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                "n={n} {got} vs {exact}"
            );
        }
    }

    #[test]
    fn blockwise_8bit_round_trip_is_nearest_code() {
        let code = dynamic_code();
        let a: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.731).sin() * 3.0)
            .collect();
        let (q, am) = quantize_blockwise_8bit(&a, code, 256);
        let d = dequantize_blockwise_8bit(&q, &am, code, 256);
        for (i, (&x, &y)) in a.iter().zip(&d).enumerate() {
            let s = am[i / 256];
            // the table grid (2/65535) can move a value across a midpoint by at most one grid step
            let best = code
                .iter()
                .map(|&c| (c * s - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                (y - x).abs() <= best + 2.0 * s / 65535.0 + 1e-6,
                "{i}: {x} -> {y}"
            );
        }
    }
}
