//! Command-line interface: clap arguments → validated options → library calls.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use qlora::backend::{self, AnyBackend, Backend, DeviceRequest};
use qlora::generate::{generate, Sampling};
use qlora::loader::{load_model, read_config, Loaded};
use qlora::model::BaseQuant;
use qlora::tokenizer::Message;
use std::io::Write;

#[derive(Parser, Debug)]
#[command(
    name = "qlora",
    version,
    about = "QLoRA finetuning for Llama-family models, in one binary",
    long_about = "QLoRA finetuning for Llama-family models, in one binary.\n\n\
        Models are local Hugging Face folders (config.json, tokenizer.json, *.safetensors) or Hub ids \
        such as NousResearch/Llama-2-7b-chat-hf, looked up in the local HF cache (HF_HOME / HF_HUB_CACHE) \
        and downloaded when missing (HF_HUB_OFFLINE=1 forbids downloads).\n\n\
        Logging goes to stderr; set RUST_LOG=debug for more detail."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Worker threads for the CPU backend (default: all cores).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mean token cross-entropy and perplexity of a model on a dataset.
    Eval(EvalArgs),
    /// Generate text from a prompt, streamed to stdout.
    Generate(GenerateArgs),
    /// Show a model's architecture, parameter count, storage and NF4 memory estimate (reads no weights).
    Inspect(InspectArgs),
    /// Write an NF4 (bitsandbytes 4-bit) copy of a model that transformers + bitsandbytes and qlora load.
    Quantize(QuantizeArgs),
    /// Finetune a LoRA adapter (QLoRA: NF4 base by default) and write it in PEFT format.
    Train(Box<crate::train_cli::TrainArgs>),
    /// Merge a LoRA adapter into its (dequantized) base and write a plain model folder.
    Merge(MergeArgs),
    /// Write a model (with a LoRA adapter folded in, if given) as one GGUF file for llama.cpp,
    /// Ollama or LM Studio.
    Export(ExportArgs),
    /// Self-test of the GPU backend: every CUDA kernel and a training step against the CPU
    /// specification, as a table; non-zero exit on any failure.
    Check(crate::check_cli::CheckArgs),
}

/// Output dtype of `merge`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDtype {
    F16,
    Bf16,
    F32,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The adapter folder (PEFT format).
    #[arg(long)]
    pub adapter: std::path::PathBuf,
    /// Output model folder.
    #[arg(long, short)]
    pub output: std::path::PathBuf,
    /// Base model (default: the adapter's base_model_name_or_path).
    #[arg(long, short)]
    pub model: Option<String>,
    /// Output dtype (default: the base's, f16 for a 4-bit base).
    #[arg(long, value_enum)]
    pub dtype: Option<OutDtype>,
    /// Replace a non-empty output folder.
    #[arg(long)]
    pub overwrite: bool,
}

/// Tensor type of the matrices in an exported GGUF.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Base model: a local folder or a Hugging Face id (default with --adapter: the adapter's
    /// base_model_name_or_path). A bitsandbytes 4-bit checkpoint is dequantized.
    #[arg(long, short, required_unless_present = "adapter")]
    pub model: Option<String>,
    /// A LoRA adapter folder (PEFT format) to fold into the base before writing.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<std::path::PathBuf>,
    /// Output file (.gguf).
    #[arg(long, short)]
    pub output: std::path::PathBuf,
    /// Type of the weight matrices; norms stay f32. q8_0 falls back to f16 for a matrix whose
    /// rows are not a multiple of 32 long.
    #[arg(long, value_enum, default_value_t = GgufDtype::F16)]
    pub dtype: GgufDtype,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
    /// Write the adapter alone as a GGUF LoRA adapter (llama.cpp --lora) instead of the merged
    /// model.
    #[arg(long, requires = "adapter")]
    pub lora_only: bool,
}

/// How the base weights are held in memory.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    /// NF4 4-bit decoder linears (bitsandbytes layout), dequantized inside the matmul; embeddings,
    /// norms and lm_head unquantized.
    Nf4,
    /// Weights as stored (f32/f16/bf16), computed in f32.
    None,
}

#[derive(Args, Debug)]
pub struct ModelArgs {
    /// Model: a local folder or a Hugging Face id (org/name[@revision]). With --adapter it
    /// defaults to the adapter's base_model_name_or_path.
    #[arg(long, short, value_name = "MODEL", required_unless_present = "adapter")]
    pub model: Option<String>,
    /// A LoRA adapter folder (PEFT format: adapter_config.json + adapter_model.safetensors) to
    /// apply on top of the model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<std::path::PathBuf>,
    /// Merge the adapter into the base weights while loading (W + s·B·A, then quantized as
    /// --quant says), so each token costs what the base model costs. Unmerged (the default) keeps
    /// the base exact and adds the adapter at every step (fused into the decode GEMV on CUDA).
    #[arg(long, requires = "adapter")]
    pub merge: bool,
    #[command(flatten)]
    pub base: BaseArgs,
}

