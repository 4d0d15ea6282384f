//! The Llama decoder, written once against [`crate::backend::Backend`].

mod llama;

pub use llama::{BaseQuant, KvCache, LayerWeights, Llama, Logits};
