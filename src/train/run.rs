//! One training run between set-up and end: what it holds across optimizer steps, and the work of
//! one step — its micro-batches' forward and backward, the optimizer on the backend, logging,
//! evaluation and checkpoints. [`super::trainer::train`] drives it.

use super::trainer::{
    check_resume, eval_loss, load_data, shift_labels, starting_point, Data, Start, StepInfo,
    TrainSummary,
};
use crate::backend::cpu::dropout::splitmix64;
use crate::backend::{Backend, TrainBackend};
use crate::durable::lock::OutputLock;
use crate::error::{Error, Result};
use crate::lora::{peft_key, trainable_report, LoraConfig, LoraWeights};
use crate::model::{Llama, Lora, LoraSet, SeqInput};
use crate::train::checkpoint::{lock_output, prepare_output, save_checkpoint, TrainerState};
use crate::train::config::{TrainConfig, Warmup};
use crate::train::data::{epoch_batches, Batch, BatchOptions, Example};
use crate::train::metrics::{loss_curve_svg, MetricsLog, MetricsRecord};
use crate::train::{warmup_from_ratio, AdamParamState, AdamWState, LrSchedule};
use std::path::PathBuf;
use std::time::Instant;

/// Wall-clock and token counters of this session (a resumed run counts from its restart).
pub(crate) struct Clock {
    t0: Instant,
    elapsed_before: f64,
    /// Input tokens processed in this session.
    pub session_tokens: u64,
}

impl Clock {
    pub fn start(state: &TrainerState) -> Self {
        Clock {
            t0: Instant::now(),
            elapsed_before: state.elapsed_s,
            session_tokens: 0,
        }
    }

    fn session_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Seconds trained in all sessions of the run.
    pub fn total_s(&self) -> f64 {
        self.elapsed_before + self.session_s()
    }

    pub fn tokens_per_s(&self) -> f64 {
        self.session_tokens as f64 / self.session_s().max(1e-9)
    }
}

/// A run's state between optimizer steps.
pub(crate) struct Run<B: TrainBackend> {
    pub model: Llama<B>,
    lora_cfg: LoraConfig,
    /// PEFT keys of the trainable tensors in [`LoraSet::modules`] order (`A` then `B` per
    /// module): the order of the optimizer states and of the global gradient norm.
    keys: Vec<String>,
    opt: B::OptState,
    /// Gradient accumulators, zeroed after each optimizer step (never reallocated).
    grads: LoraSet<B>,
    lengths: Vec<usize>,
    batch_opts: BatchOptions,
    epoch_cache: Option<(usize, Vec<Batch>)>,
    schedule: LrSchedule,
    pub state: TrainerState,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    metrics: MetricsLog,
    /// Losses of the steps since the last metrics line.
    window: Vec<f64>,
    /// The newest checkpoint known complete: written by this session or resumed from.
    last_checkpoint: Option<PathBuf>,
    /// The output folder's lock, held until the run ends.
    _lock: OutputLock,
}

/// `(PEFT key, element count)` of every trainable tensor of `set`, in [`LoraSet::modules`] order.
fn param_keys<B: Backend>(set: &LoraSet<B>) -> Vec<(String, usize)> {
    set.modules()
        .into_iter()
        .flat_map(|(m, l)| {
            [
                (peft_key(&m, true), set.rank * l.in_features),
                (peft_key(&m, false), l.out_features * set.rank),
            ]
        })
        .collect()
}

/// The optimizer states of `keys` from a checkpoint's host states (fresh ones for tensors it
/// lacks, as torch's lazy state init).
fn host_states(saved: &AdamWState, keys: &[(String, usize)]) -> Result<Vec<AdamParamState>> {
    keys.iter()
        .map(|(k, n)| match saved.params.get(k) {
            Some(s) if s.len() == *n => Ok(s.clone()),
            Some(s) => Err(Error::InvalidArg(format!(
                "optimizer state `{k}` holds {} values, the adapter tensor {n}",
                s.len()
            ))),
            None => Ok(AdamParamState::new(*n)),
        })
        .collect()
}

