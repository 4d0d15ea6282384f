//! The `qlora` binary's training-related commands: `train` (flags, `--config` file, bad input)
//! and `--adapter` on `eval` / `generate`.

mod common;
use common::run_qlora as qlora;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn tiny() -> String {
    format!("{ROOT}/tests/fixtures/tiny/gqa")
}
fn guanaco() -> String {
    format!("{ROOT}/tests/fixtures/guanaco-llama2-1k")
}
fn peft_adapter() -> String {
    format!("{ROOT}/tests/fixtures/peft/gqa-lora")
}

fn train_args<'a>(out: &'a str, m: &'a str, d: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        m,
        "--dataset",
        d,
        "--output",
        out,
        "--device",
        "cpu",
        "--max-rows",
        "16",
        "--max-seq-len",
        "64",
    ]
}

fn fails(args: &[&str], needles: &[&str]) {
    let (code, _, err) = qlora(args);
    assert_ne!(code, 0, "expected failure for {args:?}, stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

fn steps_done(out: &Path) -> usize {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last = text.lines().last().unwrap();
    serde_json::from_str::<serde_json::Value>(last).unwrap()["step"]
        .as_u64()
        .unwrap() as usize
}

#[test]
fn config_file_sets_flags_and_the_command_line_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("run.toml");
    std::fs::write(
        &toml,
        "max_steps = 3\nlora_r = 2\ntarget_modules = [\"q_proj\", \"down_proj\"]\nlogging_steps = 1\npacking = false\n",
    )
    .unwrap();
    let (m, d) = (tiny(), guanaco());
    let out = dir.path().join("a");
    let o = out.to_str().unwrap();
    let mut args = train_args(o, &m, &d);
    args.extend(["--config", toml.to_str().unwrap()]);
    let (code, _, err) = qlora(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(steps_done(&out), 3);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 2);
    let mut targets: Vec<String> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    targets.sort();
    assert_eq!(targets, ["down_proj", "q_proj"]);
    assert!(
        err.contains("trainable of"),
        "trainable-parameter report: {err}"
    );

    // A flag on the command line wins over the file.
    let out2 = dir.path().join("b");
    let o2 = out2.to_str().unwrap();
    let mut args = train_args(o2, &m, &d);
    args.extend(["--config", toml.to_str().unwrap(), "--max-steps", "2"]);
    let (code, _, err) = qlora(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(steps_done(&out2), 2);
}

#[test]
fn bad_config_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (tiny(), guanaco());
    let o = dir.path().join("o");
    let o = o.to_str().unwrap();
    for (text, needle) in [
        ("learning_rat = 1e-4\n", "unknown setting `learning_rat`"),
        ("max_steps = \"many\"\n", "max-steps"),
        ("packing = 3\n", "`packing` has the wrong type"),
        ("max_steps = [\n", "not valid TOML"),
    ] {
        let toml = dir.path().join("bad.toml");
        std::fs::write(&toml, text).unwrap();
        let mut args = train_args(o, &m, &d);
        args.extend(["--config", toml.to_str().unwrap()]);
        fails(&args, &[needle]);
    }
    let mut args = train_args(o, &m, &d);
    args.extend(["--config", "/nonexistent/run.toml"]);
    fails(&args, &["/nonexistent/run.toml"]);
}

#[test]
fn bad_training_input_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (tiny(), guanaco());
    let o = dir.path().join("o");
    let o = o.to_str().unwrap();
    let with = |extra: &[&'static str]| {
        let mut a = train_args(o, &m, &d);
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            with(&["--target-modules", "q_proj,wq"]),
            vec!["wq", "q_proj"],
        ),
        (with(&["--lora-r", "0"]), vec!["--lora-r"]),
        (with(&["--lora-r", "-1"]), vec!["--lora-r"]),
        (with(&["--learning-rate", "-1"]), vec!["lr"]),
        (
            with(&["--init-adapter", "/nonexistent/adapter"]),
            vec!["/nonexistent/adapter"],
        ),
    ];
    for (args, needles) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&a, &needles);
    }
    // An adapter for another architecture (hidden size 48 vs 64).
    let tied = format!("{ROOT}/tests/fixtures/tiny/tied");
    let pa = peft_adapter();
    let mut a = train_args(o, &tied, &d);
    a.extend(["--init-adapter", &pa]);
    fails(&a, &["adapter"]);
}

