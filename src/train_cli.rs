//! `qlora train`: flags (and `--config run.toml`) → [`TrainConfig`] → the training loop, with a
//! progress bar, SIGINT / SIGTERM handling and an end-of-run summary.

use crate::cli::BaseArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, ValueEnum};
use qlora::backend::{self, AnyBackend};
use qlora::model::Recompute;
use qlora::train::config::{EvalData, Resume, TrainConfig, Warmup};
use qlora::train::config_file::{config_flags, FlagKind};
use qlora::train::plan::{fmt_gib, Budget, DryRun, MemoryPlan, Verdict};
use qlora::train::trainer::{train, Event, TrainSummary};
use qlora::train::ScheduleKind;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sched {
    Constant,
    Linear,
    Cosine,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecomputeArg {
    /// Keep matmul outputs, recompute norms, SwiGLU and dropout masks.
    Selective,
    /// Keep only each layer's input and rerun the layer forward in backward.
    Full,
}

/// Flags of `qlora train`. Defaults follow the guanaco-llama2-1k QLoRA tutorial.
#[derive(Args, Debug)]
#[command(args_override_self = true)]
pub struct TrainArgs {
    /// TOML file holding any of these flags (`learning_rate = 1e-4`, `target_modules =
    /// ["q_proj", "v_proj"]`, `packing = true`); flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Base model: a local folder or a Hugging Face id.
    #[arg(long, short)]
    pub model: String,
    /// Training data: a .jsonl/.json/.parquet file or folder, or a Hugging Face dataset id.
    #[arg(long, short)]
    pub dataset: String,
    /// Output folder: final adapter, checkpoint-N/, metrics.jsonl, loss_curve.svg.
    #[arg(long, short, default_value = "out")]
    pub output: PathBuf,
    #[command(flatten)]
    pub base: BaseArgs,
    /// Modules to adapt: comma-separated names among q_proj,k_proj,v_proj,o_proj,gate_proj,
    /// up_proj,down_proj,lm_head, or all-linear.
    #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
    pub target_modules: Vec<String>,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    pub lora_r: usize,
    /// LoRA alpha (scaling alpha/r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f32,
    /// Dropout on the adapter input during training.
    #[arg(long, default_value_t = 0.1)]
    pub lora_dropout: f32,
    /// rsLoRA scaling alpha/√r.
    #[arg(long)]
    pub use_rslora: bool,
    /// Start from this PEFT adapter (its rank, alpha and targets are used).
    #[arg(long, value_name = "DIR")]
    pub init_adapter: Option<PathBuf>,
    #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
    pub learning_rate: f64,
    /// Decoupled AdamW weight decay.
    #[arg(long, default_value_t = 0.001)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    pub adam_beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    pub adam_beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    pub adam_epsilon: f64,
    /// Optimizer: paged_adamw_32bit (AdamW with 32-bit states in GPU memory the driver may page
    /// to host RAM under pressure, as bitsandbytes' paged optimizers), paged_adamw_8bit
    /// (bitsandbytes' 8-bit AdamW: blockwise-quantized states, 2 bytes per parameter instead of
    /// 8, paged) or adamw (32-bit, plain device memory). On the CPU the two 32-bit ones are the
    /// same host AdamW. A checkpoint of either resumes under the other (states converted).
    #[arg(long, default_value = "paged_adamw_32bit", value_parser = parse_optim)]
    pub optim: qlora::train::OptimKind,
    /// Clip the global gradient 2-norm to this (0: no clipping).
    #[arg(long, default_value_t = 0.3)]
    pub max_grad_norm: f32,
    #[arg(long, value_enum, default_value_t = Sched::Constant)]
    pub lr_scheduler: Sched,
    /// Warmup as a fraction of all steps.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Warmup steps (overrides --warmup-ratio).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Field holding plain text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Field holding conversations (a list of {role, content}), rendered with the chat template.
    #[arg(long, default_value = "messages")]
    pub messages_field: String,
    /// Take the loss on assistant turns (or completions) only.
    #[arg(long)]
    pub completion_only_loss: bool,
    /// Truncate examples to this many tokens.
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Use only the first N dataset rows.
    #[arg(long, value_name = "N")]
    pub max_rows: Option<usize>,
    /// Batch examples of similar length (the default, as in the tutorial).
    #[arg(long, overrides_with = "no_group_by_length")]
    pub group_by_length: bool,
    /// Plain random batches.
    #[arg(long)]
    pub no_group_by_length: bool,
    /// Pack several short examples into one row of up to --max-seq-len tokens.
    #[arg(long)]
    pub packing: bool,
    /// Seed of the shuffle, the LoRA init and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Hold out this fraction of the rows for evaluation.
    #[arg(long, value_name = "FRACTION", conflicts_with = "eval_dataset")]
    pub eval_split: Option<f64>,
    /// Evaluate on this dataset.
    #[arg(long)]
    pub eval_dataset: Option<String>,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Write OUTPUT/checkpoint-N every N steps.
    #[arg(long, default_value_t = 25)]
    pub save_steps: usize,
    /// Log loss, lr, grad norm and throughput every N steps.
    #[arg(long, default_value_t = 25)]
    pub logging_steps: usize,
    /// Continue from the latest OUTPUT/checkpoint-N, or from the given checkpoint folder (checked
    /// against its manifest first: a damaged one is refused, naming the newest valid one).
    #[arg(long, value_name = "CHECKPOINT", num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Replace an existing adapter and checkpoints in OUTPUT.
    #[arg(long)]
    pub overwrite: bool,
    /// Activation memory strategy.
    #[arg(long, value_enum, default_value_t = RecomputeArg::Selective)]
    pub recompute: RecomputeArg,
    /// Print the device-memory plan of this run (base weights, adapter, optimizer, activations,
    /// working set, per line) and whether it fits the GPU, then exit without training. Reads only
    /// config.json, the safetensors headers or shard index, the tokenizer and the data.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: print the plan as one JSON object (`total_bytes`, bytes per line).
    #[arg(long, requires = "dry_run")]
    pub json: bool,
    /// Device memory to check the plan against, a card size such as 24GiB or 24GB (default: the
    /// free memory of the GPU the run would use, when there is one).
    #[arg(long, value_name = "SIZE", value_parser = parse_gpu_memory)]
    pub gpu_memory: Option<usize>,
}

fn parse_gpu_memory(s: &str) -> std::result::Result<usize, String> {
    qlora::train::plan::parse_bytes(s)
}

fn parse_optim(s: &str) -> std::result::Result<qlora::train::OptimKind, String> {
    s.parse()
}

impl TrainArgs {
    /// The validated run settings.
    pub fn to_config(&self) -> Result<TrainConfig> {
        let mut c = TrainConfig::new(&self.model, &self.dataset);
        c.output = self.output.clone();
        c.quant = self.base.base_quant()?;
        c.lora.r = self.lora_r;
        c.lora.alpha = self.lora_alpha;
        c.lora.dropout = self.lora_dropout;
        c.lora.targets = self.target_modules.clone();
        c.lora.use_rslora = self.use_rslora;
        c.init_adapter = self.init_adapter.clone();
        c.optim.lr = self.learning_rate;
        c.optim.weight_decay = self.weight_decay;
        c.optim.beta1 = self.adam_beta1;
        c.optim.beta2 = self.adam_beta2;
        c.optim.eps = self.adam_epsilon;
        c.optim_kind = self.optim;
        c.max_grad_norm = self.max_grad_norm;
        c.scheduler = match self.lr_scheduler {
            Sched::Constant => ScheduleKind::Constant,
            Sched::Linear => ScheduleKind::Linear,
            Sched::Cosine => ScheduleKind::Cosine,
        };
        c.warmup = match self.warmup_steps {
            Some(n) => Warmup::Steps(n),
            None => Warmup::Ratio(self.warmup_ratio),
        };
        c.data.text_field = self.text_field.clone();
        c.data.messages_field = self.messages_field.clone();
        c.data.completion_only_loss = self.completion_only_loss;
        c.data.max_seq_len = self.max_seq_len;
        c.batch.batch_size = self.batch_size;
        c.batch.group_by_length = !self.no_group_by_length;
        c.batch.packing = self.packing;
        c.batch.max_seq_len = self.max_seq_len;
        c.batch.seed = self.seed;
        c.grad_accum = self.grad_accum;
        c.epochs = self.epochs;
        c.max_steps = self.max_steps;
        c.max_rows = self.max_rows;
        c.eval = match (&self.eval_split, &self.eval_dataset) {
            (Some(f), _) => EvalData::Split(*f),
            (None, Some(d)) => EvalData::Dataset(d.clone()),
            (None, None) => EvalData::None,
        };
        c.eval_steps = self.eval_steps;
        c.save_steps = self.save_steps;
        c.logging_steps = self.logging_steps;
        c.resume = self.resume.as_deref().map(|r| match r {
            "latest" => Resume::Latest,
            p => Resume::Path(PathBuf::from(p)),
        });
        c.overwrite = self.overwrite;
        c.recompute = match self.recompute {
            RecomputeArg::Selective => Recompute::Selective,
            RecomputeArg::Full => Recompute::Full,
        };
        c.seed = self.seed;
        c.validate()?;
        Ok(c)
    }
}

/// Expands `--config FILE` of a `train` command line into flags placed before the others, so
/// that flags given on the command line override the file (`args_override_self`).
pub fn expand_config_file(args: Vec<String>) -> Result<Vec<String>> {
    let Some(sub) = args.iter().position(|a| a == "train") else {
        return Ok(args);
    };
    let mut path = None;
    for (i, a) in args.iter().enumerate().skip(sub + 1) {
        if a == "--config" {
            path = args.get(i + 1).cloned();
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_string());
        }
    }
    let Some(path) = path else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{path}: cannot read config file"))?;
    let cmd = crate::cli::Cli::command();
    let train = cmd
        .find_subcommand("train")
        .expect("train subcommand exists");
    let flags = config_flags(&path, &text, |long| {
        let arg = train.get_arguments().find(|a| a.get_long() == Some(long))?;
        Some(if arg.get_action().takes_values() {
            FlagKind::Value
        } else {
            FlagKind::Switch
        })
    })?;
    let mut out = args[..=sub].to_vec();
    out.extend(flags);
    out.extend(args[sub + 1..].iter().cloned());
    Ok(out)
}

