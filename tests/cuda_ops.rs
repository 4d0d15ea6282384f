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
const NF4_CASES: [(usize, usize, usize, bool); 5] = [
    (1, 64, 64, true),
    (3, 200, 64, true),
    (17, 96, 64, false),
    (5, 333, 128, true),
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
            d.gemv(&dev, &mut yd, &xd, m).unwrap();
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
