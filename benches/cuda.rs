//! CUDA kernel benchmarks (`cargo bench --features cuda --bench cuda`); each is validated against
//! the CPU spec before it is timed. Without the `cuda` feature or without a usable GPU they skip
//! with a message.
//!
//! - `nf4/dequant`: NF4 → f32 at 4096×4096 (bytes moved: packed + scales in, f32 out), next to a
//!   device-to-device memcpy of the f32 output size.
//! - `nf4/gemv`: fused NF4 GEMV at M = 1, 8 on Llama-7B shapes (bytes: the packed weight).
//! - `nf4/gemm`: prefill products at M = 16, 512, 2048: dequantize + cuBLAS sgemm (the baseline)
//!   next to cuBLAS sgemm on a dense f32 weight; throughput in FLOP/s (2·M·N·K).
//! - `decode/llama2-7b-shape`: one decode step of a random NF4 model with Llama-2-7B's shapes,
//!   generated on the host directly in NF4 (tokens/s = 1 / step time).

use criterion::{criterion_group, criterion_main, Criterion};

#[cfg(feature = "cuda")]
mod gpu {
    use criterion::{BenchmarkId, Criterion, Throughput};
    use qlora::backend::cuda::backend::CudaBackend;
    use qlora::backend::cuda::nf4::DeviceNf4;
    use qlora::backend::{Backend, HostLinear};
    use qlora::config::ModelConfig;
    use qlora::model::{Llama, Logits};
    use qlora::quant::{dequantize_nf4, nf4_matmul_wt, quantize_nf4};
    use std::time::Duration;

    const SHAPES: [(usize, usize); 3] = [(4096, 4096), (11008, 4096), (4096, 11008)];

    fn weights(n: usize, k: usize) -> Vec<f32> {
        (0..n * k)
            .map(|i| (((i * 2_654_435_761) % 2001) as f32 - 1000.0) * 5e-5)
            .collect()
    }

    pub fn run(c: &mut Criterion) {
        let g = match CudaBackend::new(0) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("skipping CUDA benches: no usable GPU ({e})");
                return;
            }
        };
        eprintln!("CUDA benches on {}", g.name());
        let dev = g.dev.clone();
        let sync = || dev.synchronize().expect("synchronize");

        // NF4 dequantize vs memcpy.
        let (n, k) = (4096, 4096);
        let t = quantize_nf4(&weights(n, k), &[n, k], 64, true).unwrap();
        let d = DeviceNf4::upload(&dev, &t).unwrap();
        let mut out = dev.zeros::<f32>(n * k).unwrap();
        d.dequantize(&dev, &mut out).unwrap();
        assert_eq!(
            dev.download(&out).unwrap(),
            dequantize_nf4(&t),
            "dequant validation"
        );
        let mut grp = c.benchmark_group("nf4");
        grp.sample_size(20).measurement_time(Duration::from_secs(3));
        grp.throughput(Throughput::Bytes((d.nbytes() + 4 * n * k) as u64));
        grp.bench_function("dequant/4096x4096", |b| {
            b.iter(|| {
                d.dequantize(&dev, &mut out).unwrap();
                sync();
            })
        });
        let src = dev.zeros::<f32>(n * k).unwrap();
        grp.throughput(Throughput::Bytes((8 * n * k) as u64));
        grp.bench_function("memcpy_dtod/4096x4096_f32", |b| {
            b.iter(|| {
                dev.stream.memcpy_dtod(&src, &mut out).unwrap();
                sync();
            })
        });

        // GEMV (decode) and prefill GEMMs on Llama-7B shapes.
        for (n, k) in SHAPES {
            let w = weights(n, k);
            let t = quantize_nf4(&w, &[n, k], 64, true).unwrap();
            let nf4 = g.linear(HostLinear::Nf4(t.clone())).unwrap();
            let dense = g
                .linear(HostLinear::Dense {
                    rows: n,
                    cols: k,
                    data: w,
                })
                .unwrap();
            for m in [1usize, 8] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
                let mut want = vec![0f32; m * n];
                nf4_matmul_wt(&mut want, &x, &t, m);
                let xd = g.upload(&x).unwrap();
                let mut y = g.zeros(m * n).unwrap();
                g.matmul(&mut y, &xd, &nf4, m).unwrap();
                let got = g.download(&y).unwrap();
                let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                assert!(
                    err / scale < 1e-4,
                    "gemv validation {n}x{k} m {m}: {}",
                    err / scale
                );
                grp.throughput(Throughput::Bytes(t.nbytes() as u64));
                grp.bench_function(BenchmarkId::new(format!("gemv/{n}x{k}"), m), |b| {
                    b.iter(|| {
                        g.matmul(&mut y, &xd, &nf4, m).unwrap();
                        sync();
                    })
                });
            }
            for m in [16usize, 512, 2048] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
                let xd = g.upload(&x).unwrap();
                let mut y = g.zeros(m * n).unwrap();
                grp.throughput(Throughput::Elements((2 * m * n * k) as u64));
                for (name, w) in [("nf4_dequant_sgemm", &nf4), ("dense_sgemm", &dense)] {
                    g.matmul(&mut y, &xd, w, m).unwrap();
                    grp.bench_function(BenchmarkId::new(format!("gemm/{name}/{n}x{k}"), m), |b| {
                        b.iter(|| {
                            g.matmul(&mut y, &xd, w, m).unwrap();
                            sync();
                        })
                    });
                }
            }
        }
        grp.finish();

        // Decode tokens/s, Llama-2-7B shapes, random NF4 weights.
        let cfg_path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/llama-2-7b-chat-hf/config.json"
        );
        let cfg = ModelConfig::from_file(std::path::Path::new(cfg_path)).unwrap();
        let model = match Llama::random_nf4(g, &cfg, 0) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("skipping 7B decode bench: {e}");
                return;
            }
        };
        let prompt: Vec<u32> = (0..128).map(|i| (i * 7 + 3) as u32).collect();
        let mut cache = model.new_cache(prompt.len() + 1).unwrap();
        model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let mut grp = c.benchmark_group("decode");
        grp.sample_size(20).measurement_time(Duration::from_secs(5));
        grp.throughput(Throughput::Elements(1));
        grp.bench_function("llama2-7b-shape/at_128", |b| {
            b.iter(|| {
                cache.len = prompt.len();
                let l = model.forward(&[42], &mut cache, Logits::Last).unwrap();
                model.backend.download(&l).unwrap()
            })
        });
        grp.finish();
        eprintln!(
            "device memory allocated (upper bound of peak): {:.0} MiB",
            model.backend.dev.peak_bytes() as f64 / (1u64 << 20) as f64
        );
    }
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "cuda")]
    gpu::run(c);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = c;
        eprintln!("skipping CUDA benches: built without --features cuda");
    }
}

criterion_group!(cuda, benches);
criterion_main!(cuda);
