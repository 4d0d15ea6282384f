//! The training loop of `qlora train`: data → micro-batches → forward/backward → clip → AdamW →
//! log / evaluate / checkpoint, with resume, Ctrl-C and divergence handling.
//!
//! Semantics (those of the Hugging Face `Trainer` + TRL `SFTTrainer` unless noted):
//! - An optimizer step consumes `grad_accum` batches of `batch_size` rows (the last step of an
//!   epoch may consume fewer). Its loss is the mean over all non-ignored target tokens of those
//!   batches (`1/N` scaling of every sequence's summed loss, `N` counted over the whole step), so
//!   gradient accumulation equals one large batch. Sequences are processed one at a time at their
//!   own length: no padding is ever computed, which equals transformers' padded batch exactly.
//! - Step `s` (1-based) of an epoch with `S` steps uses batches `[(s−1)·ga, s·ga)` of
//!   [`epoch_batches`] for epoch `⌊(s−1)/S⌋`; dropout masks come from `(seed, step, sequence)`.
//!   Everything a step does is therefore a pure function of the step number, and resuming from
//!   `checkpoint-N` reproduces the uninterrupted run bit for bit.
//! - The learning rate of step `s` is `schedule(s − 1)`; clipping uses the global 2-norm.
//! - The LoRA matrices (f32 master copies), their gradients and the AdamW states live where the
//!   backend computes ([`TrainBackend::adamw_step`]: the host on the CPU, paged device memory on
//!   CUDA); a step returns only the loss sum and the gradient norm to the host. Checkpoints hold
//!   host copies in one device-independent format, so a run resumes on either device.
//!
//! The loop itself is [`train`]; the per-step work (micro-batches, forward/backward, optimizer,
//! logging, checkpoints) is in `run.rs`.

