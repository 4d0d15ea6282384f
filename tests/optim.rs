//! AdamW, gradient clipping and lr schedules against PyTorch / transformers references
//! (`tests/fixtures/peft/adamw.json`, `schedules.json`, written by `scripts/fixtures_peft.py`).

use qlora::train::{
    clip_grad_norm, grad_norm, warmup_from_ratio, AdamParamState, AdamW, AdamWState, LrSchedule,
    ScheduleKind,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs().max(1e-30);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g:e}, want {w:e} (|diff| {:e} > {tol:e})",
            (g - w).abs()
        );
    }
}

#[test]
fn adamw_matches_torch_for_five_steps() {
    let fx = fixture("adamw.json");
    let h = &fx["hyper"];
    let opt = AdamW {
        lr: h["lr"].as_f64().unwrap(),
        beta1: h["beta1"].as_f64().unwrap(),
        beta2: h["beta2"].as_f64().unwrap(),
        eps: h["eps"].as_f64().unwrap(),
        weight_decay: h["weight_decay"].as_f64().unwrap(),
    };
    opt.validate().unwrap();
    let mut params: Vec<Vec<f32>> = fx["params0"].as_array().unwrap().iter().map(f32s).collect();
    let mut states: Vec<AdamParamState> = params
        .iter()
        .map(|p| AdamParamState::new(p.len()))
        .collect();
    let mut max_rel = 0f32;
    for (step, grads) in fx["grads"].as_array().unwrap().iter().enumerate() {
        for (i, g) in grads.as_array().unwrap().iter().enumerate() {
            opt.step(&mut params[i], &f32s(g), &mut states[i]);
            let want = f32s(&fx["params"][step][i]);
            for (a, b) in params[i].iter().zip(&want) {
                max_rel = max_rel.max((a - b).abs() / b.abs().max(1e-30));
            }
            assert_close(&params[i], &want, 1e-6, &format!("step {step} param {i}"));
        }
    }
    eprintln!("AdamW max relative difference to torch: {max_rel:e}");
    assert!(max_rel <= 2.5e-7, "max relative difference {max_rel:e}");
    for (i, s) in states.iter().enumerate() {
        assert_eq!(s.step as f64, fx["step"][i].as_f64().unwrap());
        assert_close(&s.m, &f32s(&fx["exp_avg"][i]), 1e-5, "exp_avg");
        assert_close(&s.v, &f32s(&fx["exp_avg_sq"][i]), 1e-5, "exp_avg_sq");
    }
}

#[test]
fn adamw_first_step_is_sign_times_lr() {
    // With zero state, step 1 moves each coordinate by ≈ lr·sign(g) (|g| ≫ eps), after decay.
    let opt = AdamW {
        lr: 0.01,
        weight_decay: 0.0,
        ..AdamW::default()
    };
    let mut p = vec![1.0f32, -2.0, 3.0, 0.5];
    let g = [0.3f32, -5.0, 1e-3, 0.0];
    let mut s = AdamParamState::new(4);
    opt.step(&mut p, &g, &mut s);
    assert!((p[0] - 0.99).abs() < 1e-6);
    assert!((p[1] + 1.99).abs() < 1e-6);
    assert!((p[2] - 2.99).abs() < 1e-5);
    assert_eq!(p[3], 0.5, "zero gradient, zero state: no move");
    assert_eq!(s.step, 1);

    // Decoupled weight decay alone: a zero gradient shrinks p by (1 − lr·wd).
    let opt = AdamW {
        lr: 0.1,
        weight_decay: 0.5,
        ..AdamW::default()
    };
    let mut p = vec![2.0f32];
    opt.step(&mut p, &[0.0], &mut AdamParamState::new(1));
    assert_eq!(p[0], 2.0 * 0.95f32);
}

