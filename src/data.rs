//! TEMPORARY stub with the agreed API; replaced by the `hub` branch.
use crate::error::Result;
use std::path::{Path, PathBuf};
pub struct Row {
    pub value: serde_json::Value,
    pub file: PathBuf,
    pub line: Option<usize>,
}
pub fn load_rows(_path: &Path, _limit: Option<usize>) -> Result<Vec<Row>> {
    Ok(vec![])
}
pub fn texts(_rows: &[Row], _field: &str) -> Result<Vec<String>> {
    Ok(vec![])
}
