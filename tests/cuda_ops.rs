//! CUDA kernels against their CPU specifications on odd shapes. Every test opens device 0 and
//! returns early with a visible "skipping" message when no usable GPU is present; without the
//! `cuda` feature the file is empty.
#![cfg(feature = "cuda")]

use qlora::backend::cuda::nf4::DeviceNf4;
use qlora::backend::cuda::runtime::CudaDevice;
use qlora::quant::{dequantize_nf4, nf4_matmul_wt, quantize_nf4};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn device(test: &str) -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(d) => {
            eprintln!(
                "{test}: running on {} (sm_{}{})",
                d.name, d.capability.0, d.capability.1
            );
            Some(d)
        }
        Err(e) => {
            eprintln!("skipping {test}: no usable CUDA device ({e})");
            None
        }
    }
}

fn rvec(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

#[test]
fn opening_a_device_never_panics() {
    // Here (no driver) this is an error; on a GPU machine device 0 opens and a missing ordinal
    // is an error naming the count.
    match CudaDevice::new(0) {
        Ok(_) => {
            let Err(e) = CudaDevice::new(1000) else {
                panic!("device 1000 opened");
            };
            assert!(e.to_string().contains("does not exist"), "{e}");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("CUDA") || msg.contains("cuda"), "{msg}");
        }
    }
}

/// (rows, cols, blocksize, double quant) with partial blocks and odd row lengths.
/// The GEMV takes its bandwidth kernel when cols % 32 == 0 (rows 1, 17, 13, 64 here; 13 and
/// 1056 leave partial row groups and a partial last step) and the general one otherwise.
const NF4_CASES: [(usize, usize, usize, bool); 6] = [
    (1, 64, 64, true),
    (3, 200, 64, true),
    (17, 96, 64, false),
    (5, 333, 128, true),
    (13, 1056, 64, true),
    (64, 4096, 64, true),
];

#[test]
fn nf4_dequantize_is_bit_exact() {
    let Some(dev) = device("nf4_dequantize_is_bit_exact") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(1);
    for (rows, cols, bs, dq) in NF4_CASES {
        let w = rvec(&mut rng, rows * cols, 0.7);
        let t = quantize_nf4(&w, &[rows, cols], bs, dq).unwrap();
        let d = DeviceNf4::upload(&dev, &t).unwrap();
        let mut out = dev.zeros::<f32>(rows * cols).unwrap();
        d.dequantize(&dev, &mut out).unwrap();
        let got = dev.download(&out).unwrap();
        let want = dequantize_nf4(&t);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "[{rows}, {cols}] blocksize {bs} dq {dq}"
        );
    }
}

#[test]
fn nf4_gemv_matches_the_cpu_kernel() {
    let Some(dev) = device("nf4_gemv_matches_the_cpu_kernel") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(2);
    for (rows, cols, bs, dq) in NF4_CASES {
        for m in [1, 3, 8] {
            let w = rvec(&mut rng, rows * cols, 0.7);
            let x = rvec(&mut rng, m * cols, 1.0);
            let t = quantize_nf4(&w, &[rows, cols], bs, dq).unwrap();
            let mut want = vec![0f32; m * rows];
            nf4_matmul_wt(&mut want, &x, &t, m);
            let d = DeviceNf4::upload(&dev, &t).unwrap();
            let xd = dev.upload(&x).unwrap();
            let mut yd = dev.zeros::<f32>(m * rows).unwrap();
            d.gemv(&dev, &mut yd, &xd, m, false).unwrap();
            let got = dev.download(&yd).unwrap();
            let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            assert!(
                err / scale < 1e-5,
                "[{rows}, {cols}] m {m}: rel err {}",
                err / scale
            );
        }
    }
}

/// Max of `|got − want| / (Σ_k |x·w| + 1e-6)` over the outputs: the error relative to the size
/// of the terms summed, which f32 accumulation bounds by about k · 2⁻²⁴.
fn gemm_err(got: &[f32], want: &[f32], x: &[f32], wb: &[f32], m: usize, n: usize, k: usize) -> f64 {
    let mut worst = 0f64;
    for r in 0..m {
        for o in 0..n {
            let mag: f64 = (0..k)
                .map(|j| {
                    (qlora::backend::cpu::bf16_round(x[r * k + j]) as f64 * wb[o * k + j] as f64)
                        .abs()
                })
                .sum();
            let e = (got[r * n + o] as f64 - want[r * n + o] as f64).abs() / (mag + 1e-6);
            worst = worst.max(e);
        }
    }
    worst
}

/// (m, n, k, blocksize, double quant): both tile configurations (m ≤ 64 and above), partial
/// tiles in every dimension, k a multiple of 16 but not of the 32-wide K step (48, 208).
const GEMM_CASES: [(usize, usize, usize, usize, bool); 7] = [
    (9, 33, 64, 64, true),
    (17, 75, 48, 64, false),
    (33, 130, 208, 64, true),
    (64, 64, 128, 128, true),
    (65, 129, 96, 64, true),
    (130, 200, 256, 64, false),
    (300, 77, 1024, 64, true),
];