#[test]
fn adamw_rejects_bad_hyperparameters() {
    for bad in [
        AdamW {
            lr: -1.0,
            ..AdamW::default()
        },
        AdamW {
            beta1: 1.0,
            ..AdamW::default()
        },
        AdamW {
            beta2: f64::NAN,
            ..AdamW::default()
        },
        AdamW {
            weight_decay: -0.1,
            ..AdamW::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

#[test]
fn adamw_state_round_trips_bit_exactly() {
    let opt = AdamW::default();
    let mut st = AdamWState::new();
    let mut pa = vec![0.25f32; 10];
    let mut pb = vec![-1.5f32; 3];
    for k in 0..3 {
        let ga: Vec<f32> = (0..10).map(|i| ((i * 7 + k) as f32).sin()).collect();
        let gb: Vec<f32> = (0..3).map(|i| ((i + k) as f32).cos() * 1e-3).collect();
        opt.step(&mut pa, &ga, st.entry("a.lora_A.weight", 10));
        if k > 0 {
            opt.step(&mut pb, &gb, st.entry("b.lora_B.weight", 3));
        }
    }
    let bytes = st.state_bytes().unwrap();
    let back = AdamWState::from_bytes(&bytes, Path::new("mem")).unwrap();
    assert_eq!(back.params.len(), 2);
    for (name, s) in &st.params {
        let b = &back.params[name];
        assert_eq!(b.step, s.step);
        assert_eq!(
            b.m.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            s.m.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            b.v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            s.v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    assert_eq!(back.params["a.lora_A.weight"].step, 3);
    assert_eq!(back.params["b.lora_B.weight"].step, 2);
    assert_eq!(st.nbytes(), 8 * 13);

    // Through a file, and a continued step gives identical parameters.
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("optimizer.safetensors");
    st.save(&path).unwrap();
    let mut restored = AdamWState::load(&path).unwrap();
    let g = vec![0.1f32; 10];
    let (mut p1, mut p2) = (pa.clone(), pa.clone());
    opt.step(&mut p1, &g, st.entry("a.lora_A.weight", 10));
    opt.step(&mut p2, &g, restored.entry("a.lora_A.weight", 10));
    assert_eq!(p1, p2);

    // Not a state file.
    let err = AdamWState::from_bytes(b"garbage", Path::new("x.bin")).unwrap_err();
    assert!(err.to_string().contains("x.bin"), "{err}");
}

#[test]
fn clip_grad_norm_matches_torch() {
    let fx = fixture("adamw.json");
    let c = &fx["clip"];
    let mut g: Vec<Vec<f32>> = c["grads"].as_array().unwrap().iter().map(f32s).collect();
    let max_norm = c["max_norm"].as_f64().unwrap() as f32;
    let mut refs: Vec<&mut [f32]> = g.iter_mut().map(|v| v.as_mut_slice()).collect();
    let total = clip_grad_norm(&mut refs, max_norm);
    let want = c["total_norm"].as_f64().unwrap() as f32;
    assert!((total - want).abs() <= 1e-6 * want, "{total} vs {want}");
    for (i, gi) in g.iter().enumerate() {
        assert_close(gi, &f32s(&c["clipped"][i]), 1e-6, "clipped");
    }
}

#[test]
fn clip_grad_norm_hand_computed() {
    // Norms 5 (3,4) and 12 (12) and 0: total √(25 + 144) = 13; coefficient 1 / (13 + 1e-6).
    let mut a = vec![3.0f32, 4.0];
    let mut b = vec![0.0f32, 12.0, 0.0];
    let mut c: Vec<f32> = vec![];
    let total = clip_grad_norm(&mut [&mut a[..], &mut b[..], &mut c[..]], 1.0);
    assert_eq!(total, 13.0);
    let coef = 1.0f32 / (13.0f32 + 1e-6);
    assert_eq!(a, vec![3.0 * coef, 4.0 * coef]);
    assert_eq!(b, vec![0.0, 12.0 * coef, 0.0]);
    assert!((grad_norm([&a[..], &b[..]]) - 1.0).abs() < 1e-6);

    // Below the threshold: untouched (torch multiplies by the clamped coefficient 1).
    let mut a = vec![0.3f32, 0.4];
    let before = a.clone();
    let total = clip_grad_norm(&mut [&mut a[..]], 1.0);
    assert!((total - 0.5).abs() < 1e-7);
    assert_eq!(a, before);
}

#[test]
fn schedules_match_transformers() {
    let fx = fixture("schedules.json");
    let base_lr = fx["base_lr"].as_f64().unwrap();
    let mut n = 0;
    for case in fx["schedules"].as_array().unwrap() {
        let kind: ScheduleKind = case["kind"].as_str().unwrap().parse().unwrap();
        let s = LrSchedule {
            kind,
            base_lr,
            warmup_steps: case["warmup_steps"].as_u64().unwrap() as usize,
            total_steps: case["total_steps"].as_u64().unwrap() as usize,
        };
        for (k, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = s.lr_at(k);
            assert!(
                (got - want).abs() <= 1e-15 * want.abs().max(1e-300) || got == want,
                "{s:?} step {k}: got {got:e}, want {want:e}"
            );
            n += 1;
        }
    }
    assert!(n > 100);
    for case in fx["warmup_from_ratio"].as_array().unwrap() {
        let got = warmup_from_ratio(
            case["ratio"].as_f64().unwrap(),
            case["total_steps"].as_u64().unwrap() as usize,
        )
        .unwrap();
        assert_eq!(got as u64, case["warmup_steps"].as_u64().unwrap(), "{case}");
    }
    assert!(warmup_from_ratio(1.5, 10).is_err());
    assert!(warmup_from_ratio(-0.1, 10).is_err());
    assert!("polynomial".parse::<ScheduleKind>().is_err());
    assert_eq!(
        "constant_with_warmup".parse::<ScheduleKind>().unwrap(),
        ScheduleKind::Constant
    );
}

#[test]
fn schedule_shapes() {
    let s = LrSchedule {
        kind: ScheduleKind::Cosine,
        base_lr: 1.0,
        warmup_steps: 10,
        total_steps: 110,
    };
    assert_eq!(s.lr_at(0), 0.0);
    assert_eq!(s.lr_at(5), 0.5);
    assert_eq!(s.lr_at(10), 1.0);
    assert!((s.lr_at(60) - 0.5).abs() < 1e-12);
    assert!(s.lr_at(110) < 1e-12);
    let l = LrSchedule {
        kind: ScheduleKind::Linear,
        ..s
    };
    assert!((l.lr_at(60) - 0.5).abs() < 1e-12);
    assert_eq!(l.lr_at(200), 0.0);
}
