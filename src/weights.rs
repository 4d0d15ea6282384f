//! TEMPORARY stub with the agreed API; replaced by the `weights` branch.
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use std::path::Path;

pub struct Checkpoint;
impl Checkpoint {
    pub fn open(_dir: &Path) -> Result<Checkpoint> {
        Err(Error::Unsupported("stub".into()))
    }
    pub fn load_f32(&self, _name: &str, _shape: &[usize]) -> Result<Vec<f32>> {
        Err(Error::Unsupported("stub".into()))
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
