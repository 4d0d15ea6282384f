//! CPU NF4 benchmarks (Llama-7B shapes, blocksize 64 with double quantization, as QLoRA uses):
//!
//! - `nf4/dequant`: [`dequantize_nf4`] of a 4096×4096 tensor. Throughput is in bytes of *f32
//!   output* written (64 MiB per call), next to a `memcpy` of a Vec<f32> of the same size.
//! - `nf4/matmul`: fused [`nf4_matmul_wt`] vs dense f32 [`matmul_wt`] of the same shape,
//!   `out[M, N] = x[M, K] · Wᵀ` for (N, K) = (4096, 4096), (11008, 4096), (4096, 11008) and
//!   M = 1 (decode GEMV) and M = 512 (prefill / training). Throughput is in FLOPs: criterion's
//!   "elem/s" counts `2·M·N·K` (one multiply and one add per weight per row of x).
//! - `nf4/quantize`: [`quantize_nf4`] of a 4096×4096 f32 tensor; throughput in bytes of f32
//!   *input* read.
//!
//! Every kernel is checked against the spec before it is timed.
//!
//! Run: `cargo bench --bench nf4` (about 4 minutes on 2 cores). Threads: rayon's default pool
//! (all cores) for the matmuls; `dequantize_nf4` and `quantize_nf4` are single-threaded.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qlora::backend::cpu::matmul_wt;
use qlora::quant::{dequantize_nf4, nf4_matmul_wt, quantize_nf4, Nf4Tensor, NF4_TABLE};
use std::hint::black_box;
use std::time::Duration;

const BLOCKSIZE: usize = 64;

/// Deterministic values in [-scale, scale) (an LCG; nothing depends on their distribution).
fn data(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The spec of dequantization, element by element: `NF4_TABLE[code] * absmax[block]`.
fn check_dequant(q: &Nf4Tensor, got: &[f32]) {
    let absmax = q.block_absmax();
    for (i, &g) in got.iter().enumerate() {
        let byte = q.packed[i / 2];
        let code = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
        let want = NF4_TABLE[code as usize] * absmax[i / q.blocksize];
        assert_eq!(g.to_bits(), want.to_bits(), "dequant [{i}]");
    }
}

fn dequant(c: &mut Criterion) {
    let (n, k) = (4096usize, 4096usize);
    let w = data(n * k, 1, 0.05);
    let q = quantize_nf4(&w, &[n, k], BLOCKSIZE, true).unwrap();
    check_dequant(&q, &dequantize_nf4(&q));
    let src = dequantize_nf4(&q);
    let mut dst = vec![0f32; n * k];

    let mut g = c.benchmark_group("nf4/dequant");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    // bytes of f32 output per call
    g.throughput(Throughput::Bytes((4 * n * k) as u64));
    g.bench_function(BenchmarkId::new("dequantize_nf4", "4096x4096"), |b| {
        b.iter(|| dequantize_nf4(black_box(&q)))
    });
    g.bench_function(BenchmarkId::new("memcpy_f32", "4096x4096"), |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.finish();
}

/// Max relative error of `got` against a naive f64 `x · Wᵀ` on a sample of outputs.
fn check_matmul(got: &[f32], x: &[f32], wd: &[f32], m: usize, n: usize, k: usize, what: &str) {
    let rows = [0, m / 2, m - 1];
    let cols = [0, 1, n / 3, n - 1];
    for &i in &rows {
        for &j in &cols {
            let want: f64 = (0..k)
                .map(|p| x[i * k + p] as f64 * wd[j * k + p] as f64)
                .sum();
            let mag: f64 = (0..k)
                .map(|p| (x[i * k + p] as f64 * wd[j * k + p] as f64).abs())
                .sum();
            let g = got[i * n + j] as f64;
            assert!(
                (g - want).abs() <= 1e-4 * mag.max(1e-6),
                "{what} [{i}, {j}]: {g} vs {want} (Σ|x·w| = {mag})"
            );
        }
    }
}

fn matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("nf4/matmul");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    for &(n, k) in &[(4096usize, 4096usize), (11008, 4096), (4096, 11008)] {
        let w = data(n * k, 2, 0.05);
        let q = quantize_nf4(&w, &[n, k], BLOCKSIZE, true).unwrap();
        let wd = dequantize_nf4(&q);
        drop(w);
        for m in [1usize, 512] {
            let x = data(m * k, 3, 1.0);
            let mut out = vec![0f32; m * n];
            nf4_matmul_wt(&mut out, &x, &q, m);
            check_matmul(&out, &x, &wd, m, n, k, "nf4_matmul_wt");
            out.fill(f32::NAN);
            matmul_wt(&mut out, &x, &wd, m, k, n);
            check_matmul(&out, &x, &wd, m, n, k, "matmul_wt");

            g.measurement_time(Duration::from_secs(if m == 1 { 3 } else { 8 }));
            // FLOPs per call: a multiply and an add per weight per row of x
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            let id = format!("{n}x{k}/M={m}");
            g.bench_function(BenchmarkId::new("nf4_matmul_wt", &id), |b| {
                b.iter(|| nf4_matmul_wt(&mut out, black_box(&x), black_box(&q), m))
            });
            g.bench_function(BenchmarkId::new("dense_f32_matmul_wt", &id), |b| {
                b.iter(|| matmul_wt(&mut out, black_box(&x), black_box(&wd), m, k, n))
            });
        }
    }
    g.finish();
}

fn quantize(c: &mut Criterion) {
    let (n, k) = (4096usize, 4096usize);
    let w = data(n * k, 4, 0.05);
    // checked against the spec: each code is the level nearest to x / absmax of its block
    // (double quantization only changes how the absmax is stored, not the codes)
    let q = quantize_nf4(&w, &[n, k], BLOCKSIZE, true).unwrap();
    for (b, block) in w.chunks(BLOCKSIZE).enumerate() {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (j, &v) in block.iter().enumerate() {
            let i = b * BLOCKSIZE + j;
            let byte = q.packed[i / 2];
            let code = (if i % 2 == 0 { byte >> 4 } else { byte & 15 }) as usize;
            let s = v * (1.0 / am);
            let err = (NF4_TABLE[code] - s).abs();
            let best = NF4_TABLE
                .iter()
                .map(|t| (t - s).abs())
                .fold(f32::MAX, f32::min);
            assert!(err <= best + 1e-6, "quantize [{i}]: {v} -> code {code}");
        }
    }

    let mut g = c.benchmark_group("nf4/quantize");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    // bytes of f32 input per call
    g.throughput(Throughput::Bytes((4 * n * k) as u64));
    g.bench_function(BenchmarkId::new("quantize_nf4_dq", "4096x4096"), |b| {
        b.iter(|| quantize_nf4(black_box(&w), &[n, k], BLOCKSIZE, true).unwrap())
    });
    g.finish();
}

criterion_group!(benches, dequant, matmul, quantize);
criterion_main!(benches);