#[test]
fn nf4_gemm_matches_the_cpu_spec() {
    use qlora::backend::cpu::{nf4_bf16_weights, nf4_gemm_bf16};
    let Some(dev) = device("nf4_gemm_matches_the_cpu_spec") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(5);
    for (m, n, k, bs, dq) in GEMM_CASES {
        let w = rvec(&mut rng, n * k, 0.7);
        let x = rvec(&mut rng, m * k, 1.5);
        let t = quantize_nf4(&w, &[n, k], bs, dq).unwrap();
        let d = DeviceNf4::upload(&dev, &t).unwrap();
        assert!(d.gemm_supported());
        let wb = nf4_bf16_weights(&t);
        let xd = dev.upload(&x).unwrap();
        for accumulate in [false, true] {
            let y0 = rvec(&mut rng, m * n, 1.0);
            let mut want = y0.clone();
            nf4_gemm_bf16(&mut want, &x, &t, m, accumulate);
            let mut yd = dev.upload(&y0).unwrap();
            d.gemm(&dev, &mut yd, &xd, m, accumulate).unwrap();
            let got = dev.download(&yd).unwrap();
            let err = gemm_err(&got, &want, &x, &wb, m, n, k);
            eprintln!("  nf4 gemm [{m},{k}]x[{n},{k}] bs {bs} dq {dq} acc {accumulate}: {err:.2e}");
            assert!(
                err < 2e-5,
                "[{m},{k}]x[{n},{k}] acc {accumulate}: {err:.3e}"
            );
        }
    }
    // Shapes the kernel does not take are refused, not miscomputed.
    let t = quantize_nf4(&rvec(&mut rng, 3 * 40, 0.5), &[3, 40], 64, true).unwrap();
    let d = DeviceNf4::upload(&dev, &t).unwrap();
    assert!(!d.gemm_supported());
    let (xd, mut yd) = (
        dev.zeros::<f32>(9 * 40).unwrap(),
        dev.zeros::<f32>(27).unwrap(),
    );
    assert!(d.gemm(&dev, &mut yd, &xd, 9, false).is_err());
}

#[test]
fn dequant_cublas_bf16_baseline_matches_the_cpu_spec() {
    use qlora::backend::cpu::{nf4_bf16_weights, nf4_gemm_bf16};
    use qlora::backend::cuda::nf4_gemm::Bf16Scratch;
    let Ok(g) = qlora::backend::cuda::backend::CudaBackend::new(0) else {
        eprintln!(
            "skipping dequant_cublas_bf16_baseline_matches_the_cpu_spec: no usable CUDA device"
        );
        return;
    };
    let dev = &g.dev;
    let blas = cudarc::cublas::CudaBlas::new(dev.stream.clone()).unwrap();
    let mut scratch = Bf16Scratch::default();
    let mut rng = StdRng::seed_from_u64(6);
    // bf16 dequantization, bit-exact, including sizes that are not a multiple of 8.
    for (rows, cols, bs, dq) in NF4_CASES {
        let t = quantize_nf4(&rvec(&mut rng, rows * cols, 0.7), &[rows, cols], bs, dq).unwrap();
        let d = DeviceNf4::upload(dev, &t).unwrap();
        let mut wd = dev.zeros::<u16>(rows * cols).unwrap();
        d.dequantize_bf16(dev, &mut wd).unwrap();
        let bits: Vec<u16> = qlora::backend::cpu::nf4_bf16_weights(&t)
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        assert_eq!(
            dev.download(&wd).unwrap(),
            bits,
            "bf16 dequant [{rows},{cols}]"
        );
    }
    for (m, n, k, bs, dq) in GEMM_CASES {
        let w = rvec(&mut rng, n * k, 0.7);
        let x = rvec(&mut rng, m * k, 1.5);
        let t = quantize_nf4(&w, &[n, k], bs, dq).unwrap();
        let d = DeviceNf4::upload(dev, &t).unwrap();
        // The bf16 scratch weight is bit-exact with the spec's rounded weights.
        let mut wd = dev.zeros::<u16>(n * k).unwrap();
        d.dequantize_bf16(dev, &mut wd).unwrap();
        let wb = nf4_bf16_weights(&t);
        let bits: Vec<u16> = wb
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        assert_eq!(dev.download(&wd).unwrap(), bits, "bf16 dequant [{n},{k}]");
        let mut want = vec![0f32; m * n];
        nf4_gemm_bf16(&mut want, &x, &t, m, false);
        let mut yd = dev.zeros::<f32>(m * n).unwrap();
        scratch
            .gemm(dev, &blas, &d, &mut yd, &dev.upload(&x).unwrap(), m)
            .unwrap();
        let err = gemm_err(&dev.download(&yd).unwrap(), &want, &x, &wb, m, n, k);
        assert!(err < 2e-5, "[{m},{k}]x[{n},{k}]: {err:.3e}");
    }
}

#[test]
fn device_memory_is_metered_with_frees() {
    let Some(dev) = device("device_memory_is_metered_with_frees") else {
        return;
    };
    let base = dev.live_bytes();
    dev.reset_peak();
    {
        let _a = dev.zeros::<f32>(1 << 20).unwrap();
        let _b = dev.zeros::<u8>(1000).unwrap();
        assert_eq!(dev.live_bytes(), base + (4 << 20) + 1000);
    }
    assert_eq!(dev.live_bytes(), base);
    let _c = dev.zeros::<f32>(10).unwrap();
    assert_eq!(dev.peak_bytes(), base + (4 << 20) + 1000);
}