/// How and where the base model runs.
#[derive(Args, Debug)]
pub struct BaseArgs {
    /// Base-weight format in memory.
    #[arg(long, value_enum, default_value_t = Quant::Nf4)]
    pub quant: Quant,
    /// NF4 block size: elements per absmax scale (a power of two, 64..4096).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub blocksize: usize,
    /// Keep one f32 absmax per block instead of double-quantizing them to 8 bits.
    #[arg(long)]
    pub no_double_quant: bool,
    /// Device: auto (GPU if usable, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: DeviceRequest,
}

fn parse_device(s: &str) -> std::result::Result<DeviceRequest, String> {
    s.parse()
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset: a local .jsonl/.json/.parquet file or folder, or a Hugging Face dataset id
    /// (`guanaco-llama2-1k` is short for mlabonne/guanaco-llama2-1k).
    #[arg(long, short)]
    pub dataset: String,
    /// Field of each row holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Truncate rows to this many tokens (default: the model's max_position_embeddings).
    #[arg(long, value_name = "N")]
    pub max_seq_len: Option<usize>,
    /// Evaluate only the first K rows.
    #[arg(long, value_name = "K")]
    pub limit: Option<usize>,
    /// Print one JSON object (loss, perplexity, tokens, rows, ...) on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, short)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the model's chat template (tokenizer_config.json).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 = off).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model: a local folder or a Hugging Face id.
    #[arg(long, short)]
    pub model: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Source model: a local folder or a Hugging Face id (f32/f16/bf16 safetensors).
    #[arg(long, short)]
    pub model: String,
    /// Output folder (config.json with quantization_config, model.safetensors, tokenizer files).
    #[arg(long, short)]
    pub output: std::path::PathBuf,
    /// Elements per absmax scale (a power of two, 64..4096).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub blocksize: usize,
    /// Keep one f32 absmax per block instead of double-quantizing them.
    #[arg(long)]
    pub no_double_quant: bool,
    /// Replace an existing, non-empty output folder.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring the thread pool")?;
    }
    match cli.command {
        Command::Eval(a) => match backend::select(a.model.base.device)? {
            AnyBackend::Cpu(b) => eval(b, &a),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => eval(*b, &a),
        },
        Command::Generate(a) => match backend::select(a.model.base.device)? {
            AnyBackend::Cpu(b) => gen(b, &a),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(b) => gen(*b, &a),
        },
        Command::Inspect(a) => inspect(&a),
        Command::Quantize(a) => quantize(&a),
        Command::Train(a) => crate::train_cli::run(&a),
        Command::Merge(a) => merge(&a),
        Command::Export(a) => export(&a),
        Command::Check(a) => crate::check_cli::run(&a),
    }
}

impl BaseArgs {
    pub fn base_quant(&self) -> Result<BaseQuant> {
        Ok(match self.quant {
            Quant::None => BaseQuant::None,
            Quant::Nf4 => {
                if !(64..=4096).contains(&self.blocksize) || !self.blocksize.is_power_of_two() {
                    bail!(
                        "--blocksize must be a power of two from 64 to 4096, got {}",
                        self.blocksize
                    );
                }
                BaseQuant::Nf4 {
                    blocksize: self.blocksize,
                    double_quant: !self.no_double_quant,
                }
            }
        })
    }
}

