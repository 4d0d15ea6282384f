//! The Llama decoder, written once against [`crate::backend::Backend`].

mod llama;
pub mod lora;
pub mod train;

pub(crate) use llama::KEEP_SCRATCH_ROWS;
pub use llama::{BaseQuant, KvCache, LayerWeights, Llama, LoadStats, Logits, MergeLora};
pub use lora::{Lora, LoraLinear, LoraSet};
pub use train::{Recompute, SeqInput, StepStats};
