//! From a run's settings to a plan and back: the data's token counts and the micro-batches the
//! trainer will form ([`DataShape`]), what `qlora train --dry-run` reads ([`DryRun`]), the fit
//! check against a GPU or a card size ([`Budget`], [`Fit`], [`Verdict`]) and the search for the
//! knob settings that fit ([`Alternative`]).

use super::format::fmt_gib;
use super::shape::{AdapterShape, ModelShape, RunShape};
use super::{plan, MemoryPlan, CUBLAS_WORKSPACE, SLACK_PERCENT};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::LoraConfig;
use crate::model::train::CE_CHUNK;
use crate::model::Recompute;
use crate::train::config::{Resume, TrainConfig};
use crate::train::data::{epoch_batches, BatchOptions, Example};
use crate::train::OptimKind;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The optimizer knob's flags.
const OPTIM_8BIT: &str = "--optim paged_adamw_8bit";

/// Training epochs whose batches the plan looks at (the batches of later epochs are shuffles of
/// the same examples; a note says when a run is longer).
const MAX_PLANNED_EPOCHS: usize = 100;

/// The token counts of a run's data and how they are batched.
#[derive(Debug, Clone)]
pub struct DataShape {
    /// Tokens of each training example (after truncation to `--max-seq-len`).
    pub lengths: Vec<usize>,
    /// Tokens of each held-out example.
    pub eval_lengths: Vec<usize>,
    pub batch: BatchOptions,
    pub grad_accum: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
}

impl DataShape {
    /// The distinct micro-batches (sorted sequence lengths) of every step of the run, as
    /// `Run::step_batches` forms them, and whether the run is longer than the epochs looked at.
    pub fn micro_batches(&self) -> (Vec<Vec<usize>>, bool) {
        let per_epoch = epoch_batches(&self.lengths, &self.batch, 0).len();
        let ga = self.grad_accum.max(1);
        let steps_per_epoch = per_epoch.div_ceil(ga).max(1);
        let total_steps = self
            .max_steps
            .unwrap_or(self.epochs * steps_per_epoch)
            .max(1);
        let epochs = total_steps.div_ceil(steps_per_epoch);
        let mut set = BTreeSet::new();
        for e in 0..epochs.min(MAX_PLANNED_EPOCHS) {
            let steps = steps_per_epoch.min(total_steps - e * steps_per_epoch);
            let batches = epoch_batches(&self.lengths, &self.batch, e);
            for b in batches.iter().take(steps * ga) {
                let mut lens: Vec<usize> = b.iter().flatten().map(|&i| self.lengths[i]).collect();
                lens.sort_unstable();
                set.insert(lens);
            }
        }
        (set.into_iter().collect(), epochs > MAX_PLANNED_EPOCHS)
    }

    fn with_batch_size(&self, b: usize) -> Self {
        let mut d = self.clone();
        d.batch.batch_size = b;
        d
    }

    /// The data truncated to `n` tokens (examples keep their place; an example that would lose
    /// all its targets is still counted, a slight over-estimate).
    fn with_max_seq_len(&self, n: usize) -> Self {
        let mut d = self.clone();
        d.lengths.iter_mut().for_each(|l| *l = (*l).min(n));
        d.eval_lengths.iter_mut().for_each(|l| *l = (*l).min(n));
        d.batch.max_seq_len = n;
        d
    }
}

/// What `qlora train --dry-run` reads: the model's shapes, the adapter and the data.
#[derive(Debug, Clone)]
pub struct DryRun {
    pub model_dir: PathBuf,
    /// The run's shapes, `micro_batches` filled from `data`.
    pub run: RunShape,
    pub data: DataShape,
    /// Remarks for the reader (long runs, resumed adapters, ...).
    pub notes: Vec<String>,
}

