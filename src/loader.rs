//! Model loading for the user-facing jobs: resolve the id, read the config, load the tokenizer
//! (cheap, so bad input fails fast), then stream every tensor onto the backend with a progress bar.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::{BaseQuant, Llama, MergeLora};
use crate::tokenizer::Tokenizer;
use crate::weights::Checkpoint;
use std::path::{Path, PathBuf};

/// A model ready to run, with its tokenizer.
pub struct Loaded<B: Backend> {
    pub dir: PathBuf,
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
}

impl<B: Backend> Loaded<B> {
    /// Every id that ends a generation: the config's `eos_token_id`(s) and the tokenizer's EOS.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.model.cfg.eos_token_ids.clone();
        ids.extend(self.tokenizer.eos_id);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Reads `config.json` from a resolved model directory.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    read_config_json(dir).map(|(cfg, _)| cfg)
}

/// Reads `config.json` once: the validated config and the raw JSON (for `quantization_config`).
fn read_config_json(dir: &Path) -> Result<(ModelConfig, serde_json::Value)> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(crate::Error::NotFound(format!(
            "{}: config.json not found; a model folder needs config.json, tokenizer.json and safetensors weights",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| crate::Error::io(&path, e))?;
    let cfg =
        ModelConfig::from_json_str(&text).map_err(|msg| crate::Error::bad_file(&path, msg))?;
    // from_json_str succeeded, so the text is valid JSON.
    let raw =
        serde_json::from_str(&text).map_err(|e| crate::Error::bad_file(&path, e.to_string()))?;
    Ok((cfg, raw))
}

/// Resolves `spec` (local folder or Hugging Face id) and loads model and tokenizer onto `backend`.
pub fn load_model<B: Backend>(spec: &str, backend: B, quant: BaseQuant) -> Result<Loaded<B>> {
    let dir = crate::hub::resolve_model(spec)?;
    load_model_dir(&dir, backend, quant)
}

/// Loads model and tokenizer from a local folder onto `backend`, decoder linears held per `quant`.
pub fn load_model_dir<B: Backend>(dir: &Path, backend: B, quant: BaseQuant) -> Result<Loaded<B>> {
    load_model_dir_merged(dir, backend, quant, None)
}

/// [`load_model_dir`] with an adapter merged into the base while loading
/// ([`Llama::load_merged`]).
pub fn load_model_dir_merged<B: Backend>(
    dir: &Path,
    backend: B,
    quant: BaseQuant,
    merge: Option<MergeLora<'_>>,
) -> Result<Loaded<B>> {
    let (cfg, raw) = read_config_json(dir)?;
    // A bitsandbytes quantization_config we cannot honour (fp4, 8-bit) is refused up front.
    if let Some(q) = crate::quant::bnb::parse_quantization_config(&raw, &dir.join("config.json"))? {
        tracing::info!(quant_type = %q.quant_type, double_quant = q.double_quant, "pre-quantized bitsandbytes checkpoint");
    }
    let tokenizer = Tokenizer::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let t0 = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "loading {bar:30} {pos}/{len} tensors [{elapsed}<{eta}]",
        )
        .expect("static template"),
    );
    let (model, _) = Llama::load_merged(backend, &ckpt, &cfg, quant, merge, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    tracing::info!(
        model = %dir.display(),
        layers = cfg.num_hidden_layers,
        hidden = cfg.hidden_size,
        backend = %model.backend.name(),
        quant = ?quant,
        linear_mib = format!("{:.1}", model.linear_bytes() as f64 / (1 << 20) as f64),
        secs = format!("{:.2}", t0.elapsed().as_secs_f64()),
        "model loaded"
    );
    Ok(Loaded {
        dir: dir.to_path_buf(),
        model,
        tokenizer,
    })
}