fn load<B: Backend>(m: &ModelArgs, b: B) -> Result<Loaded<B>> {
    let quant = m.base.base_quant()?;
    // With --adapter, the base model defaults to the one the adapter was trained on.
    let adapter_cfg = match &m.adapter {
        Some(dir) => Some(
            qlora::lora::LoraConfig::from_file(&dir.join(qlora::lora::CONFIG_FILE))
                .with_context(|| format!("cannot use adapter {}", dir.display()))?,
        ),
        None => None,
    };
    let spec = match (&m.model, &adapter_cfg) {
        (Some(model), _) => model.clone(),
        (None, Some(c)) => c.base_model_name_or_path.clone().with_context(|| {
            format!(
                "{}: adapter_config.json names no base_model_name_or_path; pass --model",
                m.adapter.as_ref().expect("adapter given").display()
            )
        })?,
        (None, None) => bail!("--model is required (or --adapter with a base model recorded)"),
    };
    if m.merge {
        let adapter = m
            .adapter
            .as_ref()
            .expect("clap: --merge requires --adapter");
        let dir = qlora::hub::resolve_model(&spec)?;
        let cfg = qlora::loader::read_config(&dir)?;
        let (lcfg, weights) = qlora::lora::load_adapter(adapter, &cfg)
            .with_context(|| format!("cannot apply adapter {} to {spec}", adapter.display()))?;
        let merge = qlora::model::MergeLora {
            weights: &weights,
            scale: lcfg.scaling(),
        };
        let loaded = qlora::loader::load_model_dir_merged(&dir, b, quant, Some(merge))
            .with_context(|| {
                format!(
                    "cannot load model {spec} with adapter {} merged",
                    adapter.display()
                )
            })?;
        tracing::info!(adapter = %adapter.display(), r = lcfg.r, alpha = lcfg.lora_alpha, targets = ?lcfg.target_modules, "adapter merged into the base");
        return Ok(loaded);
    }
    let mut loaded =
        load_model(&spec, b, quant).with_context(|| format!("cannot load model {spec}"))?;
    if let Some(dir) = &m.adapter {
        let model = &mut loaded.model;
        let (cfg, weights) = qlora::lora::load_adapter(dir, &model.cfg)
            .with_context(|| format!("cannot apply adapter {} to {spec}", dir.display()))?;
        model.lora = Some(qlora::model::Lora::new(
            &model.backend,
            &cfg,
            &weights,
            &model.cfg,
        )?);
        tracing::info!(adapter = %dir.display(), r = cfg.r, alpha = cfg.lora_alpha, targets = ?cfg.target_modules, "adapter applied");
    }
    Ok(loaded)
}

fn eval<B: Backend>(b: B, a: &EvalArgs) -> Result<()> {
    if a.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    // Read the dataset before the (slow) model load, so bad data fails fast.
    let path = qlora::hub::resolve_dataset(&a.dataset)?;
    let rows = qlora::data::load_rows(&path, a.limit)?;
    let texts = qlora::data::texts(&rows, &a.text_field)?;
    let loaded = load(&a.model, b)?;
    let max_seq_len = a
        .max_seq_len
        .unwrap_or(loaded.model.cfg.max_position_embeddings);
    let bar = indicatif::ProgressBar::new(texts.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "eval {bar:30} {pos}/{len} rows {msg} [{elapsed}<{eta}]",
        )
        .expect("static template"),
    );
    let t0 = std::time::Instant::now();
    let report = qlora::eval::evaluate(
        &loaded.model,
        &loaded.tokenizer,
        &texts,
        max_seq_len,
        |done, tokens| {
            bar.set_position(done as u64);
            bar.set_message(format!(
                "{:.0} tok/s",
                tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9)
            ));
        },
    )?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let device_mem = report
            .peak_device_mib
            .map(|m| format!(", peak device memory {m:.0} MiB"))
            .unwrap_or_default();
        println!(
            "loss {:.6}  perplexity {:.4}  ({} tokens, {} rows, {} truncated to {max_seq_len}, {} skipped) in {:.1} s, {:.0} tok/s, peak RSS {:.0} MiB{device_mem}",
            report.loss,
            report.perplexity,
            report.tokens,
            report.rows,
            report.truncated_rows,
            report.skipped_rows,
            report.seconds,
            report.tokens as f64 / report.seconds.max(1e-9),
            report.peak_rss_mib
        );
    }
    Ok(())
}

fn gen<B: Backend>(b: B, a: &GenerateArgs) -> Result<()> {
    let sampling = Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    let mut loaded = load(&a.model, b)?;
    // Generation never changes the adapter: the backend may read its own copies (bf16 on CUDA,
    // half the bytes of a decode step's adapter reads). Evaluation runs prefill only, which
    // reads the f32 adapter, so it makes none.
    loaded.model.freeze_adapter()?;
    let tok = &loaded.tokenizer;
    let prompt = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(Message {
            role: "user".into(),
            content: a.prompt.clone(),
        });
        tok.apply_chat_template(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&prompt)?;
    tracing::debug!(?ids, "prompt tokens");
    let mut stream = tok.stream();
    let mut out = std::io::stdout().lock();
    let stats = generate(
        &loaded.model,
        &ids,
        a.max_new_tokens,
        &sampling,
        &loaded.eos_ids(),
        |id| {
            if let Some(text) = stream.push(id)? {
                // A closed stdout (e.g. `| head`) ends generation quietly.
                out.write_all(text.as_bytes())
                    .and_then(|_| out.flush())
                    .map_err(|e| qlora::Error::io("<stdout>", e))?;
            }
            Ok(())
        },
    )?;
    writeln!(out)?;
    tracing::info!(
        prompt_tokens = stats.prompt_tokens,
        new_tokens = stats.ids.len(),
        prefill_tok_s = format!(
            "{:.1}",
            stats.prompt_tokens as f64 / stats.prefill_secs.max(1e-9)
        ),
        decode_tok_s = format!(
            "{:.1}",
            stats.ids.len() as f64 / stats.decode_secs.max(1e-9)
        ),
        stopped_at_eos = stats.stopped_at_eos,
        peak_rss_mib = format!("{:.0}", qlora::sys::peak_rss_mib()),
        peak_device_mib = loaded
            .model
            .backend
            .device_memory_peak()
            .map(|b| format!("{:.0}", qlora::sys::mib(b))),
        "generation done"
    );
    Ok(())
}

