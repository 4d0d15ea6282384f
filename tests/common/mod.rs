//! Helpers shared by integration tests (`mod common;` in each test file that uses them).
#![allow(dead_code)]

use std::path::PathBuf;

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
