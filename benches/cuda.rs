//! CUDA kernel benchmarks (`cargo bench --features cuda --bench cuda`); each is validated against
//! the CPU spec before it is timed. Without the `cuda` feature or without a usable GPU they skip
//! with a message.
//!
//! - `nf4/dequant`: NF4 → f32 (and → bf16) at 4096×4096 (bytes moved: packed + scales in,
//!   output out), next to a device-to-device memcpy of the f32 output size.
//! - `nf4/gemv`: fused NF4 GEMV at M = 1, 8 on Llama-7B shapes (bytes: the packed weight).
//! - `gemm/*`: products on Llama-7B shapes at M = 1, 16, 512, 2048, 8192, throughput in FLOP/s
//!   (2·M·N·K, criterion's "elem/s"), side by side:
//!   `fused` (kernels/nf4_gemm.cu, decode inside the tile loader, bf16 tensor cores),
//!   `dequant_cublas_bf16` (dequantize to a bf16 scratch, round x to bf16, cublasGemmEx — the
//!   baseline the fused kernel must beat), `cublas_bf16` (the GEMM alone on an already
//!   dequantized bf16 weight: the ceiling), `dequant_sgemm` (the f32 path).
//!   Each is validated against the CPU spec (`nf4_gemm_bf16`, on the first and last rows).
//! - `gemm_dx/*`: the backward product `dx = dy · W` (W `[N, K]` as stored, the sum over its rows)
//!   on the same shapes at M = 512, 2048, 8192 (training), FLOP/s as above: `fused`
//!   (kernels/nf4_gemm_dx.cu), `dequant_cublas_bf16` (the baseline it must beat),
//!   `cublas_bf16` (on a dense bf16 copy and bf16 dy: the ceiling), `dequant_sgemm` (f32).
//!   Validated against the CPU spec (`nf4_gemm_dx_bf16`; the f32 path against the unrounded
//!   operands) on the first 3 rows and the last, relative to Σ|terms| (bound 1e-4).
//! - `decode/llama2-7b-shape/{base,adapter_r64_f32,adapter_r64}/{128,2048,4096}`: one decode
//!   step (batch 1) of a random NF4 model with Llama-2-7B's shapes, generated on the host
//!   directly in NF4, at 128, 2,048 and 4,096 cached positions, without and with an r = 64
//!   adapter on every linear projection (fused into the NF4 GEMV), read in f32 (unfrozen) or,
//!   `adapter_r64`, from its bf16 copies (frozen, as `qlora generate --adapter` runs it);
//!   tokens/s = 1 / step time. A `DECODE` line per case gives the bytes a token reads (NF4
//!   weights + lm_head, the bf16 KV cache, the adapter: 0.64 GB in f32, 0.32 GB in bf16)
//!   over the measured time as a fraction of the card's bandwidth (driver clock × bus width, or
//!   `QLORA_PEAK_GBS`). `prefill/…`: a 512-token prompt through the same model, and a `DECODE
//!   ttft` line (prefill + last logits on the host: time to first token).

use criterion::{criterion_group, criterion_main, Criterion};

#[cfg(feature = "cuda")]
mod gpu {
    use criterion::{BenchmarkId, Criterion, Throughput};
    use cudarc::cublas::CudaBlas;
    use qlora::backend::cpu::bf16_round;
    use qlora::backend::cpu::nf4_gemm_dx::gemm_dx_rounded;
    use qlora::backend::cpu::{nf4_bf16_weights, nf4_gemm_bf16};
    use qlora::backend::cuda::backend::CudaBackend;
    use qlora::backend::cuda::blas::{gemm_f32, gemm_half, RowMajor};
    use qlora::backend::cuda::nf4::DeviceNf4;
    use qlora::backend::cuda::nf4_gemm::{gemm_bf16_cublas, Bf16Scratch};
    use qlora::backend::cuda::ops::to_half;
    use qlora::backend::cuda::runtime::DevBuf;
    use qlora::backend::{Backend, HostLinear};
    use qlora::config::ModelConfig;
    use qlora::lora::{LoraConfig, LoraWeights};
    use qlora::model::{Llama, Logits, Lora};
    use qlora::quant::Nf4Tensor;
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
        // QLORA_BENCH=decode: only the 7B decode and prefill groups (scripts/gpu_run.sh decode).
        if std::env::var("QLORA_BENCH").as_deref() == Ok("decode") {
            return decode_group(c, g);
        }
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
        let mut outb = dev.zeros::<u16>(n * k).unwrap();
        grp.throughput(Throughput::Bytes((d.nbytes() + 2 * n * k) as u64));
        grp.bench_function("dequant_bf16/4096x4096", |b| {
            b.iter(|| {
                d.dequantize_bf16(&dev, &mut outb).unwrap();
                sync();
            })
        });
        let src = dev.zeros::<f32>(n * k).unwrap();
        grp.throughput(Throughput::Bytes((8 * n * k) as u64));
        grp.bench_function("memcpy_dtod/4096x4096_f32", |b| {
            b.iter(|| {
                dev.stream.memcpy_dtod(&*src, &mut *out).unwrap();
                sync();
            })
        });