impl DryRun {
    /// Reads config, headers or index, the adapter settings and the data of `cfg`; writes nothing.
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let model_dir = crate::hub::resolve_model(&cfg.model)?;
        let model_cfg = crate::loader::read_config(&model_dir)?;
        cfg.validate_for_model(&model_cfg)?;
        let model = ModelShape::from_dir(&model_dir, &model_cfg, cfg.quant)?;
        let mut notes = Vec::new();
        let lora = adapter_config(cfg, &model_cfg, &mut notes)?;
        let tokenizer = crate::tokenizer::Tokenizer::from_dir(&model_dir)?;
        let data = crate::train::trainer::load_data(cfg, &tokenizer)?;
        let mut batch = cfg.batch.clone();
        batch.max_seq_len = cfg.data.max_seq_len;
        let data = DataShape {
            lengths: data.train.iter().map(Example::len).collect(),
            eval_lengths: data.eval.iter().map(Example::len).collect(),
            batch,
            grad_accum: cfg.grad_accum,
            epochs: cfg.epochs,
            max_steps: cfg.max_steps,
        };
        let run = RunShape {
            model,
            adapter: AdapterShape::from_config(&lora),
            recompute: cfg.recompute,
            optim: cfg.optim_kind,
            micro_batches: Vec::new(),
            eval_len: None,
            ce_chunk: CE_CHUNK,
            device_internals: true,
        };
        let mut dr = DryRun {
            model_dir,
            run,
            data,
            notes,
        };
        let long = dr.refresh();
        if long {
            dr.notes.push(format!(
                "the run is longer than {MAX_PLANNED_EPOCHS} epochs: the batches of the first {MAX_PLANNED_EPOCHS} were planned"
            ));
        }
        Ok(dr)
    }

    /// Recomputes the micro-batches and the longest held-out example from `self.data`.
    fn refresh(&mut self) -> bool {
        let (mb, long) = self.data.micro_batches();
        self.run.micro_batches = mb;
        self.run.eval_len = self.data.eval_lengths.iter().copied().max();
        long
    }

    pub fn plan(&self) -> Result<MemoryPlan> {
        plan(&self.run)
    }

    fn variant(&self, recompute: Recompute, data: DataShape) -> DryRun {
        let mut v = self.clone();
        v.run.recompute = recompute;
        v.data = data;
        v.refresh();
        v
    }

    /// The total of the run with other knob settings, when it can be planned.
    fn total_with(&self, recompute: Recompute, data: DataShape) -> Option<usize> {
        self.variant(recompute, data)
            .plan()
            .ok()
            .map(|p| p.total_bytes)
    }

    /// Checks `plan` against `budget`; when it does not fit comfortably, works out which knobs
    /// (`--recompute full`, a smaller `--batch-size`, a smaller `--max-seq-len`) would.
    pub fn check(&self, plan: &MemoryPlan, budget: &Budget) -> Fit {
        let ctx = if budget.includes_context {
            plan.context_bytes
        } else {
            0
        };
        let needed = plan.total_bytes + ctx;
        let without_slack = plan.metered_bytes + CUBLAS_WORKSPACE + ctx;
        let verdict = if needed <= budget.bytes {
            Verdict::Fits
        } else if without_slack <= budget.bytes {
            Verdict::Tight
        } else {
            Verdict::DoesNotFit
        };
        let alternatives = if verdict == Verdict::Fits {
            Vec::new()
        } else {
            self.knobs(budget.bytes.saturating_sub(ctx))
        };
        Fit {
            verdict,
            needed,
            budget: budget.clone(),
            alternatives,
            fixed_bytes: plan.fixed_bytes() + CUBLAS_WORKSPACE + ctx,
        }
    }

    /// `--optim paged_adamw_8bit` for a run with 32-bit optimizer states (fitting or not).
    fn eight_bit_states(&self, room: usize) -> Option<Alternative> {
        if self.run.optim == OptimKind::PagedAdamW8bit {
            return None;
        }
        let mut v = self.clone();
        v.run.optim = OptimKind::PagedAdamW8bit;
        let total = v.plan().ok()?.total_bytes;
        Some(Alternative {
            flags: OPTIM_8BIT.into(),
            total_bytes: total,
            fits: total <= room,
        })
    }

    /// Settings of the knobs whose total fits `room` bytes: `--optim paged_adamw_8bit` (when the
    /// run's states are 32-bit), and the first fitting batch size and sequence length searching
    /// down, alone and combined with `--recompute full`.
    fn knobs(&self, room: usize) -> Vec<Alternative> {
        let mut out: Vec<Alternative> = self.eight_bit_states(room).into_iter().collect();
        let selective = self.run.recompute == Recompute::Selective;
        let modes: Vec<(Recompute, &str)> = if selective {
            vec![
                (Recompute::Selective, ""),
                (Recompute::Full, "--recompute full "),
            ]
        } else {
            vec![(Recompute::Full, "")]
        };
        if selective {
            if let Some(total) = self.total_with(Recompute::Full, self.data.clone()) {
                out.push(Alternative {
                    flags: "--recompute full".into(),
                    total_bytes: total,
                    fits: total <= room,
                });
            }
        }
        for (mode, prefix) in modes {
            if out.iter().any(|a| a.fits && a.flags == "--recompute full") && !prefix.is_empty() {
                break; // full recompute alone fits: no need to combine it
            }
            let bs = self.data.batch.batch_size;
            for b in (1..bs).rev() {
                match self.total_with(mode, self.data.with_batch_size(b)) {
                    Some(total) if total <= room => {
                        out.push(Alternative {
                            flags: format!("{prefix}--batch-size {b}"),
                            total_bytes: total,
                            fits: true,
                        });
                        break;
                    }
                    _ => {}
                }
            }
            if let Some((n, total)) = self.largest_seq_len(mode, room) {
                out.push(Alternative {
                    flags: format!("{prefix}--max-seq-len {n}"),
                    total_bytes: total,
                    fits: true,
                });
            }
        }
        out
    }

    /// The largest `--max-seq-len` below the longest example whose plan fits `room` (rounded down
    /// to a multiple of 64 when that still leaves at least 64), by bisection.
    fn largest_seq_len(&self, mode: Recompute, room: usize) -> Option<(usize, usize)> {
        let longest = self.data.lengths.iter().copied().max()?;
        let fits = |n: usize| {
            self.total_with(mode, self.data.with_max_seq_len(n))
                .filter(|&t| t <= room)
        };
        let (mut lo, mut hi) = (2usize, longest.saturating_sub(1));
        if hi < lo || fits(lo).is_none() {
            return None;
        }
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fits(mid).is_some() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let round = lo / 64 * 64;
        let n = if round >= 64 { round } else { lo };
        fits(n).map(|t| (n, t))
    }
}