/// Freed buffers stay in the stream-ordered memory pool across synchronizations (a steady-state
/// step maps no new memory) until `release_cached` hands them back.
#[test]
fn freed_memory_stays_cached_until_released() {
    let Some(dev) = device("freed_memory_stays_cached_until_released") else {
        return;
    };
    const BIG: usize = 512 << 20;
    dev.release_cached().unwrap();
    let (free0, _) = dev.mem_info().unwrap();
    drop(dev.zeros::<u8>(BIG).unwrap());
    dev.synchronize().unwrap();
    let (free1, _) = dev.mem_info().unwrap();
    assert!(
        free1 + BIG / 2 < free0,
        "not cached: {free0} → {free1} bytes free"
    );
    // The cached block serves the next allocation of that size without new memory.
    drop(dev.zeros::<u8>(BIG).unwrap());
    dev.synchronize().unwrap();
    let (free2, _) = dev.mem_info().unwrap();
    assert!(
        free2 + (64 << 20) > free1,
        "re-mapped: {free1} → {free2} bytes free"
    );
    dev.release_cached().unwrap();
    let (free3, _) = dev.mem_info().unwrap();
    assert!(
        free3 > free2 + BIG / 2,
        "not released: {free2} → {free3} bytes free"
    );
}

#[test]
fn rmsnorm_matches_the_cpu_spec() {
    let Some(dev) = device("rmsnorm_matches_the_cpu_spec") else {
        return;
    };
    let mut rng = StdRng::seed_from_u64(3);
    for (rows, dim) in [(1, 64), (3, 96), (17, 200), (5, 4096)] {
        let x = rvec(&mut rng, rows * dim, 2.0);
        let w = rvec(&mut rng, dim, 1.5);
        let mut want = vec![0f32; rows * dim];
        qlora::backend::cpu::rmsnorm(&mut want, &x, &w, dim, 1e-5);
        let (xd, wd) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
        let mut out = dev.zeros::<f32>(rows * dim).unwrap();
        qlora::backend::cuda::rmsnorm::rmsnorm(&dev, &mut out, &xd, &wd, rows, dim, 1e-5).unwrap();
        let got = dev.download(&out).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                "[{rows}, {dim}]: {g} vs {w}"
            );
        }
    }
}

#[test]
fn out_of_memory_names_the_amount() {
    let Some(dev) = device("out_of_memory_names_the_amount") else {
        return;
    };
    let (_, total) = dev.mem_info().unwrap();
    let Err(err) = dev.zeros::<f32>(total) else {
        panic!("allocating four times the device memory succeeded");
    };
    let msg = err.to_string();
    assert!(
        msg.contains("out of device memory") && msg.contains("MiB"),
        "{msg}"
    );
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1e-6f32, |a, v| a.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
    assert!(err / scale <= tol, "{what}: relative error {}", err / scale);
}

