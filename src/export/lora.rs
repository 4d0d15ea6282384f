//! `qlora export --lora-only`: the adapter alone as a GGUF LoRA adapter that llama.cpp applies on
//! top of its base GGUF (`llama-cli -m base.gguf --lora adapter.gguf`), after llama.cpp's
//! `convert_lora_to_gguf.py`.
//!
//! Metadata: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and the base's
//! `general.architecture`. Per adapted module two tensors named after the base tensor,
//! `<name>.lora_a` (A, `[r, in]`) and `<name>.lora_b` (B, `[out, r]`), stored as PyTorch holds
//! them (llama.cpp checks `a.ne[0] = in`, `b.ne[1] = out`). llama.cpp adds
//! `(alpha / r) · B·A·x` where `r` is A's row count, so with rsLoRA (`s = α/√r`) the written alpha
//! is `s·r`. The q/k row permutation of the base ([`super::llama::permute_rows`]) acts on the
//! output rows, so it is applied to B of `q_proj` and `k_proj`.

use super::encode::GgmlType;
use super::gguf::{GgufWriter, TensorInfo, Value};
use super::{llama, ExportOptions, ExportReport};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::{LoraConfig, LoraModule, LoraWeights};
use std::path::PathBuf;

struct Planned {
    info: TensorInfo,
    module: LoraModule,
    a: bool,
    permute: Option<usize>,
}

fn tensor_type(dtype: GgmlType, shape: &[usize]) -> GgmlType {
    if dtype.fits(shape) {
        dtype
    } else {
        GgmlType::F16
    }
}

fn plan(
    cfg: &ModelConfig,
    lcfg: &LoraConfig,
    w: &LoraWeights,
    dtype: GgmlType,
) -> Result<Vec<Planned>> {
    let mut out = Vec::new();
    for (module, pair) in &w.modules {
        if pair.rank() != lcfg.r {
            return Err(Error::Unsupported(format!(
                "{module}: rank {} differs from r = {}; a GGUF LoRA has one alpha/r",
                pair.rank(),
                lcfg.r
            )));
        }
        if *module == LoraModule::lm_head() && cfg.tie_word_embeddings {
            return Err(Error::Unsupported(
                "an lm_head adapter on tied embeddings: the base GGUF has no output.weight to \
                 apply it to; export the merged model instead"
                    .into(),
            ));
        }
        let hf = format!("{}.weight", module.path());
        let name = llama::gguf_name(&hf)
            .ok_or_else(|| Error::Unsupported(format!("{module}: no llama.cpp tensor")))?;
        let a_shape = vec![pair.rank(), pair.in_features];
        let b_shape = vec![pair.out_features, pair.rank()];
        out.push(Planned {
            info: TensorInfo {
                name: format!("{name}.lora_a"),
                ty: tensor_type(dtype, &a_shape),
                shape: a_shape,
            },
            module: *module,
            a: true,
            permute: None,
        });
        out.push(Planned {
            info: TensorInfo {
                name: format!("{name}.lora_b"),
                ty: tensor_type(dtype, &b_shape),
                shape: b_shape,
            },
            module: *module,
            a: false,
            permute: llama::permute_heads(&hf, cfg),
        });
    }
    Ok(out)
}

/// Writes the adapter of `opts` (which must have one) as a GGUF LoRA; see the module docs.
pub fn export_lora(opts: &ExportOptions, base: PathBuf, cfg: &ModelConfig) -> Result<ExportReport> {
    let dir = opts
        .adapter
        .as_ref()
        .ok_or_else(|| Error::InvalidArg("--lora-only needs --adapter".into()))?;
    let (lcfg, weights) = crate::lora::load_adapter(dir, cfg)?;
    super::check_output(&opts.output, opts.overwrite)?;
    let planned = plan(cfg, &lcfg, &weights, opts.dtype.ggml())?;
    let mut g = GgufWriter::new();
    g.add("general.architecture", Value::Str(llama::ARCH.into()));
    g.add("general.type", Value::Str("adapter".into()));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    g.add("general.name", Value::Str(name));
    g.add(
        "general.alignment",
        Value::U32(super::gguf::DEFAULT_ALIGNMENT as u32),
    );
    g.add("general.file_type", Value::U32(opts.dtype.file_type()));
    g.add("adapter.type", Value::Str("lora".into()));
    g.add(
        "adapter.lora.alpha",
        Value::F32(lcfg.scaling() * lcfg.r as f32),
    );
    for p in &planned {
        g.add_tensor(p.info.clone())?;
    }
    let bytes_out = g.write(&opts.output, |i, info| {
        let p = &planned[i];
        let pair = weights.get(&p.module).expect("planned module");
        let v = match (p.a, p.permute) {
            (true, _) => pair.a.clone(),
            (false, None) => pair.b.clone(),
            (false, Some(heads)) => llama::permute_rows(&pair.b, heads, pair.rank()),
        };
        Ok(info.ty.encode(&v))
    })?;
    Ok(ExportReport {
        base,
        tensors: planned.len(),
        merged_modules: 0,
        tokenizer: "none",
        bytes_out,
    })
}