/// The adapter the run trains: from the checkpoint it resumes, an initial adapter, or the flags.
fn adapter_config(
    cfg: &TrainConfig,
    model: &ModelConfig,
    notes: &mut Vec<String>,
) -> Result<LoraConfig> {
    let from_file = |dir: &Path| -> Result<LoraConfig> {
        let c = LoraConfig::from_file(&dir.join("adapter_config.json"))?;
        c.validate_for(model)?;
        Ok(c)
    };
    if let Some(resume) = &cfg.resume {
        let dir = match resume {
            Resume::Path(p) => p.clone(),
            Resume::Latest => {
                let steps = crate::train::checkpoint::list_checkpoints(&cfg.output)?;
                let last = steps.last().ok_or_else(|| {
                    Error::NotFound(format!(
                        "{}: no checkpoint-N folder to resume from",
                        cfg.output.display()
                    ))
                })?;
                crate::train::checkpoint::checkpoint_dir(&cfg.output, *last)
            }
        };
        notes.push(format!("adapter of {} (resumed)", dir.display()));
        return from_file(&dir);
    }
    let mut c = match &cfg.init_adapter {
        Some(dir) => {
            notes.push(format!("adapter of {}", dir.display()));
            from_file(dir)?
        }
        None => {
            let targets: Vec<&str> = cfg.lora.targets.iter().map(String::as_str).collect();
            let c = LoraConfig::new(cfg.lora.r, cfg.lora.alpha, &targets)?;
            c.validate_for(model)?;
            c
        }
    };
    c.lora_dropout = cfg.lora.dropout;
    Ok(c)
}

