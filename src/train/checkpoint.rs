//! Training checkpoints: `OUTPUT/checkpoint-N/` holds everything a run needs to continue
//! bit-exactly from optimizer step `N`.
//!
//! ```text
//! checkpoint-N/
//!   adapter_config.json, adapter_model.safetensors   the LoRA adapter after step N (PEFT, f32)
//!   optimizer.safetensors                            AdamW exp_avg / exp_avg_sq / step per tensor
//!   trainer_state.json                               step, schedule, seed, data position, counters
//!   manifest.json                                    size and SHA-256 of the four, written last
//! ```
//! The data position and every random draw are pure functions of `(seed, step)` (batches of an
//! epoch come from a seeded shuffle, dropout masks from counter-based hashes), so the step number
//! and seed *are* the data-loader and RNG state.
//!
//! Crash safety (see [`crate::durable::manifest`]): a checkpoint is written into a hidden
//! temporary folder, every file `fsync`ed, `manifest.json` (sizes and SHA-256 of the four files)
//! written last, the folder renamed into place and the output folder `fsync`ed, so a crash never
//! leaves a half-written `checkpoint-N`. Resuming verifies the manifest before reading anything:
//! a truncated, bit-flipped or missing file is an error naming it and the newest checkpoint that
//! does verify, never a run trained from a corrupt state.

use crate::config::ModelConfig;
use crate::durable::lock::OutputLock;
use crate::durable::manifest::{verify_folder, write_folder};
use crate::error::{Error, Result};
use crate::lora::{adapter_files, load_adapter, LoraConfig, LoraWeights};
use crate::train::config::Resume;
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

/// The step numbers of the `checkpoint-N` folders in `output`, ascending (complete or not: see
/// [`verify_checkpoint`]).
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
            if entry.path().is_dir() {
                steps.push(n);
            }
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// Writes `checkpoint-{state.step}` whole or not at all ([`write_folder`]). An existing
/// checkpoint of the same step is replaced.
pub fn save_checkpoint(
    output: &Path,
    lora_cfg: &LoraConfig,
    weights: &LoraWeights,
    optim: &AdamWState,
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output, state.step);
    let adapter = adapter_files(lora_cfg, weights, DType::F32)?;
    let optimizer = optim.state_bytes()?;
    let json = serde_json::to_string_pretty(state)
        .map_err(|e| Error::InvalidArg(format!("trainer state: {e}")))?;
    write_folder(
        &dir,
        &[
            (crate::lora::CONFIG_FILE, &adapter.config),
            (crate::lora::WEIGHTS_FILE, &adapter.weights),
            (OPTIMIZER_FILE, &optimizer),
            (STATE_FILE, json.as_bytes()),
        ],
    )?;
    Ok(dir)
}

/// Checks a checkpoint folder against its manifest; the error names the bad file.
pub fn verify_checkpoint(dir: &Path) -> Result<()> {
    verify_folder(dir).map(|_| ())
}

/// The newest checkpoint in `output` that verifies, other than `except`.
pub fn newest_valid(output: &Path, except: &Path) -> Option<PathBuf> {
    let steps = list_checkpoints(output).ok()?;
    steps
        .iter()
        .rev()
        .map(|&n| checkpoint_dir(output, n))
        .filter(|d| d != except)
        .find(|d| verify_checkpoint(d).is_ok())
}

/// The checkpoint `--resume` continues from (the newest in `output`, or the folder given), once
/// it verifies. A damaged or incomplete one is an error naming the bad file and the newest
/// checkpoint that does verify.
pub fn resume_dir(output: &Path, resume: &Resume) -> Result<PathBuf> {
    let dir = match resume {
        Resume::Path(p) => p.clone(),
        Resume::Latest => {
            let steps = list_checkpoints(output)?;
            let last = steps.last().ok_or_else(|| {
                Error::NotFound(format!(
                    "{}: no checkpoint-N folder to resume from",
                    output.display()
                ))
            })?;
            checkpoint_dir(output, *last)
        }
    };
    if !dir.is_dir() {
        return Err(Error::NotFound(format!(
            "{}: no such checkpoint folder",
            dir.display()
        )));
    }
    verify_checkpoint(&dir).map_err(|e| {
        let Error::BadFile { path, msg } = e else {
            return e;
        };
        let parent = dir.parent().unwrap_or(output);
        let advice = match newest_valid(parent, &dir) {
            Some(v) => format!(
                "the newest valid checkpoint is {0}: continue from it with --resume {0}",
                v.display()
            ),
            None => format!(
                "no valid checkpoint is left in {}: start again with --overwrite",
                parent.display()
            ),
        };
        Error::bad_file(
            path,
            format!(
                "{msg}. Not resuming from {}, which is damaged or incomplete; {advice}",
                dir.display()
            ),
        )
    })?;
    Ok(dir)
}

/// A checkpoint read back.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub lora_cfg: LoraConfig,
    pub weights: LoraWeights,
    pub optim: AdamWState,
    pub state: TrainerState,
}

/// Reads a checkpoint folder written by [`save_checkpoint`] for a model with config `model`,
/// after checking it against its manifest.
pub fn load_checkpoint(dir: &Path, model: &ModelConfig) -> Result<Checkpoint> {
    verify_checkpoint(dir)?;
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

/// Makes sure `output` can take a new run and takes its lock: refuses a folder that another run
/// is writing to (whatever `overwrite` says), or that already holds an adapter or checkpoints
/// unless `overwrite` (then the old adapter files, checkpoints and metrics are removed). Creates
/// the folder when missing. Nothing of an earlier run is touched before the checks pass.
pub fn prepare_output(output: &Path, overwrite: bool) -> Result<OutputLock> {
    if output.exists() && !output.is_dir() {
        return Err(Error::InvalidArg(format!(
            "{}: exists and is not a folder",
            output.display()
        )));
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let lock = lock_output(output)?;
    let has_run = output.join(crate::lora::CONFIG_FILE).exists()
        || output.join(crate::lora::WEIGHTS_FILE).exists()
        || !list_checkpoints(output)?.is_empty();
    if has_run && !overwrite {
        return Err(Error::InvalidArg(format!(
            "{}: already holds an adapter or checkpoints; pass --overwrite to replace them or --resume to continue",
            output.display()
        )));
    }
    if has_run {
        for step in list_checkpoints(output)? {
            crate::durable::remove_dir_all(&checkpoint_dir(output, step))?;
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
    Ok(lock)
}

/// Takes the lock of the existing output folder `output` (refused while another run holds it;
/// a lock left by a crashed run is taken over) and removes the leftovers of interrupted writes.
pub fn lock_output(output: &Path) -> Result<OutputLock> {
    let lock = OutputLock::acquire(output)?;
    if let Some(previous) = &lock.stale {
        tracing::warn!(
            "{}: taking over the lock left by a run that ended without releasing it ({previous})",
            output.display()
        );
    }
    let removed = crate::durable::remove_stale_temps(output)?;
    if !removed.is_empty() {
        tracing::info!(
            "{}: removed the leftovers of interrupted writes: {}",
            output.display(),
            removed.join(", ")
        );
    }
    Ok(lock)
}
