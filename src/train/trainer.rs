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
//! - The master copy of the LoRA matrices and the AdamW states stay on the host in f32 (the
//!   optimizer runs there; only the adapter, a few MB, is uploaded after each step).

use crate::backend::cpu::dropout::splitmix64;
use crate::backend::{Backend, TrainBackend};
use crate::error::{Error, Result};
use crate::lora::{peft_key, trainable_report, LoraConfig, LoraWeights};
use crate::model::{Llama, Logits, Lora, LoraSet};
use crate::train::checkpoint::{
    checkpoint_dir, list_checkpoints, load_checkpoint, prepare_output, save_checkpoint,
    TrainerState,
};
use crate::train::config::{EvalData, Resume, TrainConfig, Warmup};
use crate::train::data::{build_examples, epoch_batches, split_eval, Batch, DataStats, Example};
use crate::train::metrics::{loss_curve_svg, MetricsLog, MetricsRecord};
use crate::train::{clip_grad_norm, grad_norm, warmup_from_ratio, AdamWState, LrSchedule};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

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
struct Data {
    train: Vec<Example>,
    eval: Vec<Example>,
    stats: DataStats,
}

fn load_data(cfg: &TrainConfig, tok: &crate::tokenizer::Tokenizer) -> Result<Data> {
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
struct Start {
    lora_cfg: LoraConfig,
    weights: LoraWeights,
    optim: AdamWState,
    state: Option<TrainerState>,
}

fn starting_point(cfg: &TrainConfig, model: &crate::config::ModelConfig) -> Result<Start> {
    if let Some(resume) = &cfg.resume {
        let dir = match resume {
            Resume::Path(p) => p.clone(),
            Resume::Latest => {
                let steps = list_checkpoints(&cfg.output)?;
                let last = steps.last().ok_or_else(|| {
                    Error::NotFound(format!(
                        "{}: no checkpoint-N folder to resume from",
                        cfg.output.display()
                    ))
                })?;
                checkpoint_dir(&cfg.output, *last)
            }
        };
        let ck = load_checkpoint(&dir, model)?;
        tracing::info!(checkpoint = %dir.display(), step = ck.state.step, "resuming");
        return Ok(Start {
            lora_cfg: ck.lora_cfg,
            weights: ck.weights,
            optim: ck.optim,
            state: Some(ck.state),
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
    })
}

/// Checks that a resumed run uses the settings that determine the data order and schedule.
fn check_resume(state: &TrainerState, fresh: &TrainerState) -> Result<()> {
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
    cfg.validate()?;
    if cfg.resume.is_none() {
        prepare_output(&cfg.output, cfg.overwrite)?;
    } else if !cfg.output.is_dir() {
        return Err(Error::NotFound(format!(
            "{}: output folder to resume in does not exist",
            cfg.output.display()
        )));
    }
    // Tokenizer and data first: bad data fails before the slow model load.
    let model_dir = crate::hub::resolve_model(&cfg.model)?;
    let tokenizer = crate::tokenizer::Tokenizer::from_dir(&model_dir)?;
    let data = load_data(cfg, &tokenizer)?;
    let mut model = crate::loader::load_model_dir(&model_dir, backend, cfg.quant)?.model;
    let start = starting_point(cfg, &model.cfg)?;
    let Start {
        lora_cfg,
        mut weights,
        mut optim,
        state: resumed,
    } = start;
    model.lora = Some(Lora::new(&model.backend, &lora_cfg, &weights, &model.cfg)?);
    let trainable = trainable_report(&lora_cfg, &model.cfg);

    let lengths: Vec<usize> = data.train.iter().map(Example::len).collect();
    let mut batch_opts = cfg.batch.clone();
    batch_opts.max_seq_len = cfg.data.max_seq_len;
    let per_epoch = epoch_batches(&lengths, &batch_opts, 0).len();
    let ga = cfg.grad_accum;
    let steps_per_epoch = per_epoch.div_ceil(ga).max(1);
    let total_steps = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch);
    let warmup_steps = match cfg.warmup {
        Warmup::Steps(n) => n,
        Warmup::Ratio(r) => warmup_from_ratio(r, total_steps)?,
    };
    let schedule = LrSchedule {
        kind: cfg.scheduler,
        base_lr: cfg.optim.lr,
        warmup_steps,
        total_steps,
    };
    let fresh = TrainerState {
        step: 0,
        total_steps,
        steps_per_epoch,
        warmup_steps,
        seed: cfg.seed,
        batch_size: cfg.batch.batch_size,
        grad_accum: ga,
        max_seq_len: cfg.data.max_seq_len,
        tokens: 0,
        elapsed_s: 0.0,
        losses: Vec::new(),
        eval_losses: Vec::new(),
    };
    let mut state = match resumed {
        Some(s) => {
            check_resume(&s, &fresh)?;
            s
        }
        None => fresh,
    };
    let start_step = state.step;
    let metrics_path = cfg.output.join("metrics.jsonl");
    let mut metrics = MetricsLog::open(&metrics_path, start_step)?;
    on(Event::Started {
        start_step,
        total_steps,
        train_examples: data.train.len(),
        eval_examples: data.eval.len(),
        stats: &data.stats,
        trainable: &trainable,
    });

    if start_step == 0 && !data.eval.is_empty() {
        // The baseline the eval curve starts from.
        let e = eval_loss(&model, &data.eval)?;
        tracing::info!(
            eval_loss = format!("{e:.4}"),
            "held-out loss before training"
        );
        state.eval_losses.push((0, e));
    }
    let t0 = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut session_tokens = 0u64;
    let mut epoch_cache: Option<(usize, Vec<Batch>)> = None;
    let mut window: Vec<f64> = Vec::new();
    let mut interrupted = false;
    for step in start_step + 1..=total_steps {
        let epoch = (step - 1) / steps_per_epoch;
        let j = (step - 1) % steps_per_epoch;
        if epoch_cache.as_ref().map(|c| c.0) != Some(epoch) {
            epoch_cache = Some((epoch, epoch_batches(&lengths, &batch_opts, epoch)));
        }
        let batches = &epoch_cache.as_ref().expect("filled above").1;
        let micro = &batches[(j * ga).min(batches.len())..((j + 1) * ga).min(batches.len())];
        let seqs: Vec<usize> = micro.iter().flatten().flatten().copied().collect();
        let n_targets: usize = seqs.iter().map(|&i| data.train[i].num_targets()).sum();

        // Forward + backward of every sequence of the step, gradients summed with 1/N each.
        let lora = model.lora.as_ref().expect("attached above");
        let mut grads: LoraSet<B> = lora.params.zeros_like(&model.backend)?;
        let scale = if n_targets == 0 {
            0.0
        } else {
            1.0 / n_targets as f32
        };
        let mut loss_sum = 0.0;
        for (k, &i) in seqs.iter().enumerate() {
            let ex = &data.train[i];
            let seed = (lora.dropout > 0.0)
                .then(|| splitmix64(cfg.seed ^ splitmix64(((step as u64) << 24) | k as u64)));
            let targets = shift_labels(&ex.labels);
            let st = model.forward_backward(
                &ex.ids,
                &targets,
                scale,
                &mut grads,
                cfg.recompute,
                seed,
            )?;
            loss_sum += st.loss_sum;
            session_tokens += ex.ids.len() as u64;
        }
        let loss = loss_sum / n_targets.max(1) as f64;
        let diverged = |what: String| {
            let last = list_checkpoints(&cfg.output)
                .ok()
                .and_then(|v| v.last().copied());
            Error::Training(format!(
                "step {step}: {what}; stopping. {}",
                match last {
                    Some(n) => format!(
                        "The last good checkpoint is {} (resume with --resume, e.g. at a lower --learning-rate)",
                        checkpoint_dir(&cfg.output, n).display()
                    ),
                    None => "No checkpoint was saved yet.".to_string(),
                }
            ))
        };
        if !loss.is_finite() {
            return Err(diverged(format!("the loss is {loss}")));
        }

        // Optimizer step on the host master copy.
        let mut g = grads.download(&model.backend)?;
        drop(grads);
        let norm = clip_gradients(&mut g, cfg.max_grad_norm);
        if !norm.is_finite() {
            return Err(diverged(format!("the gradient norm is {norm}")));
        }
        let lr = schedule.lr_at(step - 1);
        adamw_update(&mut weights, &g, &mut optim, &cfg.optim, lr);
        let lora = model.lora.as_mut().expect("attached above");
        lora.params = LoraSet::upload(&model.backend, &weights, model.cfg.num_hidden_layers)?;

        state.step = step;
        state.tokens += n_targets as u64;
        state.losses.push((step, loss));
        let elapsed = t0.elapsed().as_secs_f64();
        state.elapsed_s = elapsed_before + elapsed;
        let tokens_per_s = session_tokens as f64 / elapsed.max(1e-9);
        window.push(loss);
        on(Event::Step(&StepInfo {
            step,
            total_steps,
            loss,
            lr,
            grad_norm: norm,
            tokens_per_s,
        }));

        let last = step == total_steps;
        let eval_now =
            !data.eval.is_empty() && (last || cfg.eval_steps.is_some_and(|n| step % n == 0));
        let eval = if eval_now {
            let e = eval_loss(&model, &data.eval)?;
            state.eval_losses.push((step, e));
            Some(e)
        } else {
            None
        };
        if step % cfg.logging_steps == 0 || last || eval.is_some() {
            let rec = MetricsRecord {
                step,
                epoch: step as f64 / steps_per_epoch as f64,
                loss: window.iter().sum::<f64>() / window.len().max(1) as f64,
                eval_loss: eval,
                lr,
                grad_norm: norm as f64,
                tokens: state.tokens,
                tokens_per_s,
                peak_rss_mib: crate::sys::peak_rss_mib(),
                peak_device_mib: None,
                elapsed_s: state.elapsed_s,
            };
            metrics.write(&rec)?;
            window.clear();
            on(Event::Logged(&rec));
        }
        let stopping = stop.load(Ordering::SeqCst);
        if step % cfg.save_steps == 0 || (stopping && !last) {
            let dir = save_checkpoint(&cfg.output, &lora_cfg, &weights, &optim, &state)?;
            on(Event::Saved(&dir));
        }
        if stopping && !last {
            interrupted = true;
            break;
        }
    }
    if !interrupted {
        crate::lora::save_adapter(
            &cfg.output,
            &lora_cfg,
            &weights,
            crate::weights::DType::F32,
            true,
        )?;
    }
    let svg = loss_curve_svg(&state.losses, &state.eval_losses, "qlora training loss");
    crate::train::metrics::write_atomic(&cfg.output.join("loss_curve.svg"), svg.as_bytes())?;
    let elapsed = t0.elapsed().as_secs_f64();
    Ok(TrainSummary {
        output: cfg.output.clone(),
        steps: state.step,
        total_steps,
        interrupted,
        losses: state.losses.clone(),
        eval_losses: state.eval_losses.clone(),
        target_tokens: state.tokens,
        elapsed_s: state.elapsed_s,
        tokens_per_s: session_tokens as f64 / elapsed.max(1e-9),
        peak_rss_mib: crate::sys::peak_rss_mib(),
    })
}