/// Runs `qlora train`.
pub fn run(a: &TrainArgs) -> Result<()> {
    let cfg = a.to_config()?;
    if a.dry_run {
        return dry_run(a, &cfg);
    }
    let stop = Arc::new(AtomicBool::new(false));
    on_stop_signals(stop.clone())?;
    let summary = match backend::select_for_training(a.base.device)? {
        AnyBackend::Cpu(b) => run_on(b, &cfg, &stop)?,
        #[cfg(feature = "cuda")]
        AnyBackend::Cuda(b) => {
            preflight(a, &cfg, &b)?;
            run_on(*b, &cfg, &stop)?
        }
    };
    print_summary(&summary);
    Ok(())
}

/// SIGINT (Ctrl-C) and SIGTERM (what Slurm, Kubernetes and spot reclaims send): the first sets
/// `stop`, so the run finishes its step, writes a checkpoint and exits 0; a second exits at once
/// (status 128 + signal). Exiting mid-write cannot corrupt anything: every output file and
/// checkpoint is written under a temporary name and renamed into place, and the next run on the
/// folder removes the leftovers.
fn on_stop_signals(stop: Arc<AtomicBool>) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("installing the SIGINT / SIGTERM handlers")?;
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let name = if sig == SIGINT { "SIGINT (Ctrl-C)" } else { "SIGTERM" };
                if stop.swap(true, Ordering::SeqCst) {
                    eprintln!("\n{name} again: exiting now, without a new checkpoint; continue from the last one with --resume");
                    std::process::exit(128 + sig);
                }
                eprintln!("\n{name}: finishing this step, writing a checkpoint, then exiting (send it again to exit at once)");
                qlora::durable::fault::note_signal_handled();
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// `--gpu-memory` as a budget (a card size: the CUDA context must fit in it too).
fn card_budget(bytes: usize) -> Budget {
    Budget {
        bytes,
        source: format!("--gpu-memory {}", fmt_gib(bytes)),
        includes_context: true,
    }
}

