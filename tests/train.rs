//! `qlora::train::trainer::train` end to end on the CPU with the tiny GQA fixture model and a
//! slice of the real guanaco-llama2-1k data: resume is bit-exact, held-out loss falls, gradient
//! accumulation equals a larger batch, divergence stops cleanly, outputs are protected.

use qlora::backend::cpu::CpuBackend;
use qlora::lora::{load_adapter, LoraWeights};
use qlora::train::config::{EvalData, Resume, TrainConfig, Warmup};
use qlora::train::trainer::{train, Event, TrainSummary};
use qlora::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A small, quick run: 48 guanaco rows cut to 96 tokens, batch 4, all-linear r 4.
fn config(out: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(
        root().join("tests/fixtures/tiny/gqa").to_str().unwrap(),
        root()
            .join("tests/fixtures/guanaco-llama2-1k")
            .to_str()
            .unwrap(),
    );
    c.output = out.to_path_buf();
    c.max_rows = Some(48);
    c.data.max_seq_len = 96;
    c.batch.max_seq_len = 96;
    c.lora.r = 4;
    c.lora.targets = vec!["all-linear".into()];
    c.max_steps = Some(8);
    c.save_steps = 3;
    c.logging_steps = 2;
    c
}

fn run(c: &TrainConfig) -> qlora::Result<TrainSummary> {
    train(c, CpuBackend::new(), &AtomicBool::new(false), &mut |_| {})
}

#[test]
fn interrupted_and_resumed_run_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let full = config(&dir.path().join("full"));
    let a = run(&full).unwrap();
    assert_eq!(a.steps, 8);
    assert!(!a.interrupted);

    // Same run, stopped (as Ctrl-C does) after step 4, then resumed from the latest checkpoint.
    let part = config(&dir.path().join("part"));
    let stop = AtomicBool::new(false);
    let b1 = train(&part, CpuBackend::new(), &stop, &mut |ev| {
        if let Event::Step(s) = ev {
            if s.step == 4 {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    assert!(b1.interrupted);
    assert_eq!(b1.steps, 4);
    assert!(
        part.output.join("checkpoint-4").is_dir(),
        "Ctrl-C saves a checkpoint"
    );
    assert!(
        !part.output.join("adapter_model.safetensors").exists(),
        "an interrupted run writes no final adapter"
    );
    let mut resume = part.clone();
    resume.resume = Some(Resume::Latest);
    let b2 = run(&resume).unwrap();
    assert_eq!(b2.steps, 8);
    // Every per-step loss, bit for bit, and the final adapters byte for byte.
    assert_eq!(a.losses, b2.losses);
    assert_eq!(a.eval_losses, b2.eval_losses);
    let read = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
    assert_eq!(read(&full.output), read(&part.output));
    // metrics.jsonl of the resumed run has the same steps and losses.
    let m = |p: &Path| -> Vec<(usize, f64)> {
        qlora::train::metrics::MetricsLog::read_all(&p.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(|r| (r.step, r.loss))
            .collect()
    };
    assert_eq!(m(&full.output), m(&part.output));
}

#[test]
fn training_lowers_held_out_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("out"));
    c.max_rows = Some(120);
    c.max_steps = Some(40);
    c.save_steps = 100;
    c.optim.lr = 3e-3;
    c.lora.dropout = 0.0;
    c.warmup = Warmup::Steps(2);
    c.eval = EvalData::Split(0.1);
    c.eval_steps = Some(20);
    let s = run(&c).unwrap();
    let (first, last) = (s.eval_losses[0], *s.eval_losses.last().unwrap());
    println!(
        "held-out loss {:.4} (step {}) → {:.4} (step {})",
        first.1, first.0, last.1, last.0
    );
    assert_eq!(first.0, 0, "the baseline is measured before training");
    assert_eq!(last.0, 40);
    assert!(
        last.1 < first.1 - 0.05,
        "held-out loss did not fall: {first:?} → {last:?}"
    );
    let svg = std::fs::read_to_string(c.output.join("loss_curve.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);
    // The final adapter loads back and is the trained one (B no longer zero).
    let cfg = qlora::loader::read_config(&root().join("tests/fixtures/tiny/gqa")).unwrap();
    let (lc, w): (_, LoraWeights) = load_adapter(&c.output, &cfg).unwrap();
    assert_eq!(lc.r, 4);
    assert_eq!(w.modules.len(), 2 * 7);
    assert!(w.modules.values().all(|p| p.b.iter().any(|&v| v != 0.0)));
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    // Batch 4 vs batch 2 × 2 accumulation over the same shuffled order: the same sequences in
    // the same order with the same 1/N scale, so the same losses — up to f32 summation order,
    // since a micro-batch's sequences are packed into one product (4 sequences' rows vs 2).
    let dir = tempfile::tempdir().unwrap();
    let mut a = config(&dir.path().join("a"));
    a.batch.group_by_length = false;
    a.max_steps = Some(4);
    let mut b = a.clone();
    b.output = dir.path().join("b");
    b.batch.batch_size = 2;
    b.grad_accum = 2;
    let (ra, rb) = (run(&a).unwrap(), run(&b).unwrap());
    for ((sa, la), (sb, lb)) in ra.losses.iter().zip(&rb.losses) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-6 * la.abs(),
            "step {sa}: {la} vs {lb}"
        );
    }
}

#[test]
fn divergence_stops_with_a_clear_error_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("out"));
    c.optim.lr = 1e8;
    c.max_grad_norm = 0.0;
    c.warmup = Warmup::Steps(0);
    c.save_steps = 1;
    c.max_steps = Some(50);
    let err = run(&c).unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::Training(_)), "{msg}");
    assert!(
        msg.contains("loss is") || msg.contains("gradient norm is"),
        "{msg}"
    );
    assert!(
        msg.contains("checkpoint-"),
        "names the last good checkpoint: {msg}"
    );
    assert!(!c.output.join("adapter_model.safetensors").exists());
}