#[test]
fn backend_ops_match_the_cpu_spec() {
    use qlora::backend::cpu::CpuBackend;
    use qlora::backend::cuda::backend::{CudaBackend, CudaLinear};
    use qlora::backend::{AttnShape, Backend, HostLinear, LoraShape};
    let Ok(g) = CudaBackend::new(0) else {
        eprintln!("skipping backend_ops_match_the_cpu_spec: no usable CUDA device");
        return;
    };
    let mut g = g;
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(4);
    // NF4 prefill on each path: the fused GEMM and the bf16 baseline agree with the bf16 spec,
    // dequantize + sgemm with the f32 CPU product; k = 200 is not a multiple of 16, so the fused
    // path falls back to sgemm there.
    for (m, k, n) in [(17, 96, 33), (9, 200, 64), (70, 64, 40)] {
        use qlora::backend::cuda::backend::Prefill;
        let w = rvec(&mut rng, n * k, 0.5);
        let x = rvec(&mut rng, m * k, 1.0);
        let t = quantize_nf4(&w, &[n, k], 64, true).unwrap();
        let mut exact = vec![0f32; m * n];
        nf4_matmul_wt(&mut exact, &x, &t, m);
        let mut bf = vec![0f32; m * n];
        qlora::backend::cpu::nf4_gemm_bf16(&mut bf, &x, &t, m, false);
        let lg = g.linear(HostLinear::Nf4(t)).unwrap();
        for mode in [
            Prefill::Fused,
            Prefill::DequantCublasBf16,
            Prefill::DequantSgemm,
        ] {
            g.prefill = mode;
            let mut yg = g.zeros(m * n).unwrap();
            g.matmul(&mut yg, &g.upload(&x).unwrap(), &lg, m).unwrap();
            let bf16_path =
                mode == Prefill::DequantCublasBf16 || (mode == Prefill::Fused && k % 16 == 0);
            let want = if bf16_path { &bf } else { &exact };
            close(
                &format!("nf4 matmul {mode:?} [{m},{k}]x[{n},{k}]"),
                &g.download(&yg).unwrap(),
                want,
                1e-5,
            );
        }
    }
    g.prefill = Default::default();
    // Dense matmul (cuBLAS) and NF4 GEMV / prefill against the f32 CPU backend, odd shapes.
    for (m, k, n) in [(1, 64, 3), (17, 96, 33), (9, 200, 64)] {
        let w = rvec(&mut rng, n * k, 0.5);
        let x = rvec(&mut rng, m * k, 1.0);
        for host in [
            HostLinear::Dense {
                rows: n,
                cols: k,
                data: w.clone(),
            },
            HostLinear::Nf4(quantize_nf4(&w, &[n, k], 64, true).unwrap()),
        ] {
            let nf4 = matches!(host, HostLinear::Nf4(_));
            let (lc, lg) = (c.linear(host.clone()).unwrap(), g.linear(host).unwrap());
            let mut yc = c.zeros(m * n).unwrap();
            c.matmul(&mut yc, &x, &lc, m).unwrap();
            let mut yg = g.zeros(m * n).unwrap();
            g.matmul(&mut yg, &g.upload(&x).unwrap(), &lg, m).unwrap();
            // The fused NF4 prefill rounds its inputs to bf16 (exactness checked above).
            let tol = if nf4 && m > 8 && k % 16 == 0 {
                2e-2
            } else {
                1e-5
            };
            close(
                &format!("matmul [{m},{k}]x[{n},{k}]"),
                &g.download(&yg).unwrap(),
                &yc,
                tol,
            );
        }
    }
    // RoPE, attention (GQA, prefix), SwiGLU, add, embedding, cross-entropy, LoRA term.
    let (t, h, kv, d, pos0) = (7, 4, 2, 64, 4093);
    let cap = pos0 + t;
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / d as f32))
        .collect();
    let pos: Vec<u32> = (pos0 as u32..cap as u32).collect();
    let mut qc = rvec(&mut rng, t * h * d, 1.0);
    let mut qg = g.upload(&qc).unwrap();
    c.rope(&mut qc, &pos, &inv, h, d).unwrap();
    g.rope(&mut qg, &pos, &g.upload(&inv).unwrap(), h, d)
        .unwrap();
    close("rope", &g.download(&qg).unwrap(), &qc, 1e-5);
    // Same positions again (the device copy is reused), then different ones (re-uploaded).
    let pos2: Vec<u32> = (0..t as u32).map(|i| 3 * i + 1).collect();
    for p in [&pos, &pos2, &pos] {
        let mut xc = rvec(&mut rng, t * h * d, 1.0);
        let mut xg = g.upload(&xc).unwrap();
        c.rope(&mut xc, p, &inv, h, d).unwrap();
        g.rope(&mut xg, p, &g.upload(&inv).unwrap(), h, d).unwrap();
        close(
            "rope (positions cache)",
            &g.download(&xg).unwrap(),
            &xc,
            1e-5,
        );
    }
    // The device cache is bf16: the CPU reference reads the same rounded values.
    let bf =
        |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(qlora::backend::cpu::bf16_round).collect() };
    let (kf, vf) = (
        rvec(&mut rng, cap * kv * d, 1.0),
        rvec(&mut rng, cap * kv * d, 1.0),
    );
    let (kc, vc) = (bf(kf.clone()), bf(vf.clone()));
    let s = AttnShape {
        batch: 1,
        q_len: t,
        pos0,
        cache_cap: cap,
        heads: h,
        kv_heads: kv,
        head_dim: d,
    };
    let mut oc = c.zeros(t * h * d).unwrap();
    c.attention(&mut oc, &qc, &kc, &vc, s).unwrap();
    let mut og = g.zeros(t * h * d).unwrap();
    let (mut kg, mut vg) = (g.kv_new(kf.len()).unwrap(), g.kv_new(vf.len()).unwrap());
    g.kv_write(&mut kg, 0, &g.upload(&kf).unwrap(), kf.len())
        .unwrap();
    g.kv_write(&mut vg, 0, &g.upload(&vf).unwrap(), vf.len())
        .unwrap();
    g.attention(&mut og, &g.upload(&qc).unwrap(), &kg, &vg, s)
        .unwrap();
    // Same bf16 values on both sides; f32 sums in another order (splits, combine) and fast-math
    // expf: the bound of src/check/decode_attention.rs.
    close("attention", &g.download(&og).unwrap(), &oc, 1e-4);
    let (a, b) = (rvec(&mut rng, 301, 3.0), rvec(&mut rng, 301, 3.0));
    let mut sc = c.zeros(301).unwrap();
    c.swiglu(&mut sc, &a, &b, 301).unwrap();
    let mut sg = g.zeros(301).unwrap();
    g.swiglu(&mut sg, &g.upload(&a).unwrap(), &g.upload(&b).unwrap(), 301)
        .unwrap();
    close("swiglu", &g.download(&sg).unwrap(), &sc, 1e-5);
    let mut ag = g.upload(&a).unwrap();
    g.add_assign(&mut ag, &g.upload(&b).unwrap(), 301).unwrap();
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(g.download(&ag).unwrap(), sum);
    // Embedding tables in f32 (kept f32 on the device) and exactly bf16 / f16 (kept 16-bit).
    let table = rvec(&mut rng, 50 * 24, 1.0);
    let bf: Vec<f32> = table
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    let hf: Vec<f32> = table
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    let ids = [3u32, 49, 0, 7, 7];
    for (name, t, sixteen) in [
        ("f32", &table, false),
        ("bf16", &bf, true),
        ("f16", &hf, true),
    ] {
        let dense = || HostLinear::Dense {
            rows: 50,
            cols: 24,
            data: t.clone(),
        };
        let mut ec = c.zeros(5 * 24).unwrap();
        c.embedding(&mut ec, &c.linear(dense()).unwrap(), &ids, 24)
            .unwrap();
        let gl = g.linear(dense()).unwrap();
        assert_eq!(matches!(gl, CudaLinear::Half(_)), sixteen, "{name} table");
        let mut eg = g.zeros(5 * 24).unwrap();
        g.embedding(&mut eg, &gl, &ids, 24).unwrap();
        assert_eq!(g.download(&eg).unwrap(), ec, "{name} embedding");
    }
    let logits = rvec(&mut rng, 3 * 1000, 8.0);
    let targets = [5, -100, 999];
    let mut lc = c.zeros(3).unwrap();
    c.cross_entropy(&mut lc, &logits, &targets, 1000).unwrap();
    let mut lg = g.zeros(3).unwrap();
    g.cross_entropy(&mut lg, &g.upload(&logits).unwrap(), &targets, 1000)
        .unwrap();
    close("cross_entropy", &g.download(&lg).unwrap(), &lc, 1e-5);
    let sh = LoraShape {
        rows: 5,
        in_features: 40,
        out_features: 24,
        rank: 4,
    };
    let (x, la, lb) = (
        rvec(&mut rng, 200, 1.0),
        rvec(&mut rng, 160, 0.3),
        rvec(&mut rng, 96, 0.3),
    );
    let mut yc = rvec(&mut rng, 120, 1.0);
    let mut yg = g.upload(&yc).unwrap();
    let mut xac = c.zeros(20).unwrap();
    c.lora_forward_add(&mut yc, &mut xac, &x, None, &la, &lb, 2.0, sh)
        .unwrap();
    let mut xag = g.zeros(20).unwrap();
    let (xd, ad, bd) = (
        g.upload(&x).unwrap(),
        g.upload(&la).unwrap(),
        g.upload(&lb).unwrap(),
    );
    g.lora_forward_add(&mut yg, &mut xag, &xd, None, &ad, &bd, 2.0, sh)
        .unwrap();
    // The device rounds the LoRA operands to bf16 (2⁻⁹ relative each; the README's mixed-precision
    // policy): the added term is off by ~3e-3 of y's scale. `check_lora` bounds it tightly
    // against a bf16 emulation.
    close("lora_forward_add", &g.download(&yg).unwrap(), &yc, 1e-2);
}