        // GEMV (decode) on Llama-7B shapes; then the prefill GEMMs.
        for (n, k) in SHAPES {
            let t = quantize_nf4(&weights(n, k), &[n, k], 64, true).unwrap();
            let nf4 = g.linear(HostLinear::Nf4(t.clone())).unwrap();
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
        }
        grp.finish();
        for (n, k) in SHAPES {
            let t = quantize_nf4(&weights(n, k), &[n, k], 64, true).unwrap();
            gemm_shape(c, &g, &t, n, k);
            gemm_dx_shape(c, &g, &t, n, k);
        }

        decode_group(c, g);
    }

    /// Seconds per call of `f`, the median of `n` timed calls after 3 warm-up calls (each call
    /// ends by reading its logits back, so it waits for the device).
    fn median_secs(n: usize, mut f: impl FnMut()) -> f64 {
        for _ in 0..3 {
            f();
        }
        let mut t: Vec<f64> = (0..n)
            .map(|_| {
                let t0 = std::time::Instant::now();
                f();
                t0.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[n / 2]
    }

    /// The `decode` group (see the file header): a random NF4 model with Llama-2-7B's shapes,
    /// batch 1. One step = embedding → 32 layers → lm_head → logits on the host, as
    /// `qlora generate` runs it (sampling aside). Also prints one `DECODE` line per case with the
    /// fraction of the bandwidth limit, and the time to first token of a 512-token prompt.
    fn decode_group(c: &mut Criterion, g: CudaBackend) {
        let cfg_path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/llama-2-7b-chat-hf/config.json"
        );
        let cfg = ModelConfig::from_file(std::path::Path::new(cfg_path)).unwrap();
        let mut model = match Llama::random_nf4(g, &cfg, 0) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("skipping 7B decode bench: {e}");
                return;
            }
        };
        // QLoRA's adapter: r = 64 on every linear projection (values do not change the time).
        let targets = [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ];
        let lcfg = LoraConfig::new(64, 16.0, &targets).unwrap();
        let lw = LoraWeights::zeros(&lcfg, &cfg).unwrap();
        let adapter = Lora::new(&model.backend, &lcfg, &lw, &cfg).unwrap();
        // Adapter bytes a token reads: A and B once per projection, in f32 (unfrozen, as
        // training's eval reads it) or in bf16 (frozen, as generate reads it).
        let adapter_values: usize = lw.modules.values().map(|p| p.a.len() + p.b.len()).sum();
        let peak = model.backend.dev.peak_bandwidth().or_else(|| {
            std::env::var("QLORA_PEAK_GBS")
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .map(|g| g * 1e9)
        });
        let weight_bytes = model.linear_bytes();
        let kv_bytes = |ctx: usize| 2 * cfg.num_hidden_layers * ctx * cfg.kv_dim() * 2;
        const CTXS: [usize; 3] = [128, 2048, 4096];
        let mut cache = model.new_cache(4096 + 1).unwrap();

        // Time to first token: a 512-token prompt, prefill + last logits on the host.
        let long: Vec<u32> = (0..512).map(|i| (i * 7 + 3) as u32).collect();
        let mut grp = c.benchmark_group("prefill");
        grp.sample_size(10).measurement_time(Duration::from_secs(5));
        grp.throughput(Throughput::Elements(long.len() as u64));
        grp.bench_function("llama2-7b-shape/512_tokens", |b| {
            b.iter(|| {
                cache.len = 0;
                let l = model.forward(&long, &mut cache, Logits::Last).unwrap();
                model.backend.download(&l).unwrap()
            })
        });
        grp.finish();
        let ttft = median_secs(10, || {
            cache.len = 0;
            let l = model.forward(&long, &mut cache, Logits::Last).unwrap();
            model.backend.download(&l).unwrap();
        });
        eprintln!(
            "DECODE ttft prompt=512: {:.1} ms (target <= 30 ms)",
            ttft * 1e3
        );
        let device = model.backend.name();
        println!(
            r#"{{"impl": "qlora", "case": "ttft/512", "device": "{device}", "ms": {:.3}}}"#,
            ttft * 1e3
        );

        // Decode steps (`Llama::decode`, as `qlora generate` runs them: one CUDA graph launch
        // per token) at each context length: without the adapter, without it and without graphs
        // (every kernel launched from the host), with the adapter in f32 (unfrozen), then frozen
        // with bf16 copies (`Llama::freeze_adapter`, as generate runs it). The cache's contents
        // do not change the time, so each step reuses position `ctx`.
        let mut grp = c.benchmark_group("decode");
        grp.sample_size(20).measurement_time(Duration::from_secs(4));
        grp.throughput(Throughput::Elements(1));
        let mut adapter = Some(adapter);
        for tag in ["base", "base_no_graph", "adapter_r64_f32", "adapter_r64"] {
            model.backend.set_step_graphs(tag != "base_no_graph");
            let adapter_bytes = match tag {
                "base" | "base_no_graph" => 0,
                "adapter_r64_f32" => {
                    model.lora = adapter.take();
                    4 * adapter_values
                }
                _ => {
                    model.freeze_adapter().unwrap();
                    2 * adapter_values
                }
            };
            for ctx in CTXS {
                let mut step = || {
                    cache.len = ctx;
                    let l = model.decode(42, &mut cache).unwrap();
                    // Greedy pick on the device; only the id comes back (as in generate).
                    let greedy = qlora::generate::Sampling::GREEDY;
                    model
                        .backend
                        .sample(l, cfg.vocab_size, &greedy, 0.0)
                        .unwrap()
                };
                grp.bench_function(
                    BenchmarkId::new(format!("llama2-7b-shape/{tag}"), ctx),
                    |b| b.iter(&mut step),
                );
                let secs = median_secs(20, || {
                    step();
                });
                let bytes = weight_bytes + kv_bytes(ctx) + adapter_bytes;
                let frac_v = peak.map(|p| bytes as f64 / secs / p);
                println!(
                    r#"{{"impl": "qlora", "case": "{tag}/{ctx}", "device": "{device}", "tokens_per_s": {:.2}, "ms_per_token": {:.4}, "bytes_per_token": {bytes}, "bandwidth_frac": {}}}"#,
                    1.0 / secs,
                    secs * 1e3,
                    frac_v
                        .map(|f| format!("{f:.4}"))
                        .unwrap_or_else(|| "null".into()),
                );
                let frac = frac_v
                    .map(|f| format!("{:.1}%", 100.0 * f))
                    .unwrap_or_else(|| "unknown (set QLORA_PEAK_GBS)".into());
                eprintln!(
                    "DECODE {tag} ctx={ctx}: {:.1} tok/s ({:.3} ms/token), {:.2} GB read per token \
                     (weights {:.2}, KV {:.2}, adapter {:.2}), bandwidth limit {}: {frac} of it",
                    1.0 / secs,
                    secs * 1e3,
                    bytes as f64 / 1e9,
                    weight_bytes as f64 / 1e9,
                    kv_bytes(ctx) as f64 / 1e9,
                    adapter_bytes as f64 / 1e9,
                    peak.map(|p| format!("{:.0} GB/s", p / 1e9))
                        .unwrap_or_else(|| "unknown".into()),
                );
            }
        }
        grp.finish();
        eprintln!(
            "7B-shape model: peak device memory of qlora's buffers {:.0} MiB",
            qlora::sys::mib(model.backend.dev.peak_bytes())
        );
    }

    /// The products of one weight shape at M = 1, 16, 512, 2048, 8192 (see the file header).
    fn gemm_shape(c: &mut Criterion, g: &CudaBackend, t: &Nf4Tensor, n: usize, k: usize) {
        let dev = g.dev.clone();
        let sync = || dev.synchronize().expect("synchronize");
        let d = DeviceNf4::upload(&dev, t).unwrap();
        let wb = nf4_bf16_weights(t);
        let wbits: Vec<u16> = wb
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let wd = dev.upload(&wbits).unwrap();
        let mut wf = dev.zeros::<f32>(n * k).unwrap();
        d.dequantize(&dev, &mut wf).unwrap();
        let blas = CudaBlas::new(dev.stream.clone()).unwrap();
        let mut scratch = Bf16Scratch::default();
        let mut grp = c.benchmark_group("gemm");
        grp.sample_size(10).measurement_time(Duration::from_secs(2));
        for m in [1usize, 16, 512, 2048, 8192] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
            let xd = dev.upload(&x).unwrap();
            let mut xb = dev.zeros::<u16>(m * k).unwrap();
            to_half(&dev, &mut xb, &xd, m * k, false).unwrap();
            let mut y = dev.zeros::<f32>(m * n).unwrap();
            // Validation on the first and last rows (the spec is row-independent).
            let check = |y: &DevBuf<f32>, what: &str, bf16: bool| {
                let got = dev.download(y).unwrap();
                for r in [0, m - 1] {
                    let xr = &x[r * k..(r + 1) * k];
                    let mut want = vec![0f32; n];
                    if bf16 {
                        nf4_gemm_bf16(&mut want, xr, t, 1, false);
                    } else {
                        nf4_matmul_wt(&mut want, xr, t, 1);
                    }
                    let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
                    let err = got[r * n..(r + 1) * n]
                        .iter()
                        .zip(&want)
                        .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
                    assert!(
                        err / scale < 1e-4,
                        "{what} {n}x{k} m {m} row {r}: {}",
                        err / scale
                    );
                }
            };
            d.gemm(&dev, &mut y, &xd, m, false).unwrap();
            check(&y, "fused", true);
            scratch.gemm(&dev, &blas, &d, &mut y, &xd, m).unwrap();
            check(&y, "dequant_cublas_bf16", true);
            gemm_bf16_cublas(&blas, &dev.stream, &mut y, &xb, &wd, m, k, n).unwrap();
            check(&y, "cublas_bf16", true);
            g.matmul_dense_f32(&mut y, &xd, &wf, m, k, n).unwrap();
            check(&y, "sgemm", false);
            grp.throughput(Throughput::Elements((2 * m * n * k) as u64));
            let id = |name: &str| BenchmarkId::new(format!("{name}/{n}x{k}"), m);
            grp.bench_function(id("fused"), |b| {
                b.iter(|| {
                    d.gemm(&dev, &mut y, &xd, m, false).unwrap();
                    sync();
                })
            });
            grp.bench_function(id("dequant_cublas_bf16"), |b| {
                b.iter(|| {
                    scratch.gemm(&dev, &blas, &d, &mut y, &xd, m).unwrap();
                    sync();
                })
            });
            grp.bench_function(id("cublas_bf16"), |b| {
                b.iter(|| {
                    gemm_bf16_cublas(&blas, &dev.stream, &mut y, &xb, &wd, m, k, n).unwrap();
                    sync();
                })
            });
            grp.bench_function(id("dequant_sgemm"), |b| {
                b.iter(|| {
                    d.dequantize(&dev, &mut wf).unwrap();
                    g.matmul_dense_f32(&mut y, &xd, &wf, m, k, n).unwrap();
                    sync();
                })
            });
        }
        grp.finish();
    }

    /// The backward products `dx[m, k] = dy[m, n] · W[n, k]` of one weight shape at M = 512, 2048
    /// (see the file header).
    fn gemm_dx_shape(c: &mut Criterion, g: &CudaBackend, t: &Nf4Tensor, n: usize, k: usize) {
        let dev = g.dev.clone();
        let sync = || dev.synchronize().expect("synchronize");
        let d = DeviceNf4::upload(&dev, t).unwrap();
        assert!(d.gemm_dx_supported(), "{n}x{k} takes the fused dx kernel");
        let wb = nf4_bf16_weights(t);
        let wbits: Vec<u16> = wb
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let wd = dev.upload(&wbits).unwrap();
        let w32 = dequantize_nf4(t);
        let mut wf = dev.zeros::<f32>(n * k).unwrap();
        d.dequantize(&dev, &mut wf).unwrap();
        let blas = CudaBlas::new(dev.stream.clone()).unwrap();
        let mut scratch = Bf16Scratch::default();
        let mut grp = c.benchmark_group("gemm_dx");
        grp.sample_size(10).measurement_time(Duration::from_secs(2));
        for m in [512usize, 2048, 8192] {
            let dy: Vec<f32> = (0..m * n).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
            let dyd = dev.upload(&dy).unwrap();
            let mut dyb = dev.zeros::<u16>(m * n).unwrap();
            to_half(&dev, &mut dyb, &dyd, m * n, false).unwrap();
            let mut dx = dev.zeros::<f32>(m * k).unwrap();
            // The spec of the validated rows (the full [m, k] spec at this size is far too slow),
            // with Σ|terms| per output as the error scale: (want, scale) for bf16 and f32 operands.
            let rows = [0, 1, 2, m - 1];
            let spec = |w: &[f32], round: fn(f32) -> f32| {
                let dyr: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| dy[r * n..(r + 1) * n].iter().copied())
                    .collect();
                let absr: Vec<f32> = dyr.iter().map(|v| round(*v).abs()).collect();
                let absw: Vec<f32> = w.iter().map(|v| v.abs()).collect();
                let (mut want, mut scale) =
                    (vec![0f32; rows.len() * k], vec![0f32; rows.len() * k]);
                gemm_dx_rounded(&mut want, &dyr, w, rows.len(), n, k, round, false);
                gemm_dx_rounded(&mut scale, &absr, &absw, rows.len(), n, k, |v| v, false);
                (want, scale)
            };
            let spec_bf16 = spec(&wb, bf16_round);
            let spec_f32 = spec(&w32, |v| v);
            let check = |dx: &DevBuf<f32>, what: &str, bf16: bool| {
                let got = dev.download(dx).unwrap();
                let (want, scale) = if bf16 { &spec_bf16 } else { &spec_f32 };
                for (i, &r) in rows.iter().enumerate() {
                    for j in 0..k {
                        let (p, q) = (got[r * k + j], want[i * k + j]);
                        let err = (p - q).abs() / (scale[i * k + j] + 1e-6);
                        assert!(
                            err < 1e-4,
                            "{what} dx {n}x{k} m {m} at ({r}, {j}): {p} vs {q}"
                        );
                    }
                }
            };
            let xw = RowMajor::xw(m, n, k);
            d.gemm_dx(&dev, &mut dx, &dyd, m, false).unwrap();
            check(&dx, "fused", true);
            scratch
                .gemm_dx(&dev, &blas, &d, &mut dx, &dyd, m, false)
                .unwrap();
            check(&dx, "dequant_cublas_bf16", true);
            gemm_half(&blas, &dev.stream, &mut dx, &dyb, &wd, xw, false).unwrap();
            check(&dx, "cublas_bf16", true);
            gemm_f32(&blas, &mut dx, &dyd, &wf, xw).unwrap();
            check(&dx, "sgemm", false);
            grp.throughput(Throughput::Elements((2 * m * n * k) as u64));
            let id = |name: &str| BenchmarkId::new(format!("{name}/{n}x{k}"), m);
            grp.bench_function(id("fused"), |b| {
                b.iter(|| {
                    d.gemm_dx(&dev, &mut dx, &dyd, m, false).unwrap();
                    sync();
                })
            });
            grp.bench_function(id("dequant_cublas_bf16"), |b| {
                b.iter(|| {
                    scratch
                        .gemm_dx(&dev, &blas, &d, &mut dx, &dyd, m, false)
                        .unwrap();
                    sync();
                })
            });
            grp.bench_function(id("cublas_bf16"), |b| {
                b.iter(|| {
                    gemm_half(&blas, &dev.stream, &mut dx, &dyb, &wd, xw, false).unwrap();
                    sync();
                })
            });
            grp.bench_function(id("dequant_sgemm"), |b| {
                b.iter(|| {
                    d.dequantize(&dev, &mut wf).unwrap();
                    gemm_f32(&blas, &mut dx, &dyd, &wf, xw).unwrap();
                    sync();
                })
            });
        }
        grp.finish();
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
