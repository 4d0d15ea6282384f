//! TEMPORARY stub with the agreed API; replaced by the `hub` branch.
use crate::error::Result;
use std::path::PathBuf;
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    Ok(PathBuf::from(spec))
}
pub fn resolve_dataset(spec: &str) -> Result<PathBuf> {
    Ok(PathBuf::from(spec))
}