/// The f32 fixture keeps dense weights in f32 on the device; the bf16 one (bf16 checkpoint)
/// puts embeddings-sized dense weights (lm_head) in bf16 storage.
#[test]
fn tiny_model_on_cuda_matches_the_cpu() {
    for fixture in ["gqa", "gqa-bf16"] {
        tiny_model_matches(fixture);
    }
}

fn tiny_model_matches(fixture: &str) {
    use qlora::backend::cpu::CpuBackend;
    use qlora::backend::cuda::backend::{CudaBackend, Prefill};
    use qlora::backend::Backend;
    use qlora::model::{BaseQuant, Logits};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(fixture);
    // The reference: the CPU spec with the device's bf16 KV cache (the same cached values).
    let cpu = qlora::loader::load_model_dir(&dir, CpuBackend::with_bf16_kv_cache(), BaseQuant::NF4)
        .unwrap()
        .model;
    // And the f32 specification, to bound what the bf16 cache itself changes.
    let f32_cpu = qlora::loader::load_model_dir(&dir, CpuBackend::new(), BaseQuant::NF4)
        .unwrap()
        .model;
    let ids: Vec<u32> = (0..23)
        .map(|i| (i * 53 % cpu.cfg.vocab_size) as u32)
        .collect();
    let v = cpu.cfg.vocab_size;
    let mut cc = cpu.new_cache(ids.len() + 8).unwrap();
    let lc = cpu.forward(&ids, &mut cc, Logits::All).unwrap();
    let targets: Vec<i32> = ids[1..].iter().map(|&t| t as i32).chain([-100]).collect();
    let loss = |logits: &[f32]| -> f64 {
        let mut l = vec![0f32; ids.len()];
        qlora::backend::cpu::cross_entropy(&mut l, logits, &targets, v);
        l.iter().map(|&x| x as f64).sum::<f64>() / (ids.len() - 1) as f64
    };
    let want_loss = loss(&lc);
    // The bf16 cache's own effect (CPU f32 cache vs CPU bf16 cache; keys and values carry a
    // relative rounding ≤ 2⁻⁹ each): measured 6.8e-3 / 8.6e-3 of the logits' scale and a loss
    // change of 1.1e-4 / 1.3e-5 on the two fixtures, greedy tokens unchanged.
    let mut fc = f32_cpu.new_cache(ids.len() + 8).unwrap();
    let lf = f32_cpu.forward(&ids, &mut fc, Logits::All).unwrap();
    close("bf16 KV cache vs f32 (CPU)", &lc, &lf, 2e-2);
    assert!((loss(&lf) - want_loss).abs() <= 2e-3 * want_loss);
    // Against the bf16-cache spec: f32 prefill (dequantize + sgemm) is exact up to summation
    // order and fast-math expf in attention; the default fused bf16 GEMM rounds its operands.
    for (mode, logit_tol, loss_tol) in [
        (Prefill::DequantSgemm, 1e-4, 1e-5),
        (Prefill::Fused, 2e-2, 5e-3),
    ] {
        let Ok(mut g) = CudaBackend::new(0) else {
            eprintln!("skipping tiny_model_on_cuda_matches_the_cpu: no usable CUDA device");
            return;
        };
        g.prefill = mode;
        let gpu = qlora::loader::load_model_dir(&dir, g, BaseQuant::NF4)
            .unwrap()
            .model;
        let mut gc = gpu.new_cache(ids.len() + 8).unwrap();
        let lg = gpu
            .backend
            .download(&gpu.forward(&ids, &mut gc, Logits::All).unwrap())
            .unwrap();
        close(&format!("prefill logits ({mode:?})"), &lg, &lc, logit_tol);
        let got_loss = loss(&lg);
        eprintln!("  {fixture} {mode:?}: loss {got_loss:.6} vs CPU {want_loss:.6}");
        assert!(
            (got_loss - want_loss).abs() <= loss_tol * want_loss,
            "{mode:?}: loss {got_loss} vs {want_loss}"
        );
        // Greedy decoding: the same 8 tokens.
        let mut cc = cpu.new_cache(ids.len() + 8).unwrap();
        cpu.forward(&ids, &mut cc, Logits::Last).unwrap();
        let mut tc = qlora::generate::argmax(&lc[lc.len() - v..]);
        let mut tg = qlora::generate::argmax(&lg[lg.len() - v..]);
        for _ in 0..8 {
            assert_eq!(tc, tg, "{mode:?}: greedy tokens differ");
            let a = cpu.forward(&[tc], &mut cc, Logits::Last).unwrap();
            let b = gpu
                .backend
                .download(&gpu.forward(&[tg], &mut gc, Logits::Last).unwrap())
                .unwrap();
            tc = qlora::generate::argmax(&a);
            tg = qlora::generate::argmax(&b);
        }
        let peak = gpu.backend.device_memory_peak().unwrap();
        assert!(peak > 0 && peak >= gpu.backend.dev.live_bytes());
    }
}