/// Device memory to check a plan against.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Budget {
    pub bytes: usize,
    /// E.g. `--gpu-memory 24.00 GiB` or `cuda:0 (NVIDIA H100): 79.10 GiB free`.
    pub source: String,
    /// A card size (`--gpu-memory`): the CUDA context must fit in it too. Free memory measured
    /// on an opened device already excludes the context.
    pub includes_context: bool,
}

/// Whether a plan fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Fits,
    /// Fits only if the allocator slack is not needed.
    Tight,
    DoesNotFit,
}

/// A knob setting and the plan's total with it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alternative {
    pub flags: String,
    pub total_bytes: usize,
    pub fits: bool,
}

/// The outcome of [`DryRun::check`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fit {
    pub verdict: Verdict,
    /// The plan's total, plus the CUDA context when the budget is a card size.
    pub needed: usize,
    pub budget: Budget,
    /// Knob settings tried, when the plan does not fit comfortably (those that fit, and
    /// `--recompute full` and `--optim paged_adamw_8bit` either way).
    pub alternatives: Vec<Alternative>,
    /// What no knob changes: weights, adapter, gradients, optimizer, scratch, cuBLAS workspace
    /// (and the context for a card size).
    pub fixed_bytes: usize,
}

impl Fit {
    /// One line for `fits` / `tight`; for `does not fit`, the advice (used as the error).
    pub fn render(&self) -> String {
        let ctx = if self.budget.includes_context {
            " with the CUDA context"
        } else {
            ""
        };
        let head = format!(
            "needs {}{ctx}; {} available ({})",
            fmt_gib(self.needed),
            fmt_gib(self.budget.bytes),
            self.budget.source
        );
        match self.verdict {
            Verdict::Fits => format!(
                "fits: {head}, {} to spare",
                fmt_gib(self.budget.bytes - self.needed)
            ),
            Verdict::Tight => format!(
                "tight: {head}; it fits only if the allocator needs less than the {SLACK_PERCENT}% slack planned{}",
                self.advice()
            ),
            Verdict::DoesNotFit => format!("does not fit: {head}{}", self.advice()),
        }
    }

    fn advice(&self) -> String {
        let fitting: Vec<&Alternative> = self.alternatives.iter().filter(|a| a.fits).collect();
        if !fitting.is_empty() {
            let mut s = String::from(". These settings fit:");
            for a in fitting {
                s.push_str(&format!(
                    "\n  {:<38} total {}",
                    a.flags,
                    fmt_gib(a.total_bytes)
                ));
            }
            return s;
        }
        let full = self
            .alternatives
            .iter()
            .find(|a| a.flags == "--recompute full")
            .map_or(String::new(), |a| {
                format!(" (--recompute full: {})", fmt_gib(a.total_bytes))
            });
        let optim = self
            .alternatives
            .iter()
            .find(|a| a.flags == OPTIM_8BIT)
            .map_or(String::new(), |a| {
                format!(", {OPTIM_8BIT} ({})", fmt_gib(a.total_bytes))
            });
        format!(
            ". No setting of --recompute{full}{optim}, --batch-size or --max-seq-len fits: the weights, \
             adapter, gradients and optimizer states alone take {}; use a GPU with more memory, \
             fewer --target-modules or a smaller --lora-r",
            fmt_gib(self.fixed_bytes)
        )
    }
}
