//! A real pretrained model end to end: SmolLM2-135M-Instruct, built offline by
//! `../shared/scripts/make_smollm2.sh` (or pointed to by `QLORA_SMOLLM2`). The check mirrors the
//! script's own transformers verification: the prompt's ids and the first greedy tokens
//! (" Paris", ".", "\n"). Skips with a message when the model has not been built.

use qlora::backend::cpu::CpuBackend;
use qlora::generate::{generate, Sampling};
use qlora::model::BaseQuant;
use std::path::PathBuf;

fn smollm2_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("QLORA_SMOLLM2")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/qlora-test/smollm2-135m"))
        })?;
    dir.join("model.safetensors").is_file().then_some(dir)
}

#[test]
fn smollm2_greedy_says_paris() {
    let Some(dir) = smollm2_dir() else {
        eprintln!(
            "SKIPPED smollm2_greedy_says_paris: no SmolLM2 at ~/.cache/qlora-test/smollm2-135m \
             (build it with `bash ../shared/scripts/make_smollm2.sh`, or set QLORA_SMOLLM2)"
        );
        return;
    };
    let l = qlora::loader::load_model_dir(&dir, CpuBackend::new(), BaseQuant::None).unwrap();
    let ids = l.tokenizer.encode("The capital of France is").unwrap();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    let out = generate(&l.model, &ids, 3, &Sampling::GREEDY, &[], |_| Ok(())).unwrap();
    assert_eq!(out.ids, vec![7042, 30, 198]);
}