#[test]
fn half_weights_are_lossless_and_match_the_cpu() {
    use qlora::backend::cuda::backend::{CudaBackend, CudaLinear};
    use qlora::backend::cuda::dense_half::DeviceHalf;
    use qlora::backend::{Backend, HostLinear};
    let Ok(g) = CudaBackend::new(0) else {
        eprintln!("skipping half_weights_are_lossless_and_match_the_cpu: no usable CUDA device");
        return;
    };
    let mut rng = StdRng::seed_from_u64(8);
    let (n, k) = (37, 136);
    let raw = rvec(&mut rng, n * k, 0.5);
    let bf: Vec<f32> = raw
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect();
    // f16-exact values that bf16 cannot hold (11 significant bits).
    let hf: Vec<f32> = raw
        .iter()
        .map(|v| half::f16::from_f32(*v).to_f32())
        .collect();
    assert!(hf.iter().any(|v| half::bf16::from_f32(*v).to_f32() != *v));
    for (data, want_kind) in [(&bf, Some(false)), (&hf, Some(true)), (&raw, None)] {
        let h = DeviceHalf::lossless(&g.dev, n, k, data).unwrap();
        assert_eq!(h.as_ref().map(|h| h.f16), want_kind);
        let lin = g
            .linear(HostLinear::Dense {
                rows: n,
                cols: k,
                data: data.clone(),
            })
            .unwrap();
        assert_eq!(matches!(lin, CudaLinear::Half(_)), want_kind.is_some());
        for m in [1, 5, 8, 21] {
            let x = rvec(&mut rng, m * k, 1.0);
            let mut yg = g.zeros(m * n).unwrap();
            g.matmul(&mut yg, &g.upload(&x).unwrap(), &lin, m).unwrap();
            let got = g.download(&yg).unwrap();
            // Decode (m ≤ 8) is exact f32 math; prefill rounds x to the weight's 16-bit format.
            let xr: Vec<f32> = match (m > 8, want_kind) {
                (true, Some(false)) => x
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_f32())
                    .collect(),
                (true, Some(true)) => x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect(),
                _ => x.clone(),
            };
            let mut want = vec![0f32; m * n];
            qlora::backend::cpu::matmul_wt(&mut want, &xr, data, m, k, n);
            close(
                &format!("16-bit weight {want_kind:?} m {m}"),
                &got,
                &want,
                1e-5,
            );
        }
    }
}

