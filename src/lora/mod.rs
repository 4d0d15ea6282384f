//! LoRA adapters: configuration, weights, initialization, and Hugging Face PEFT file I/O.
//!
//! An adapter is what `peft` writes with `save_pretrained`: `adapter_config.json` (a
//! [`LoraConfig`]) and `adapter_model.safetensors` ([`LoraWeights`], one `lora_A` / `lora_B` pair
//! per adapted linear layer). Files written here load in PEFT and vice versa.

pub mod adapter;
pub mod config;

pub use adapter::{
    adapter_files, base_params, format_trainable, kaiming_uniform_bound, load_adapter,
    save_adapter, trainable_params, trainable_report, write_adapter, AdapterFiles, LoraPair,
    LoraWeights,
};
pub use config::{peft_key, LoraConfig, LoraModule, LoraTarget, CONFIG_FILE, WEIGHTS_FILE};
