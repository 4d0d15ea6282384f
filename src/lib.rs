//! `qlora`: QLoRA finetuning for Llama-family models in one self-contained binary.
//!
//! Layout (one concern per module):
//! - [`config`]: `config.json` → [`config::ModelConfig`]
//! - [`hub`]: model / dataset ids → local paths (HF cache, download)
//! - [`weights`]: memory-mapped (sharded) safetensors, the tensor plan
//! - [`tokenizer`]: `tokenizer.json` + chat templates
//! - [`data`]: JSONL / JSON / Parquet datasets
//! - [`backend`]: the op set of a Llama step (CPU spec, CUDA)
//! - [`model`]: the Llama forward written once against [`backend::Backend`]
//! - [`generate`], [`eval`], [`inspect`]: the user-facing jobs
//! - [`export`]: a model (+ adapter) as one GGUF file for llama.cpp / Ollama
//! - [`check`]: the CUDA backend against its CPU specification (`qlora check`)
//! - [`loader`]: model id → tokenizer + model on a backend, with progress
//! - [`lora`]: LoRA adapters (config, weights, init, PEFT file I/O)
//! - [`train`]: AdamW, gradient clipping, learning-rate schedules
//! - [`durable`]: crash-safe output files (fsync, atomic renames, fault injection), the output lock
//!
//! The binary (`src/main.rs`, `src/cli.rs`) parses arguments and reports errors; everything else
//! lives here.

pub mod backend;
pub mod check;
pub mod config;
pub mod data;
pub mod durable;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod hub;
pub mod inspect;
pub mod loader;
pub mod lora;
pub mod merge;
pub mod model;
pub mod quant;
pub mod sys;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