/// The free memory of an opened device (its context already created) as a budget.
#[cfg(feature = "cuda")]
fn device_budget(dev: &qlora::backend::cuda::runtime::CudaDevice) -> qlora::Result<Budget> {
    let (free, total) = dev.mem_info()?;
    Ok(Budget {
        bytes: free,
        source: format!(
            "cuda:{} ({}): {} free of {}",
            dev.ordinal,
            dev.name,
            fmt_gib(free),
            fmt_gib(total)
        ),
        includes_context: false,
    })
}

/// What a dry run checks the plan against: `--gpu-memory`, else the free memory of the GPU the
/// run would use (`--device auto` / `cuda:N`), else nothing (with the reason).
fn dry_run_budget(a: &TrainArgs) -> std::result::Result<Budget, String> {
    if let Some(b) = a.gpu_memory {
        return Ok(card_budget(b));
    }
    #[cfg(feature = "cuda")]
    {
        use qlora::backend::{cuda, DeviceRequest};
        let ordinal = match a.base.device {
            DeviceRequest::Cpu => return Err("--device cpu".into()),
            DeviceRequest::Cuda(n) => n,
            DeviceRequest::Auto => {
                let present =
                    cuda::driver_present() && cuda::runtime::device_count().is_ok_and(|n| n > 0);
                if !present {
                    return Err("no GPU found".into());
                }
                0
            }
        };
        let dev = cuda::runtime::CudaDevice::new(ordinal).map_err(|e| e.to_string())?;
        device_budget(&dev).map_err(|e| e.to_string())
    }
    #[cfg(not(feature = "cuda"))]
    Err("this qlora was built without CUDA".into())
}