#[test]
fn matmul_add_fuses_the_residual_on_every_path() {
    use qlora::backend::cpu::CpuBackend;
    use qlora::backend::cuda::backend::{CudaBackend, Prefill};
    use qlora::backend::{Backend, HostLinear};
    let Ok(mut g) = CudaBackend::new(0) else {
        eprintln!("skipping matmul_add_fuses_the_residual_on_every_path: no usable CUDA device");
        return;
    };
    let c = CpuBackend::new();
    let mut rng = StdRng::seed_from_u64(9);
    let (n, k) = (45, 128);
    let w = rvec(&mut rng, n * k, 0.5);
    let wb: Vec<f32> = w
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect();
    let hosts = [
        HostLinear::Dense {
            rows: n,
            cols: k,
            data: w.clone(),
        },
        HostLinear::Dense {
            rows: n,
            cols: k,
            data: wb,
        },
        HostLinear::Nf4(quantize_nf4(&w, &[n, k], 64, true).unwrap()),
    ];
    for host in hosts {
        let lc = c.linear(host.clone()).unwrap();
        let lg = g.linear(host).unwrap();
        for mode in [
            Prefill::Fused,
            Prefill::DequantCublasBf16,
            Prefill::DequantSgemm,
        ] {
            g.prefill = mode;
            for m in [3, 8, 20, 70] {
                let x = rvec(&mut rng, m * k, 1.0);
                let y0 = rvec(&mut rng, m * n, 2.0);
                // Reference: the same backend's plain matmul, plus y0 (so bf16 paths compare
                // like with like), and the CPU's matmul_add (the default impl) at bf16 tolerance.
                let xd = g.upload(&x).unwrap();
                let mut plain = g.zeros(m * n).unwrap();
                g.matmul(&mut plain, &xd, &lg, m).unwrap();
                let want: Vec<f32> = g
                    .download(&plain)
                    .unwrap()
                    .iter()
                    .zip(&y0)
                    .map(|(a, b)| a + b)
                    .collect();
                let mut yd = g.upload(&y0).unwrap();
                g.matmul_add(&mut yd, &xd, &lg, m).unwrap();
                let got = g.download(&yd).unwrap();
                close(&format!("matmul_add {mode:?} m {m}"), &got, &want, 1e-6);
                let mut yc = y0.clone();
                c.matmul_add(&mut yc, &x, &lc, m).unwrap();
                close(
                    &format!("matmul_add vs cpu {mode:?} m {m}"),
                    &got,
                    &yc,
                    2e-2,
                );
            }
        }
    }
}

// ---- Training ops: the checks `qlora check` runs (src/check/), one test per group. ----

fn cuda_backend(test: &str) -> Option<qlora::backend::cuda::backend::CudaBackend> {
    match qlora::backend::cuda::backend::CudaBackend::new(0) {
        Ok(b) => {
            eprintln!("{test}: running on {}", qlora::backend::Backend::name(&b));
            Some(b)
        }
        Err(e) => {
            eprintln!("skipping {test}: no usable CUDA device ({e})");
            None
        }
    }
}

/// Prints the rows as `qlora check` does and fails on any row that is not ok (or on none).
fn assert_checks(test: &str, rows: Vec<qlora::check::CheckRow>) {
    assert!(!rows.is_empty(), "{test}: the check produced no rows");
    for r in &rows {
        eprintln!(
            "{test}: {:<48} {:>10.3e} {:>10.3e} {}",
            r.op,
            r.max_err,
            r.bound,
            if r.ok { "ok" } else { "FAIL" }
        );
    }
    let bad: Vec<_> = rows.iter().filter(|r| !r.ok).map(|r| &r.op).collect();
    assert!(bad.is_empty(), "{test}: failing checks {bad:?}");
}

macro_rules! check_test {
    ($name:ident, $module:ident) => {
        #[test]
        fn $name() {
            let Some(be) = cuda_backend(stringify!($name)) else {
                return;
            };
            let rows = qlora::check::rows_or_failure(stringify!($module), || {
                qlora::check::$module::run(&be)
            });
            assert_checks(stringify!($name), rows);
        }
    };
}

check_test!(check_training_ops, ops);
check_test!(check_lora, lora);
check_test!(check_lora_decode, lora_decode);
check_test!(check_nf4_dx, nf4_dx);
check_test!(check_flash_attention, attention);
check_test!(check_decode_attention, decode_attention);
check_test!(check_adamw, adamw);
check_test!(check_adamw8, adam8);
check_test!(check_training_step, model);
check_test!(check_sample, sample);
check_test!(check_decode_step, decode_step);