use crate::backend::{Backend, TrainBackend};
use crate::error::{Error, Result};
use crate::lora::{peft_key, LoraConfig, LoraWeights};
use crate::model::{Llama, Logits};
use crate::train::checkpoint::{load_checkpoint, resume_dir, TrainerState};
use crate::train::config::{EvalData, TrainConfig};
use crate::train::data::{build_examples, split_eval, DataStats, Example};
use crate::train::metrics::MetricsRecord;
use crate::train::run::{Clock, Run};
use crate::train::{clip_grad_norm, grad_norm, AdamWState};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// What the loop reports to its caller (progress bars, logs).
#[derive(Debug)]
pub enum Event<'a> {
    /// Everything is loaded; training starts at `start_step` (0 unless resuming).
    Started {
        start_step: usize,
        total_steps: usize,
        train_examples: usize,
        eval_examples: usize,
        stats: &'a DataStats,
        trainable: &'a str,
        /// The backend's name, e.g. `cuda:0 (NVIDIA H100, sm_90)`.
        device: &'a str,
    },
    /// An optimizer step finished.
    Step(&'a StepInfo),
    /// A metrics line was written (every `logging_steps`, and after evaluations).
    Logged(&'a MetricsRecord),
    /// A checkpoint was written.
    Saved(&'a Path),
}

/// One optimizer step's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f32,
    /// Input tokens per second over the run so far (this session).
    pub tokens_per_s: f64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub output: PathBuf,
    pub steps: usize,
    pub total_steps: usize,
    /// Stopped early by Ctrl-C (a checkpoint was saved).
    pub interrupted: bool,
    /// `(step, loss)` of every step of the run, resumed steps included.
    pub losses: Vec<(usize, f64)>,
    pub eval_losses: Vec<(usize, f64)>,
    pub target_tokens: u64,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    pub peak_rss_mib: f64,
    /// The backend the run trained on.
    pub device: String,
    /// High-water mark of the device buffers (accelerators only).
    pub peak_device_mib: Option<f64>,
}

/// Targets of a causal LM from transformers-style labels: position `t` predicts `labels[t+1]`.
pub fn shift_labels(labels: &[i32]) -> Vec<i32> {
    labels.iter().skip(1).copied().chain([-100]).collect()
}

/// Summed next-token loss and target count of one example, adapter applied, no dropout.
pub fn example_loss<B: Backend>(model: &Llama<B>, ex: &Example) -> Result<(f64, usize)> {
    let b = &model.backend;
    let mut cache = model.new_cache(ex.ids.len())?;
    let logits = model.forward(&ex.ids, &mut cache, Logits::All)?;
    let targets = shift_labels(&ex.labels);
    let mut losses = b.zeros(targets.len())?;
    b.cross_entropy(&mut losses, &logits, &targets, model.cfg.vocab_size)?;
    let sum = b.download(&losses)?.iter().map(|&v| v as f64).sum();
    Ok((sum, targets.iter().filter(|&&t| t >= 0).count()))
}

/// Token-weighted mean loss over `examples` (Σ losses / Σ targets).
pub fn eval_loss<B: Backend>(model: &Llama<B>, examples: &[Example]) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for ex in examples {
        let (s, k) = example_loss(model, ex)?;
        sum += s;
        n += k;
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// Clips the global gradient 2-norm to `max_norm` (0: no clipping) and returns the norm before
/// clipping, as `torch.nn.utils.clip_grad_norm_`.
pub fn clip_gradients(g: &mut LoraWeights, max_norm: f32) -> f32 {
    let mut slices: Vec<&mut [f32]> = g
        .modules
        .values_mut()
        .flat_map(|p| [p.a.as_mut_slice(), p.b.as_mut_slice()])
        .collect();
    if max_norm > 0.0 {
        clip_grad_norm(&mut slices, max_norm)
    } else {
        grad_norm(slices.iter().map(|s| &**s))
    }
}

/// One AdamW step at learning rate `lr` on every LoRA matrix (states keyed by PEFT key).
pub fn adamw_update(
    weights: &mut LoraWeights,
    g: &LoraWeights,
    optim: &mut AdamWState,
    adam: &crate::train::AdamW,
    lr: f64,
) {
    for (m, p) in weights.modules.iter_mut() {
        let gp = &g.modules[m];
        for (is_a, param, grad) in [(true, &mut p.a, &gp.a), (false, &mut p.b, &gp.b)] {
            let st = optim.entry(&peft_key(m, is_a), param.len());
            adam.update(lr, param, grad, st);
        }
    }
}

/// Tokenized train and eval sets of a run.
pub(crate) struct Data {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub stats: DataStats,
}

pub(crate) fn load_data(cfg: &TrainConfig, tok: &crate::tokenizer::Tokenizer) -> Result<Data> {
    let tokenize = |spec: &str| -> Result<(Vec<Example>, DataStats)> {
        let path = crate::hub::resolve_dataset(spec)?;
        let rows = crate::data::load_rows(&path, cfg.max_rows)?;
        let (ex, stats) = build_examples(&rows, tok, &cfg.data, &path)?;
        tracing::info!(
            dataset = %path.display(),
            rows = stats.rows,
            examples = stats.examples,
            truncated = stats.truncated,
            skipped_no_assistant = stats.skipped_no_assistant,
            skipped_empty = stats.skipped_empty,
            tokens = stats.tokens,
            target_tokens = stats.target_tokens,
            "dataset tokenized"
        );
        if stats.truncated > 0 {
            tracing::warn!(
                "{} of {} rows were longer than --max-seq-len {} and were truncated",
                stats.truncated,
                stats.rows,
                cfg.data.max_seq_len
            );
        }
        Ok((ex, stats))
    };
    let (examples, stats) = tokenize(&cfg.dataset)?;
    let (train, eval) = match &cfg.eval {
        EvalData::None => (examples, Vec::new()),
        EvalData::Split(f) => split_eval(examples, *f, cfg.seed)?,
        EvalData::Dataset(spec) => (examples, tokenize(spec)?.0),
    };
    Ok(Data { train, eval, stats })
}

/// The adapter a run starts from: a checkpoint, an existing adapter, or a fresh PEFT init.
pub(crate) struct Start {
    pub lora_cfg: LoraConfig,
    pub weights: LoraWeights,
    pub optim: AdamWState,
    pub state: Option<TrainerState>,
    /// The checkpoint resumed from.
    pub from: Option<PathBuf>,
}

pub(crate) fn starting_point(
    cfg: &TrainConfig,
    model: &crate::config::ModelConfig,
) -> Result<Start> {
    if let Some(resume) = &cfg.resume {
        let dir = resume_dir(&cfg.output, resume)?;
        let ck = load_checkpoint(&dir, model)?;
        tracing::info!(checkpoint = %dir.display(), step = ck.state.step, "resuming");
        return Ok(Start {
            lora_cfg: ck.lora_cfg,
            weights: ck.weights,
            optim: ck.optim,
            state: Some(ck.state),
            from: Some(dir),
        });
    }
    let (mut lora_cfg, weights) = match &cfg.init_adapter {
        Some(dir) => crate::lora::load_adapter(dir, model)?,
        None => {
            let targets: Vec<&str> = cfg.lora.targets.iter().map(String::as_str).collect();
            let mut c = LoraConfig::new(cfg.lora.r, cfg.lora.alpha, &targets)?;
            c.use_rslora = cfg.lora.use_rslora;
            c.validate_for(model)?;
            let w = LoraWeights::init(&c, model, cfg.seed)?;
            (c, w)
        }
    };
    lora_cfg.lora_dropout = cfg.lora.dropout;
    lora_cfg.base_model_name_or_path = Some(cfg.model.clone());
    Ok(Start {
        lora_cfg,
        weights,
        optim: AdamWState::new(),
        state: None,
        from: None,
    })
}

/// Checks that a resumed run uses the settings that determine the data order and schedule.
pub(crate) fn check_resume(state: &TrainerState, fresh: &TrainerState) -> Result<()> {
    let pairs = [
        ("seed", state.seed, fresh.seed),
        (
            "batch size",
            state.batch_size as u64,
            fresh.batch_size as u64,
        ),
        (
            "grad accum",
            state.grad_accum as u64,
            fresh.grad_accum as u64,
        ),
        (
            "max seq len",
            state.max_seq_len as u64,
            fresh.max_seq_len as u64,
        ),
        (
            "steps per epoch",
            state.steps_per_epoch as u64,
            fresh.steps_per_epoch as u64,
        ),
        (
            "total steps",
            state.total_steps as u64,
            fresh.total_steps as u64,
        ),
    ];
    for (what, was, now) in pairs {
        if was != now {
            return Err(Error::InvalidArg(format!(
                "cannot resume: the checkpoint was trained with {what} {was}, this run has {now}; use the original settings"
            )));
        }
    }
    Ok(())
}

/// Runs training as `cfg` says on `backend`. `stop` (set by Ctrl-C) ends the run after the
/// current step with a checkpoint; `on` receives progress events.
pub fn train<B: TrainBackend>(
    cfg: &TrainConfig,
    backend: B,
    stop: &AtomicBool,
    on: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    let (mut run, data, trainable) = Run::setup(cfg, backend)?;
    on(Event::Started {
        start_step: run.state.step,
        total_steps: run.total_steps,
        train_examples: data.train.len(),
        eval_examples: data.eval.len(),
        stats: &data.stats,
        trainable: &trainable,
        device: &run.model.backend.name(),
    });
    if run.state.step == 0 && !data.eval.is_empty() {
        // The baseline the eval curve starts from.
        let e = eval_loss(&run.model, &data.eval)?;
        tracing::info!(
            eval_loss = format!("{e:.4}"),
            "held-out loss before training"
        );
        run.state.eval_losses.push((0, e));
    }
    let mut clock = Clock::start(&run.state);
    let mut interrupted = false;
    for step in run.state.step + 1..=run.total_steps {
        let info = run.step(cfg, &data, step, &mut clock)?;
        on(Event::Step(&info));
        let last = step == run.total_steps;
        run.log_and_evaluate(cfg, &data, &info, &clock, on)
            .map_err(|e| run.write_failed(e))?;
        let stopping = stop.load(Ordering::SeqCst) && !last;
        if step % cfg.save_steps == 0 || stopping {
            let dir = run.save_checkpoint(cfg).map_err(|e| run.write_failed(e))?;
            on(Event::Saved(&dir));
        }
        if stopping {
            interrupted = true;
            break;
        }
    }
    run.finish(cfg, interrupted, &clock)
}
