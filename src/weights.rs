//! TEMPORARY stub with the agreed API; replaced by the `weights` branch.
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use std::path::Path;

pub struct Checkpoint(Vec<u8>);
impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        Ok(Checkpoint(
            std::fs::read(dir.join("model.safetensors")).map_err(|e| Error::io(dir, e))?,
        ))
    }
    pub fn load_f32(&self, name: &str, _shape: &[usize]) -> Result<Vec<f32>> {
        let st = safetensors::SafeTensors::deserialize(&self.0)
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        let t = st
            .tensor(name)
            .map_err(|e| Error::Unsupported(e.to_string()))?;
        Ok(match t.dtype() {
            safetensors::Dtype::F32 => t
                .data()
                .chunks(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            _ => t
                .data()
                .chunks(2)
                .map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).to_f32())
                .collect(),
        })
    }
}
pub fn llama_tensor_names(_cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    vec![]
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}
impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub shard: String,
}
pub fn tensor_plan(_dir: &Path, _cfg: &ModelConfig) -> Result<Vec<PlannedTensor>> {
    Ok(vec![])
}