fn inspect(a: &InspectArgs) -> Result<()> {
    let dir = qlora::hub::resolve_model(&a.model)?;
    let cfg = read_config(&dir)?;
    let info = qlora::inspect::inspect(&dir, &cfg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{info}");
    }
    Ok(())
}

fn quantize(a: &QuantizeArgs) -> Result<()> {
    if !(64..=4096).contains(&a.blocksize) || !a.blocksize.is_power_of_two() {
        bail!(
            "--blocksize must be a power of two from 64 to 4096, got {}",
            a.blocksize
        );
    }
    let src = qlora::hub::resolve_model(&a.model)?;
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "quantize {bar:30} {pos}/{len} tensors [{elapsed}<{eta}]",
        )
        .expect("static template"),
    );
    let report = qlora::quant::bnb::quantize_checkpoint(
        &src,
        &a.output,
        a.blocksize,
        !a.no_double_quant,
        a.overwrite,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| {
        format!(
            "cannot quantize {} into {}",
            src.display(),
            a.output.display()
        )
    })?;
    bar.finish_and_clear();
    println!(
        "wrote {}: {} linear weights in NF4, {:.1} MiB -> {:.1} MiB in {:.1} s, peak RSS {:.0} MiB",
        a.output.display(),
        report.tensors_quantized,
        report.bytes_in as f64 / (1u64 << 20) as f64,
        report.bytes_out as f64 / (1u64 << 20) as f64,
        report.seconds,
        qlora::sys::peak_rss_mib()
    );
    Ok(())
}

fn merge(a: &MergeArgs) -> Result<()> {
    use qlora::weights::DType;
    let opts = qlora::merge::MergeOptions {
        adapter: a.adapter.clone(),
        model: a.model.clone(),
        output: a.output.clone(),
        dtype: a.dtype.map(|d| match d {
            OutDtype::F16 => DType::F16,
            OutDtype::Bf16 => DType::BF16,
            OutDtype::F32 => DType::F32,
        }),
        overwrite: a.overwrite,
    };
    let r = qlora::merge::merge(&opts)
        .with_context(|| format!("cannot merge adapter {}", a.adapter.display()))?;
    eprintln!(
        "merged {} adapted modules into {} ({}, {:.1} MiB) -> {}",
        r.merged_modules,
        r.base.display(),
        r.dtype,
        r.bytes_out as f64 / (1u64 << 20) as f64,
        a.output.display()
    );
    Ok(())
}

fn export(a: &ExportArgs) -> Result<()> {
    use qlora::export::ExportDtype;
    let opts = qlora::export::ExportOptions {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        output: a.output.clone(),
        dtype: match a.dtype {
            GgufDtype::F32 => ExportDtype::F32,
            GgufDtype::F16 => ExportDtype::F16,
            GgufDtype::Bf16 => ExportDtype::Bf16,
            GgufDtype::Q8_0 => ExportDtype::Q8_0,
        },
        overwrite: a.overwrite,
        lora_only: a.lora_only,
    };
    let r = qlora::export::export(&opts)
        .with_context(|| format!("cannot export to {}", a.output.display()))?;
    let out = a.output.display();
    if a.lora_only {
        eprintln!(
            "wrote {out}: LoRA adapter, {} tensors ({:?}), {:.1} MiB, for base {}",
            r.tensors,
            a.dtype,
            r.bytes_out as f64 / (1u64 << 20) as f64,
            r.base.display()
        );
        println!("llama.cpp:  llama-cli -m BASE.gguf --lora {out} -cnv");
        println!(
            "            (BASE.gguf: qlora export --model {} -o BASE.gguf)",
            r.base.display()
        );
        println!("Ollama:     printf 'FROM ./BASE.gguf\\nADAPTER {out}\\n' > Modelfile && ollama create my-model -f Modelfile");
        return Ok(());
    }
    eprintln!(
        "wrote {out}: {} tensors ({:?}, {} adapted modules merged, {} tokenizer), {:.1} MiB, from {}",
        r.tensors,
        a.dtype,
        r.merged_modules,
        r.tokenizer,
        r.bytes_out as f64 / (1u64 << 20) as f64,
        r.base.display()
    );
    println!("llama.cpp:  llama-cli -m {out} -cnv");
    println!("            llama-server -m {out} --port 8080");
    println!("Ollama:     echo 'FROM {out}' > Modelfile && ollama create my-model -f Modelfile");
    Ok(())
}