#[test]
fn existing_output_is_refused_unless_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("out"));
    c.max_steps = Some(1);
    run(&c).unwrap();
    let before = std::fs::read(c.output.join("adapter_model.safetensors")).unwrap();
    let err = run(&c).unwrap_err().to_string();
    assert!(err.contains("--overwrite") && err.contains("out"), "{err}");
    assert_eq!(
        before,
        std::fs::read(c.output.join("adapter_model.safetensors")).unwrap(),
        "the refused run must not touch the adapter"
    );
    c.overwrite = true;
    c.seed = 7;
    run(&c).unwrap();
    assert_ne!(
        before,
        std::fs::read(c.output.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn unwritable_output_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let c = config(&file.join("out"));
    let err = run(&c).unwrap_err().to_string();
    assert!(err.contains("a-file"), "{err}");
}

#[test]
fn init_adapter_continues_from_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("out"));
    c.init_adapter = Some(root().join("tests/fixtures/peft/gqa-lora"));
    c.lora.r = 16; // ignored: the adapter's config wins
    c.max_steps = Some(2);
    run(&c).unwrap();
    let cfg = qlora::loader::read_config(&root().join("tests/fixtures/tiny/gqa")).unwrap();
    let (lc, _) = load_adapter(&c.output, &cfg).unwrap();
    let (peft, _) = load_adapter(&root().join("tests/fixtures/peft/gqa-lora"), &cfg).unwrap();
    assert_eq!(lc.r, peft.r);
    assert_eq!(lc.target_modules, peft.target_modules);
    assert_eq!(lc.lora_alpha, peft.lora_alpha);
}

#[test]
fn bad_settings_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let base = config(&dir.path().join("out"));
    type Edit = Box<dyn Fn(&mut TrainConfig)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|c| c.lora.r = 0), "--lora-r"),
        (
            Box::new(|c| c.lora.targets = vec!["qq_proj".into()]),
            "qq_proj",
        ),
        (Box::new(|c| c.lora.dropout = 1.0), "--lora-dropout"),
        (Box::new(|c| c.batch.batch_size = 0), "--batch-size"),
        (Box::new(|c| c.eval = EvalData::Split(1.5)), "--eval-split"),
        (Box::new(|c| c.data.max_seq_len = 1), "--max-seq-len"),
    ];
    for (edit, needle) in cases {
        let mut c = base.clone();
        edit(&mut c);
        let err = run(&c).unwrap_err().to_string();
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }
}

#[test]
fn resuming_without_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("out")).unwrap();
    let mut c = config(&dir.path().join("out"));
    c.resume = Some(Resume::Latest);
    let err = run(&c).unwrap_err().to_string();
    assert!(err.contains("no checkpoint"), "{err}");
}

#[test]
fn lm_head_and_tied_embeddings_can_be_adapted() {
    // lm_head on a model with tied embeddings: the adapter sits on the head only.
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("out"));
    c.model = root()
        .join("tests/fixtures/tiny/tied")
        .to_string_lossy()
        .into_owned();
    c.lora.targets = vec!["lm_head".into(), "o_proj".into()];
    c.optim.lr = 1e-2;
    c.max_steps = Some(6);
    let s = run(&c).unwrap();
    assert!(s.losses.iter().all(|l| l.1.is_finite()));
    let cfg = qlora::loader::read_config(&root().join("tests/fixtures/tiny/tied")).unwrap();
    let (_, w) = load_adapter(&c.output, &cfg).unwrap();
    let head = w
        .modules
        .iter()
        .find(|(m, _)| m.layer.is_none())
        .expect("lm_head adapter saved");
    assert!(
        head.1.b.iter().any(|&v| v != 0.0),
        "lm_head's B was trained"
    );
}
