//! Helpers shared by integration tests (`mod common;` in each test file that uses them).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The repository root (tests read fixtures under `tests/fixtures`).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The token-id prompts of the tiny GQA model's transformers golden file.
pub fn golden_prompts() -> Vec<Vec<u32>> {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tiny/gqa/golden.json")).unwrap(),
    )
    .unwrap();
    g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

/// Runs the `qlora` binary from the repository root, offline, logging warnings only: its exit
/// code, stdout and stderr. A panic fails the test.
pub fn run_qlora(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .current_dir(root())
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run qlora");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !stderr.contains("panicked"),
        "qlora panicked on {args:?}:\n{stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        stderr,
    )
}