#[test]
fn existing_output_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (tiny(), guanaco());
    let out = dir.path().join("o");
    let o = out.to_str().unwrap();
    let mut a = train_args(o, &m, &d);
    a.extend(["--max-steps", "1"]);
    let (code, _, err) = qlora(&a);
    assert_eq!(code, 0, "{err}");
    fails(&a, &["--overwrite", o]);
    a.push("--overwrite");
    let (code, _, err) = qlora(&a);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn eval_and_generate_apply_a_peft_adapter() {
    let eval_data = format!("{ROOT}/tests/fixtures/tiny/eval.jsonl");
    let (m, pa) = (tiny(), peft_adapter());
    let loss = |extra: &[&str]| -> f64 {
        let mut a = vec![
            "eval",
            "--dataset",
            &eval_data,
            "--quant",
            "none",
            "--device",
            "cpu",
            "--json",
        ];
        a.extend_from_slice(extra);
        let (code, out, err) = qlora(&a);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let base = loss(&["--model", &m]);
    // The base model comes from adapter_config.json (base_model_name_or_path).
    let adapted = loss(&["--adapter", &pa]);
    let explicit = loss(&["--adapter", &pa, "--model", &m]);
    assert_eq!(adapted, explicit);
    assert!(
        (adapted - base).abs() > 1e-3,
        "adapter changes the loss: {base} vs {adapted}"
    );

    let (code, out, err) = qlora(&[
        "generate",
        "--adapter",
        &pa,
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
    // An adapter that does not fit the model.
    let tied = format!("{ROOT}/tests/fixtures/tiny/tied");
    fails(
        &[
            "eval",
            "--adapter",
            &pa,
            "--model",
            &tied,
            "--dataset",
            &eval_data,
            "--device",
            "cpu",
        ],
        &["gqa-lora"],
    );
    fails(
        &[
            "eval",
            "--adapter",
            "/nonexistent/ad",
            "--dataset",
            &eval_data,
        ],
        &["/nonexistent/ad"],
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (m, d) = (tiny(), guanaco());
    let out = dir.path().join("o");
    let o = out.to_str().unwrap();
    let mut args = train_args(o, &m, &d);
    args.extend([
        "--max-steps",
        "1000000",
        "--logging-steps",
        "1",
        "--save-steps",
        "1000000",
    ]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way, then send SIGINT as a terminal's Ctrl-C does.
    let t0 = std::time::Instant::now();
    while !out.join("metrics.jsonl").is_file()
        || std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .is_empty()
    {
        assert!(t0.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(err.contains("continue with --resume"), "{err}");
    let ckpts: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts.len(), 1, "one checkpoint written on Ctrl-C");
    assert!(ckpts[0].path().join("optimizer.safetensors").is_file());
    // And the run continues from it.
    let mut resume = train_args(o, &m, &d);
    let step: usize = ckpts[0].file_name().to_string_lossy()["checkpoint-".len()..]
        .parse()
        .unwrap();
    let target = (step + 2).to_string();
    resume.extend(["--max-steps", &target, "--resume"]);
    let (code, _, err) = qlora(&resume);
    // --max-steps changes the total, which the checkpoint recorded: a clear refusal, not a panic.
    assert_ne!(code, 0);
    assert!(err.contains("total steps"), "{err}");
}

#[test]
fn conversations_with_completion_only_loss_and_packing_train() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.jsonl");
    let mut text = String::new();
    for i in 0..24 {
        text.push_str(&format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is {i} plus {i}?\"}}, {{\"role\": \"assistant\", \"content\": \"It is {}.\"}}]}}\n",
            2 * i
        ));
    }
    // One row without an assistant turn: skipped and counted.
    text.push_str("{\"messages\": [{\"role\": \"user\", \"content\": \"Hello?\"}]}\n");
    std::fs::write(&data, text).unwrap();
    let m = tiny();
    let out = dir.path().join("o");
    let (code, _, err) = qlora(&[
        "train",
        "--model",
        &m,
        "--dataset",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--completion-only-loss",
        "--packing",
        "--max-seq-len",
        "128",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 skipped"), "{err}");
    assert!(out.join("adapter_model.safetensors").is_file());
}

#[test]
fn empty_and_unusable_datasets_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny();
    let o = dir.path().join("o");
    let o = o.to_str().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = empty.to_str().unwrap().to_string();
    fails(&train_args(o, &m, &e), &["empty.jsonl"]);
    let noassist = dir.path().join("noassist.jsonl");
    std::fs::write(
        &noassist,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n",
    )
    .unwrap();
    let n = noassist.to_str().unwrap().to_string();
    let mut a = train_args(o, &m, &n);
    a.push("--completion-only-loss");
    fails(&a, &["noassist.jsonl", "without an assistant turn"]);
}
