//! Validated settings of a training run (what `qlora train` flags and `--config run.toml` fill).
//!
//! Defaults follow the guanaco-llama2-1k QLoRA tutorial recipe (TRL `SFTTrainer` on
//! Llama-2-7b-chat): r 8, alpha 16, dropout 0.1, targets q_proj and v_proj, lr 2e-4, weight decay
//! 0.001, max grad norm 0.3, warmup ratio 0.03, constant schedule, batch 4, 1 epoch, group by
//! length, save and log every 25 steps, output `out/`.

use crate::error::{Error, Result};
use crate::model::{BaseQuant, Recompute};
use crate::train::data::{BatchOptions, SftOptions};
use crate::train::{AdamW, OptimKind, ScheduleKind};
use std::path::PathBuf;

/// Warmup length: a fraction of all optimizer steps, or a count (which wins, as in transformers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Warmup {
    Ratio(f64),
    Steps(usize),
}

/// Where held-out evaluation data comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalData {
    None,
    /// A deterministic fraction of the training rows (shuffled with the run's seed).
    Split(f64),
    /// Another dataset (id or path), tokenized like the training data.
    Dataset(String),
}

/// Which checkpoint `--resume` continues from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// The highest-numbered `OUTPUT/checkpoint-N`.
    Latest,
    /// A given checkpoint folder.
    Path(PathBuf),
}

/// The LoRA part of a run (ignored for rank/alpha/targets when `init_adapter` is given).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<String>,
    pub use_rslora: bool,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub model: String,
    pub dataset: String,
    pub output: PathBuf,
    pub quant: BaseQuant,
    pub lora: LoraSettings,
    /// Continue from an existing PEFT adapter (its rank, alpha and targets are used).
    pub init_adapter: Option<PathBuf>,
    pub optim: AdamW,
    /// Which optimizer states and where they live (`--optim`; the CPU backend keeps host vectors
    /// either way, 8-bit ones for `paged_adamw_8bit`).
    pub optim_kind: OptimKind,
    /// Global gradient-norm clip; 0 disables clipping.
    pub max_grad_norm: f32,
    pub scheduler: ScheduleKind,
    pub warmup: Warmup,
    pub data: SftOptions,
    pub batch: BatchOptions,
    pub grad_accum: usize,
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides `epochs`, as in transformers).
    pub max_steps: Option<usize>,
    /// Use at most this many dataset rows (quick runs and tests).
    pub max_rows: Option<usize>,
    pub eval: EvalData,
    /// Evaluate every N steps (and at the end); `None` = only at the end (when there is eval data).
    pub eval_steps: Option<usize>,
    pub save_steps: usize,
    pub logging_steps: usize,
    pub resume: Option<Resume>,
    pub overwrite: bool,
    pub recompute: Recompute,
    pub seed: u64,
}

impl TrainConfig {
    /// A run with the tutorial's defaults for `model` on `dataset`.
    pub fn new(model: &str, dataset: &str) -> Self {
        TrainConfig {
            model: model.to_string(),
            dataset: dataset.to_string(),
            output: PathBuf::from("out"),
            quant: BaseQuant::NF4,
            lora: LoraSettings {
                r: 8,
                alpha: 16.0,
                dropout: 0.1,
                targets: vec!["q_proj".into(), "v_proj".into()],
                use_rslora: false,
            },
            init_adapter: None,
            optim: AdamW {
                lr: 2e-4,
                weight_decay: 0.001,
                ..AdamW::default()
            },
            optim_kind: OptimKind::PagedAdamW32bit,
            max_grad_norm: 0.3,
            scheduler: ScheduleKind::Constant,
            warmup: Warmup::Ratio(0.03),
            data: SftOptions {
                text_field: "text".into(),
                messages_field: "messages".into(),
                completion_only_loss: false,
                max_seq_len: 512,
            },
            batch: BatchOptions {
                batch_size: 4,
                group_by_length: true,
                packing: false,
                max_seq_len: 512,
                seed: 42,
                drop_last: false,
            },
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            max_rows: None,
            eval: EvalData::None,
            eval_steps: None,
            save_steps: 25,
            logging_steps: 25,
            resume: None,
            overwrite: false,
            recompute: Recompute::Selective,
            seed: 42,
        }
    }

    /// Checks every setting; the error names the flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArg(msg));
        if self.lora.r == 0 {
            return bad("--lora-r must be at least 1".into());
        }
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            return bad(format!(
                "--lora-alpha must be positive, got {}",
                self.lora.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return bad(format!(
                "--lora-dropout must be in [0, 1), got {}",
                self.lora.dropout
            ));
        }
        self.optim.validate()?;
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(format!(
                "--max-grad-norm must be ≥ 0, got {}",
                self.max_grad_norm
            ));
        }
        if let Warmup::Ratio(r) = self.warmup {
            if !(0.0..=1.0).contains(&r) {
                return bad(format!("--warmup-ratio must be in [0, 1], got {r}"));
            }
        }
        if self.data.max_seq_len < 2 {
            return bad(format!(
                "--max-seq-len must be at least 2, got {}",
                self.data.max_seq_len
            ));
        }
        for (flag, v) in [
            ("--batch-size", self.batch.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--save-steps", self.save_steps),
            ("--logging-steps", self.logging_steps),
        ] {
            if v == 0 {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return bad("nothing to train: --epochs and --max-steps must be at least 1".into());
        }
        if self.eval_steps == Some(0) {
            return bad("--eval-steps must be at least 1".into());
        }
        if let EvalData::Split(f) = self.eval {
            if !(f > 0.0 && f < 1.0) {
                return bad(format!("--eval-split must be in (0, 1), got {f}"));
            }
        }
        if self.max_rows == Some(0) {
            return bad("--max-rows must be at least 1".into());
        }
        Ok(())
    }

    /// Checks the settings against the model's config: `--max-seq-len` may not exceed the
    /// context the model was trained for (`max_position_embeddings`), which is refused up front
    /// rather than training on positions the model has never seen (or sizing buffers for a
    /// length nothing in the data will reach).
    pub fn validate_for_model(&self, model: &crate::config::ModelConfig) -> Result<()> {
        if self.data.max_seq_len > model.max_position_embeddings {
            return Err(Error::InvalidArg(format!(
                "--max-seq-len {} exceeds the model's context of {} tokens (max_position_embeddings in config.json); use at most --max-seq-len {}",
                self.data.max_seq_len,
                model.max_position_embeddings,
                model.max_position_embeddings
            )));
        }
        Ok(())
    }
}