/// `generate` on the device (sampling in `kernels/sample.cu`) against the CPU on the tiny
/// fixture: greedy must give the CPU's tokens; a seeded sampled run must repeat itself exactly
/// and, where the logits agree, give the CPU's tokens (the agreement is printed: a token whose
/// cumulative probability lies within f32 rounding of the uniform may differ, see
/// src/check/sample.rs).
#[test]
fn generate_samples_on_the_device_like_the_cpu() {
    use qlora::backend::cpu::CpuBackend;
    use qlora::backend::cuda::backend::Prefill;
    use qlora::generate::{generate, Sampling};
    use qlora::model::BaseQuant;
    let Some(mut g) = cuda_backend("generate_samples_on_the_device_like_the_cpu") else {
        return;
    };
    g.prefill = Prefill::DequantSgemm;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/gqa");
    let cpu = qlora::loader::load_model_dir(&dir, CpuBackend::new(), BaseQuant::NF4)
        .unwrap()
        .model;
    let gpu = qlora::loader::load_model_dir(&dir, g, BaseQuant::NF4)
        .unwrap()
        .model;
    // The prompt and length of tiny_model_on_cuda_matches_the_cpu's greedy decode.
    let prompt: Vec<u32> = (0..23)
        .map(|i| (i * 53 % cpu.cfg.vocab_size) as u32)
        .collect();
    let on_cpu = |s: &Sampling| generate(&cpu, &prompt, 8, s, &[], |_| Ok(())).unwrap().ids;
    let on_gpu = |s: &Sampling| generate(&gpu, &prompt, 8, s, &[], |_| Ok(())).unwrap().ids;
    assert_eq!(
        on_gpu(&Sampling::GREEDY),
        on_cpu(&Sampling::GREEDY),
        "greedy tokens differ"
    );
    let s = Sampling {
        temperature: 0.9,
        top_k: 20,
        top_p: 0.95,
        seed: 1234,
    };
    let (a, b, c) = (on_gpu(&s), on_gpu(&s), on_cpu(&s));
    assert_eq!(a, b, "a seeded device run did not repeat itself");
    assert!(a.iter().all(|&t| (t as usize) < cpu.cfg.vocab_size));
    let same = a.iter().zip(&c).take_while(|(x, y)| x == y).count();
    eprintln!(
        "sampled: device {a:?}\n         cpu    {c:?}\n         first {same} of {} agree",
        a.len()
    );
}

/// Zero-row calls succeed on the CPU, so they must on the GPU (an empty batch, an empty prompt).
#[test]
fn zero_row_calls_match_the_cpu() {
    use qlora::backend::{Backend, HostLinear};
    let Some(be) = cuda_backend("zero_row_calls_match_the_cpu") else {
        return;
    };
    let (n, k) = (64, 96);
    let w = (0..n * k)
        .map(|i| (i as f32 * 0.01).sin())
        .collect::<Vec<_>>();
    let nf4 = quantize_nf4(&w, &[n, k], 64, true).unwrap();
    let dense = HostLinear::Dense {
        rows: n,
        cols: k,
        data: w.clone(),
    };
    let half: Vec<f32> = w
        .iter()
        .map(|&v| qlora::backend::cpu::bf16_round(v))
        .collect();
    let half = HostLinear::Dense {
        rows: n,
        cols: k,
        data: half,
    };
    let x = be.zeros(k).unwrap();
    for lin in [HostLinear::Nf4(nf4), dense, half] {
        let l = be.linear(lin).unwrap();
        let mut y = be.zeros(n).unwrap();
        be.matmul(&mut y, &x, &l, 0).unwrap();
        be.matmul_add(&mut y, &x, &l, 0).unwrap();
    }
    let table = be
        .linear(HostLinear::Dense {
            rows: n,
            cols: k,
            data: w.clone(),
        })
        .unwrap();
    let mut out = be.zeros(k).unwrap();
    be.embedding(&mut out, &table, &[], k).unwrap();
    let mut losses = be.zeros(1).unwrap();
    be.cross_entropy(&mut losses, &x, &[], k).unwrap();
}

/// The whole training step on the tiny fixtures (f32, bf16 and NF4 bases; dropout 0 and 0.1)
/// against the CPU, with the bounds of `qlora::check::model`.
#[test]
fn training_step_on_fixtures_matches_cpu() {
    use qlora::backend::cpu::CpuBackend;
    use qlora::check::model::{compare_step, full_adapter, test_ids};
    use qlora::model::BaseQuant;
    let Some(be) = cuda_backend("training_step_on_fixtures_matches_cpu") else {
        return;
    };
    drop(be);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let nf4 = BaseQuant::NF4;
    let cases = [
        ("tiny/gqa", BaseQuant::None),
        ("tiny/gqa-bf16", BaseQuant::None),
        ("tiny/gqa", nf4),
        ("bnb/gqa-qlora-nf4", BaseQuant::None),
        ("tiny/tied", nf4),
    ];
    let mut rows = Vec::new();
    for (dir, quant) in cases {
        for dropout in [0.0, 0.1] {
            let load = |b| qlora::loader::load_model_dir(&root.join(dir), b, quant);
            let mut cpu = load(CpuBackend::new()).unwrap().model;
            let gpu_be = qlora::backend::cuda::backend::CudaBackend::new(0).unwrap();
            let mut gpu = qlora::loader::load_model_dir(&root.join(dir), gpu_be, quant)
                .unwrap()
                .model;
            let (lc, w) = full_adapter(&cpu.cfg, dropout, 4).unwrap();
            let ids = test_ids(61, cpu.cfg.vocab_size, 8);
            let tag = format!("{dir} {quant:?} p{dropout}");
            rows.extend(compare_step(&mut cpu, &mut gpu, &lc, &w, &ids, &tag).unwrap());
        }
    }
    assert_checks("training_step_on_fixtures_matches_cpu", rows);
}

check_test!(check_nf4_quantize, quantize);