/// `qlora train --dry-run`: the memory plan, as text or JSON; an error when it does not fit.
fn dry_run(a: &TrainArgs, cfg: &TrainConfig) -> Result<()> {
    let dr = DryRun::new(cfg)?;
    let plan = dr.plan()?;
    let budget = dry_run_budget(a);
    let fit = budget.as_ref().ok().map(|b| dr.check(&plan, b));
    if a.json {
        let v = serde_json::json!({
            "model": dr.model_dir,
            "recompute": match cfg.recompute { Recompute::Selective => "selective", Recompute::Full => "full" },
            "optim": dr.run.optim.name(),
            "micro_batch": plan.micro_batch,
            "micro_batches": plan.micro_batches,
            "peak_at": plan.peak_at,
            "lines": plan.lines,
            "metered_bytes": plan.metered_bytes,
            "total_bytes": plan.total_bytes,
            "context_bytes": plan.context_bytes,
            "load_bytes": plan.load_bytes,
            "optimizers": plan.optimizers,
            "phases": plan.phases,
            "notes": dr.notes,
            "fit": fit,
            "no_budget": budget.as_ref().err(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}", describe(&dr, &plan, cfg));
        println!("{}", plan.render());
        match (&fit, &budget) {
            (Some(f), _) => println!("{}", f.render()),
            (None, Err(why)) => println!(
                "no GPU to check against ({why}): pass --gpu-memory SIZE (e.g. 24GiB) to check a card"
            ),
            (None, Ok(_)) => {}
        }
    }
    match fit {
        Some(f) if f.verdict == Verdict::DoesNotFit => {
            bail!("the memory plan {}", f.render())
        }
        _ => Ok(()),
    }
}

/// The plan's heading: model, adapter, data and where the peak is.
fn describe(dr: &DryRun, plan: &MemoryPlan, cfg: &TrainConfig) -> String {
    let m = &dr.run.model.cfg;
    let ad = &dr.run.adapter;
    let quant = match cfg.quant {
        qlora::model::BaseQuant::None => "none (as stored)".to_string(),
        qlora::model::BaseQuant::Nf4 {
            blocksize,
            double_quant,
        } => format!(
            "NF4, block {blocksize}{}",
            if double_quant { ", double quant" } else { "" }
        ),
    };
    let targets: Vec<&str> = ad.targets.iter().map(|t| t.name()).collect();
    let mb = &plan.micro_batch;
    let mut s = format!(
        "memory plan of this run on the CUDA backend\n\
         model    {}: {} layers, hidden {}, intermediate {}, {}/{} heads, vocab {}; stored {}; base {quant}\n\
         adapter  r {} on {}, dropout {}, {}\n\
         batches  {} distinct micro-batches; the peak's: {} tokens in {} sequence(s), the longest {}\n\
         peak at  {} (--recompute {})",
        dr.model_dir.display(),
        m.num_hidden_layers,
        m.hidden_size,
        m.intermediate_size,
        m.num_attention_heads,
        m.num_key_value_heads,
        m.vocab_size,
        dr.run.model.stored,
        ad.rank,
        targets.join(","),
        ad.dropout,
        dr.run.optim.name(),
        plan.micro_batches,
        mb.tokens,
        mb.sequences,
        mb.longest_sequence,
        plan.peak_at,
        match cfg.recompute {
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        },
    );
    for n in &dr.notes {
        s.push_str(&format!("\nnote     {n}"));
    }
    s
}

/// Before a GPU run: the memory plan against the device's free memory (or `--gpu-memory`); an
/// error with the knobs that fit when it cannot fit, a warning when it is tight.
#[cfg(feature = "cuda")]
fn preflight(
    a: &TrainArgs,
    cfg: &TrainConfig,
    b: &qlora::backend::cuda::backend::CudaBackend,
) -> Result<()> {
    let planned = DryRun::new(cfg).and_then(|dr| {
        let plan = dr.plan()?;
        let budget = match a.gpu_memory {
            Some(bytes) => card_budget(bytes),
            None => device_budget(&b.dev)?,
        };
        let fit = dr.check(&plan, &budget);
        Ok((plan, fit))
    });
    let (plan, fit) = match planned {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("no memory plan for this run ({e}); starting anyway");
            return Ok(());
        }
    };
    match fit.verdict {
        Verdict::DoesNotFit => bail!(
            "the memory plan {}\n(`qlora train --dry-run` with the same flags prints the whole plan)",
            fit.render()
        ),
        Verdict::Tight => tracing::warn!("memory plan: {}", fit.render()),
        Verdict::Fits => tracing::info!(
            total = %fmt_gib(plan.total_bytes),
            peak_at = %plan.peak_at,
            "memory plan: {}",
            fit.render()
        ),
    }
    Ok(())
}

fn run_on<B: qlora::backend::TrainBackend>(
    b: B,
    cfg: &TrainConfig,
    stop: &AtomicBool,
) -> Result<TrainSummary> {
    let bar = indicatif::ProgressBar::hidden();
    let mut on = |ev: Event| match ev {
        Event::Started {
            start_step,
            total_steps,
            train_examples,
            eval_examples,
            stats,
            trainable,
            device,
        } => {
            eprintln!("{trainable}");
            eprintln!("training on {device}");
            eprintln!(
                "{train_examples} training examples, {eval_examples} held out; {} rows read, {} truncated, {} skipped; {total_steps} optimizer steps",
                stats.rows,
                stats.truncated,
                stats.skipped_no_assistant + stats.skipped_empty
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(total_steps as u64);
            bar.set_position(start_step as u64);
            bar.reset_eta();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "train {bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}",
                )
                .expect("static template"),
            );
        }
        Event::Step(s) => {
            bar.set_position(s.step as u64);
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} {:.0} tok/s",
                s.loss, s.lr, s.tokens_per_s
            ));
        }
        Event::Logged(r) => bar.suspend(|| {
            tracing::info!(
                step = r.step,
                epoch = format!("{:.2}", r.epoch),
                loss = format!("{:.4}", r.loss),
                eval_loss = r.eval_loss.map(|e| format!("{e:.4}")),
                lr = format!("{:.3e}", r.lr),
                grad_norm = format!("{:.3}", r.grad_norm),
                tokens_per_s = format!("{:.0}", r.tokens_per_s),
                peak_rss_mib = format!("{:.0}", r.peak_rss_mib),
                peak_device_mib = r.peak_device_mib.map(|m| format!("{m:.0}")),
                "train"
            )
        }),
        Event::Saved(dir) => bar.suspend(|| tracing::info!(checkpoint = %dir.display(), "saved")),
    };
    let r = train(cfg, b, stop, &mut on);
    bar.finish_and_clear();
    Ok(r?)
}

fn print_summary(s: &TrainSummary) {
    let last = s.losses.last().map(|l| l.1);
    let first = s.losses.first().map(|l| l.1);
    let device_mem = s.peak_device_mib.map_or(String::new(), |m| {
        format!(", peak device memory {m:.0} MiB")
    });
    eprintln!(
        "{} after {}/{} steps on {}: {} target tokens in {:.1} s ({:.0} tok/s), loss {} → {}{}, peak RSS {:.0} MiB{device_mem}",
        if s.interrupted { "stopped" } else { "done" },
        s.steps,
        s.total_steps,
        s.device,
        s.target_tokens,
        s.elapsed_s,
        s.tokens_per_s,
        first.map_or("-".into(), |v| format!("{v:.4}")),
        last.map_or("-".into(), |v| format!("{v:.4}")),
        s.eval_losses
            .last()
            .map_or(String::new(), |e| format!(", eval loss {:.4}", e.1)),
        s.peak_rss_mib
    );
    if s.interrupted {
        eprintln!(
            "checkpoint saved in {}; continue with --resume",
            s.output.display()
        );
    } else {
        eprintln!(
            "adapter written to {} (metrics.jsonl, loss_curve.svg beside it)",
            s.output.display()
        );
    }
}
