//! The Llama decoder, written once against [`crate::backend::Backend`].

mod forward;
mod llama;
pub mod lora;
mod source;
pub mod train;

pub(crate) use forward::KEEP_SCRATCH_ROWS;
pub use forward::{KvCache, Logits};
pub use llama::{BaseQuant, LayerWeights, Llama, LoadStats, MergeLora};
pub use lora::{Lora, LoraLinear, LoraSet};
pub use train::{Recompute, SeqInput, StepStats};