impl<B: TrainBackend> Run<B> {
    /// Checks the output folder, tokenizes the data, loads the model, attaches the starting
    /// adapter and the optimizer; returns the run, its data and the trainable-parameter report.
    pub fn setup(cfg: &TrainConfig, backend: B) -> Result<(Self, Data, String)> {
        cfg.validate()?;
        let lock = if cfg.resume.is_none() {
            prepare_output(&cfg.output, cfg.overwrite)?
        } else if !cfg.output.is_dir() {
            return Err(Error::NotFound(format!(
                "{}: output folder to resume in does not exist",
                cfg.output.display()
            )));
        } else {
            lock_output(&cfg.output)?
        };
        // Tokenizer and data first: bad data fails before the slow model load.
        let model_dir = crate::hub::resolve_model(&cfg.model)?;
        cfg.validate_for_model(&crate::loader::read_config(&model_dir)?)?;
        let tokenizer = crate::tokenizer::Tokenizer::from_dir(&model_dir)?;
        let data = load_data(cfg, &tokenizer)?;
        let mut model = crate::loader::load_model_dir(&model_dir, backend, cfg.quant)?.model;
        let Start {
            lora_cfg,
            weights,
            optim,
            state: resumed,
            from,
        } = starting_point(cfg, &model.cfg)?;
        model.lora = Some(Lora::new(&model.backend, &lora_cfg, &weights, &model.cfg)?);
        let trainable = trainable_report(&lora_cfg, &model.cfg);
        let lengths: Vec<usize> = data.train.iter().map(Example::len).collect();
        let mut batch_opts = cfg.batch.clone();
        batch_opts.max_seq_len = cfg.data.max_seq_len;
        let per_epoch = epoch_batches(&lengths, &batch_opts, 0).len();
        let steps_per_epoch = per_epoch.div_ceil(cfg.grad_accum).max(1);
        let total_steps = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch);
        let warmup_steps = match cfg.warmup {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => warmup_from_ratio(r, total_steps)?,
        };
        let fresh = TrainerState {
            step: 0,
            total_steps,
            steps_per_epoch,
            warmup_steps,
            seed: cfg.seed,
            batch_size: cfg.batch.batch_size,
            grad_accum: cfg.grad_accum,
            max_seq_len: cfg.data.max_seq_len,
            tokens: 0,
            elapsed_s: 0.0,
            losses: Vec::new(),
            eval_losses: Vec::new(),
        };
        let state = match &resumed {
            Some(s) => {
                check_resume(s, &fresh)?;
                s.clone()
            }
            None => fresh,
        };
        let params = &model.lora.as_ref().expect("attached above").params;
        let keyed = param_keys(params);
        let sizes: Vec<usize> = keyed.iter().map(|k| k.1).collect();
        let host = match resumed {
            Some(_) => Some(host_states(&optim, &keyed)?),
            None => None,
        };
        let opt = model.backend.adamw_init(&sizes, host, cfg.optim_kind)?;
        let grads = params.zeros_like(&model.backend)?;
        let metrics = MetricsLog::open(&cfg.output.join("metrics.jsonl"), state.step)?;
        let run = Run {
            lora_cfg,
            keys: keyed.into_iter().map(|k| k.0).collect(),
            opt,
            grads,
            lengths,
            batch_opts,
            epoch_cache: None,
            schedule: LrSchedule {
                kind: cfg.scheduler,
                base_lr: cfg.optim.lr,
                warmup_steps,
                total_steps,
            },
            state,
            steps_per_epoch,
            total_steps,
            metrics,
            window: Vec::new(),
            last_checkpoint: from,
            _lock: lock,
            model,
        };
        Ok((run, data, trainable))
    }

    /// The micro-batches of optimizer step `step` (1-based): batches `[(s−1)·ga, s·ga)` of its
    /// epoch, each flattened to its examples (a packed row holds several).
    fn step_batches(&mut self, cfg: &TrainConfig, step: usize) -> Vec<Vec<usize>> {
        let epoch = (step - 1) / self.steps_per_epoch;
        let j = (step - 1) % self.steps_per_epoch;
        if self.epoch_cache.as_ref().map(|c| c.0) != Some(epoch) {
            let batches = epoch_batches(&self.lengths, &self.batch_opts, epoch);
            self.epoch_cache = Some((epoch, batches));
        }
        let batches = &self.epoch_cache.as_ref().expect("filled above").1;
        let ga = cfg.grad_accum;
        let micro = &batches[(j * ga).min(batches.len())..((j + 1) * ga).min(batches.len())];
        micro
            .iter()
            .map(|b| b.iter().flatten().copied().collect())
            .collect()
    }

    /// The error that stops a diverged run, naming the last good checkpoint.
    fn diverged(&self, step: usize, what: String) -> Error {
        Error::Training(format!(
            "step {step}: {what}; stopping. {}",
            match &self.last_checkpoint {
                Some(d) => format!(
                    "The last good checkpoint is {} (resume with --resume, e.g. at a lower --learning-rate)",
                    d.display()
                ),
                None => "No checkpoint was saved yet.".to_string(),
            }
        ))
    }

    /// The error that stops a run whose output could not be written (disk full, folder removed or
    /// read-only), naming the last good checkpoint; other errors are returned as they are.
    pub fn write_failed(&self, e: Error) -> Error {
        if !matches!(e, Error::Io { .. }) {
            return e;
        }
        let gone = if self.metrics_dir_exists() {
            String::new()
        } else {
            " (the output folder itself is gone)".to_string()
        };
        Error::Training(format!(
            "writing the output failed: {e}; stopping. {}{gone}",
            match &self.last_checkpoint {
                Some(d) => format!(
                    "The last good checkpoint is {}: once the disk has room and the folder is writable, continue with --resume",
                    d.display()
                ),
                None => "No checkpoint was written yet.".to_string(),
            }
        ))
    }

    fn metrics_dir_exists(&self) -> bool {
        self.metrics.path().parent().is_some_and(|p| p.is_dir())
    }

    /// One optimizer step: forward + backward of each of its micro-batches, the batch's sequences
    /// packed along the token axis (gradients summed with weight `1/N`, `N` the step's target
    /// tokens), then clip + AdamW.
    pub fn step(
        &mut self,
        cfg: &TrainConfig,
        data: &Data,
        step: usize,
        clock: &mut Clock,
    ) -> Result<StepInfo> {
        let micro = self.step_batches(cfg, step);
        let n_targets: usize = micro
            .iter()
            .flatten()
            .map(|&i| data.train[i].num_targets())
            .sum();
        let scale = if n_targets == 0 {
            0.0
        } else {
            1.0 / n_targets as f32
        };
        let dropout = self.model.lora.as_ref().expect("attached in setup").dropout;
        let mut loss_sum = 0.0;
        let mut k = 0u64; // the example's index within the step: its dropout seed
        for batch in &micro {
            let targets: Vec<Vec<i32>> = batch
                .iter()
                .map(|&i| shift_labels(&data.train[i].labels))
                .collect();
            let seqs: Vec<SeqInput> = batch
                .iter()
                .zip(&targets)
                .map(|(&i, t)| {
                    let seed = (dropout > 0.0)
                        .then(|| splitmix64(cfg.seed ^ splitmix64(((step as u64) << 24) | k)));
                    k += 1;
                    SeqInput {
                        ids: &data.train[i].ids,
                        targets: t,
                        dropout_seed: seed,
                    }
                })
                .collect();
            let st =
                self.model
                    .forward_backward_packed(&seqs, scale, &mut self.grads, cfg.recompute)?;
            loss_sum += st.loss_sum;
            clock.session_tokens += seqs.iter().map(|s| s.ids.len() as u64).sum::<u64>();
        }
        let loss = loss_sum / n_targets.max(1) as f64;
        if !loss.is_finite() {
            return Err(self.diverged(step, format!("the loss is {loss}")));
        }
        let lr = self.schedule.lr_at(step - 1);
        let norm = self.optimizer_step(cfg, lr)?;
        if !norm.is_finite() {
            return Err(self.diverged(step, format!("the gradient norm is {norm}")));
        }
        self.state.step = step;
        self.state.tokens += n_targets as u64;
        self.state.losses.push((step, loss));
        self.state.elapsed_s = clock.total_s();
        self.window.push(loss);
        Ok(StepInfo {
            step,
            total_steps: self.total_steps,
            loss,
            lr,
            grad_norm: norm,
            tokens_per_s: clock.tokens_per_s(),
        })
    }

    /// Clip + AdamW on the backend over every LoRA tensor, then zeroes the gradients. Returns
    /// the gradient norm (nothing was updated when it is not finite).
    fn optimizer_step(&mut self, cfg: &TrainConfig, lr: f64) -> Result<f32> {
        let model = &mut self.model;
        let b = &model.backend;
        let lora = model.lora.as_mut().expect("attached in setup");
        let mut params: Vec<&mut B::Buf> = lora
            .params
            .modules_mut()
            .into_iter()
            .flat_map(|(_, l)| [&mut l.a, &mut l.b])
            .collect();
        let rank = self.grads.rank;
        let mut sizes = Vec::new();
        let mut grads: Vec<&mut B::Buf> = Vec::new();
        for (_, l) in self.grads.modules_mut() {
            sizes.extend([rank * l.in_features, l.out_features * rank]);
            grads.extend([&mut l.a, &mut l.b]);
        }
        let norm = b.adamw_step(
            &mut self.opt,
            &mut params,
            &mut grads,
            &cfg.optim,
            lr,
            cfg.max_grad_norm,
        )?;
        for (g, n) in grads.into_iter().zip(sizes) {
            b.zero(g, n)?;
        }
        Ok(norm)
    }

    /// Evaluates when it is time, and writes a metrics line every `logging_steps`, at the last
    /// step and after evaluations.
    pub fn log_and_evaluate(
        &mut self,
        cfg: &TrainConfig,
        data: &Data,
        info: &StepInfo,
        clock: &Clock,
        on: &mut dyn FnMut(super::trainer::Event),
    ) -> Result<()> {
        let step = info.step;
        let last = step == self.total_steps;
        let eval_now =
            !data.eval.is_empty() && (last || cfg.eval_steps.is_some_and(|n| step % n == 0));
        let eval = if eval_now {
            let e = eval_loss(&self.model, &data.eval)?;
            self.state.eval_losses.push((step, e));
            Some(e)
        } else {
            None
        };
        if step % cfg.logging_steps == 0 || last || eval.is_some() {
            let rec = MetricsRecord {
                step,
                epoch: step as f64 / self.steps_per_epoch as f64,
                loss: self.window.iter().sum::<f64>() / self.window.len().max(1) as f64,
                eval_loss: eval,
                lr: info.lr,
                grad_norm: info.grad_norm as f64,
                tokens: self.state.tokens,
                tokens_per_s: clock.tokens_per_s(),
                peak_rss_mib: crate::sys::peak_rss_mib(),
                peak_device_mib: self.peak_device_mib(),
                elapsed_s: self.state.elapsed_s,
            };
            self.metrics.write(&rec)?;
            self.window.clear();
            on(super::trainer::Event::Logged(&rec));
        }
        Ok(())
    }

    fn peak_device_mib(&self) -> Option<f64> {
        self.model.backend.device_memory_peak().map(crate::sys::mib)
    }

    /// The adapter as host weights.
    fn weights(&self) -> Result<LoraWeights> {
        let lora = self.model.lora.as_ref().expect("attached in setup");
        lora.params.download(&self.model.backend)
    }

    /// The optimizer states as host states keyed by PEFT key (the checkpoint format).
    fn optimizer_state(&self) -> Result<AdamWState> {
        let states = self.model.backend.adamw_download(&self.opt)?;
        Ok(AdamWState {
            params: self.keys.iter().cloned().zip(states).collect(),
        })
    }

    /// Writes `checkpoint-{step}` (adapter, optimizer, trainer state) atomically, after making
    /// the metrics lines so far durable.
    pub fn save_checkpoint(&mut self, cfg: &TrainConfig) -> Result<PathBuf> {
        let weights = self.weights()?;
        let optim = self.optimizer_state()?;
        self.metrics.sync()?;
        let dir = save_checkpoint(&cfg.output, &self.lora_cfg, &weights, &optim, &self.state)?;
        self.last_checkpoint = Some(dir.clone());
        Ok(dir)
    }

    /// Writes the final adapter (unless interrupted) and the loss curve; the run's summary.
    pub fn finish(
        self,
        cfg: &TrainConfig,
        interrupted: bool,
        clock: &Clock,
    ) -> Result<TrainSummary> {
        let st = &self.state;
        let svg = loss_curve_svg(&st.losses, &st.eval_losses, "qlora training loss");
        let write = || -> Result<()> {
            if !interrupted {
                let weights = self.weights()?;
                let files = crate::lora::adapter_files(
                    &self.lora_cfg,
                    &weights,
                    crate::weights::DType::F32,
                )?;
                crate::lora::write_adapter(&cfg.output, &files, true)?;
            }
            crate::durable::write_atomic(&cfg.output.join("loss_curve.svg"), svg.as_bytes())
        };
        write().map_err(|e| self.write_failed(e))?;
        Ok(TrainSummary {
            output: cfg.output.clone(),
            steps: st.step,
            total_steps: self.total_steps,
            interrupted,
            losses: st.losses.clone(),
            eval_losses: st.eval_losses.clone(),
            target_tokens: st.tokens,
            elapsed_s: st.elapsed_s,
            tokens_per_s: clock.tokens_per_s(),
            peak_rss_mib: crate::sys::peak_rss_mib(),
            device: self.model.backend.name(),
            peak_device_mib: self.peak_device_mib(),
        })
    }
}
