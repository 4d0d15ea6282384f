//! Training checkpoints: `OUTPUT/checkpoint-N/` holds everything a run needs to continue
//! bit-exactly from optimizer step `N`.
//!
//! ```text
//! checkpoint-N/
//!   adapter_config.json, adapter_model.safetensors   the LoRA adapter after step N (PEFT, f32)
//!   optimizer.safetensors                            AdamW exp_avg / exp_avg_sq / step per tensor
//!   trainer_state.json                               step, schedule, seed, data position, counters
//! ```
//! The data position and every random draw are pure functions of `(seed, step)` (batches of an
//! epoch come from a seeded shuffle, dropout masks from counter-based hashes), so the step number
//! and seed *are* the data-loader and RNG state. A checkpoint is written into a hidden temporary
//! folder beside its final name and renamed into place only when complete, so a crash never leaves
//! a half-written `checkpoint-N`.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{load_adapter, save_adapter, LoraConfig, LoraWeights};
use crate::train::AdamWState;
use crate::weights::DType;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File of the optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File of the trainer state inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";

/// Counters and settings a resumed run restores (and checks it was started with).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub steps_per_epoch: usize,
    pub warmup_steps: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    /// Target tokens trained on so far.
    pub tokens: u64,
    /// Wall-clock seconds spent training so far (for the summary; not part of the math).
    pub elapsed_s: f64,
    /// `(step, loss)` of every step so far, for the loss curve.
    pub losses: Vec<(usize, f64)>,
    /// `(step, eval loss)` of every evaluation so far.
    pub eval_losses: Vec<(usize, f64)>,
}

/// `OUTPUT/checkpoint-N`.
pub fn checkpoint_dir(output: &Path, step: usize) -> PathBuf {
    output.join(format!("checkpoint-{step}"))
}

/// The step numbers of the checkpoints in `output`, ascending.
pub fn list_checkpoints(output: &Path) -> Result<Vec<usize>> {
    let mut steps = Vec::new();
    let rd = match std::fs::read_dir(output) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(steps),
        Err(e) => return Err(Error::io(output, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(output, e))?;
        let name = entry.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("checkpoint-"))
            .and_then(|s| s.parse().ok())
        {
            if entry.path().join(STATE_FILE).is_file() {
                steps.push(n);
            }
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// Writes `checkpoint-{state.step}` atomically (temporary folder, then rename). An existing
/// checkpoint of the same step is replaced (it is the same step of the same run).
pub fn save_checkpoint(
    output: &Path,
    lora_cfg: &LoraConfig,
    weights: &LoraWeights,
    optim: &AdamWState,
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output, state.step);
    let tmp = output.join(format!(
        ".checkpoint-{}.tmp-{}",
        state.step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    let write = || -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        save_adapter(&tmp, lora_cfg, weights, DType::F32, false)?;
        optim.save(&tmp.join(OPTIMIZER_FILE))?;
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| Error::InvalidArg(format!("trainer state: {e}")))?;
        let p = tmp.join(STATE_FILE);
        std::fs::write(&p, json).map_err(|e| Error::io(&p, e))?;
        for f in [OPTIMIZER_FILE, STATE_FILE] {
            let p = tmp.join(f);
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&p, e))?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r.map(|_| dir)
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub lora_cfg: LoraConfig,
    pub weights: LoraWeights,
    pub optim: AdamWState,
    pub state: TrainerState,
}

/// Reads a checkpoint folder written by [`save_checkpoint`] for a model with config `model`.
pub fn load_checkpoint(dir: &Path, model: &ModelConfig) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        return Err(Error::NotFound(format!(
            "{}: not a qlora checkpoint (no {STATE_FILE})",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&state_path, e.to_string()))?;
    let (lora_cfg, weights) = load_adapter(dir, model)?;
    let optim = AdamWState::load(&dir.join(OPTIMIZER_FILE))?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        lora_cfg,
        weights,
        optim,
        state,
    })
}

/// Makes sure `output` can take a new run: refuses a folder that already holds an adapter or
/// checkpoints unless `overwrite` (then the old adapter files, checkpoints and metrics are
/// removed), creates it, and checks it is writable. Nothing is touched before the checks pass.
pub fn prepare_output(output: &Path, overwrite: bool) -> Result<()> {
    let has_run = output.join(crate::lora::CONFIG_FILE).exists()
        || output.join(crate::lora::WEIGHTS_FILE).exists()
        || !list_checkpoints(output)?.is_empty();
    if has_run && !overwrite {
        return Err(Error::InvalidArg(format!(
            "{}: already holds an adapter or checkpoints; pass --overwrite to replace them or --resume to continue",
            output.display()
        )));
    }
    if output.exists() && !output.is_dir() {
        return Err(Error::InvalidArg(format!(
            "{}: exists and is not a folder",
            output.display()
        )));
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let probe = output.join(format!(".qlora-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"ok").map_err(|e| {
        Error::InvalidArg(format!(
            "{}: output folder is not writable: {e}",
            output.display()
        ))
    })?;
    let _ = std::fs::remove_file(&probe);
    if has_run {
        for step in list_checkpoints(output)? {
            let d = checkpoint_dir(output, step);
            std::fs::remove_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        }
        for f in [
            crate::lora::CONFIG_FILE,
            crate::lora::WEIGHTS_FILE,
            "metrics.jsonl",
            "loss_curve.svg",
        ] {
            let p = output.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
    }
    Ok(())
}
