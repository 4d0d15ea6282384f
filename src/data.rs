//! Dataset loading: local JSONL / JSON / Parquet files, or a folder of them, as JSON rows.
//!
//! Every row comes back as a [`serde_json::Value`] together with the file (and, for JSONL, the
//! line) it was read from, so later stages (templating, tokenization) can report *where* a bad
//! row is. Formats, chosen by extension:
//!
//! - `.jsonl` / `.ndjson`: one JSON object per line; blank lines are skipped.
//! - `.json`: a top-level array of objects, or an object holding such an array under `data`,
//!   `train` or `rows`. A `.json` file that is really JSON Lines (common on the Hub) is read as
//!   JSONL.
//! - `.parquet`: read with the `parquet` crate's row API; nested columns (lists, structs, maps)
//!   become JSON arrays / objects; binary columns become strings when they are UTF-8.
//!
//! A folder is searched recursively (hidden entries skipped) for data files; when some of them
//! belong to the train split (file name starting with `train`, or inside a `train` folder) only
//! those are used. [`select_data_files`] is the same rule applied to a list of names, which
//! [`crate::hub`] uses to choose what to download from a dataset repo.

use crate::error::{Error, Result};
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// One dataset row as JSON, with where it came from (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The row; always a JSON object.
    pub value: Value,
    /// The file the row was read from.
    pub file: PathBuf,
    /// 1-based line number for JSONL rows; `None` for JSON arrays and Parquet.
    pub line: Option<usize>,
}

/// The largest dataset row accepted, in bytes (a JSONL line, or a JSON / Parquet row's strings
/// and values): 16 MiB, far beyond any context length (a 128 k-token context is well under 1 MiB
/// of text). A larger row is an error naming it, found without reading more than this much of it.
pub const MAX_ROW_BYTES: usize = 16 << 20;

/// File extensions [`load_rows`] understands, for error messages.
pub const SUPPORTED_FORMATS: &str = ".jsonl, .ndjson, .json, .parquet";

/// Files that sit beside data files (written by `datasets.save_to_disk` and friends) and are
/// never rows.
const METADATA_FILES: &[&str] = &[
    "dataset_info.json",
    "dataset_infos.json",
    "dataset_dict.json",
    "state.json",
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Jsonl,
    Json,
    Parquet,
}

fn format_of(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "jsonl" | "ndjson" => Some(Format::Jsonl),
        "json" => Some(Format::Json),
        "parquet" => Some(Format::Parquet),
        _ => None,
    }
}

/// Chooses the data files among relative paths (`/`-separated, as in a Hub repo listing):
/// keeps `.jsonl` / `.ndjson` / `.json` / `.parquet` files that are not hidden and not dataset
/// metadata, then, if any of them is in the train split (its file name starts with `train`, or
/// a folder on its path is named `train`), keeps only those; when they come in several formats,
/// only the first of parquet, jsonl, json is kept (copies of one split). The result is sorted.
pub fn select_data_files<S: AsRef<str>>(rel_paths: &[S]) -> Vec<String> {
    let mut data: Vec<String> = rel_paths
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| {
            let parts: Vec<&str> = p.split('/').collect();
            let name = parts.last().copied().unwrap_or_default();
            !parts.iter().any(|c| c.starts_with('.'))
                && !METADATA_FILES.contains(&name)
                && format_of(Path::new(name)).is_some()
        })
        .map(str::to_owned)
        .collect();
    let is_train = |p: &String| {
        let parts: Vec<&str> = p.split('/').collect();
        let (name, dirs) = parts.split_last().expect("split yields at least one part");
        name.to_ascii_lowercase().starts_with("train")
            || dirs.iter().any(|d| d.eq_ignore_ascii_case("train"))
    };
    if data.iter().any(is_train) {
        data.retain(is_train);
    }
    // The same split exported in several formats (a parquet and a JSONL copy side by side) is one
    // dataset, not two: keep only the preferred format, parquet > jsonl > json.
    let fmt = |p: &String| format_of(Path::new(p));
    if let Some(best) = [Format::Parquet, Format::Jsonl, Format::Json]
        .into_iter()
        .find(|f| data.iter().any(|p| fmt(p) == Some(*f)))
    {
        data.retain(|p| fmt(p) == Some(best));
    }
    data.sort();
    data.dedup();
    data
}

/// The data files [`load_rows`] would read from folder `dir`, as full paths, in reading order.
/// A symlink whose target is missing is still listed (reading it then fails naming it), so a
/// half-downloaded Hugging Face cache snapshot is not mistaken for a complete one.
pub fn data_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut rel = Vec::new();
    walk(dir, "", 0, &mut rel)?;
    Ok(select_data_files(&rel)
        .into_iter()
        .map(|r| r.split('/').fold(dir.to_path_buf(), |p, c| p.join(c)))
        .collect())
}

fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<String>) -> Result<()> {
    // Hub dataset repos nest a few levels at most (config/split/shard); the cap also guards
    // against symlink loops.
    if depth > 8 {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        // `metadata` follows symlinks; a dangling one errors and is listed as a file.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, &rel, depth + 1, out)?,
            _ => out.push(rel),
        }
    }
    Ok(())
}

/// Loads every row of a local JSONL / JSON / Parquet file, or of all such data files in a folder
/// (sorted, train split preferred: if a folder has files whose name starts with `train`, use
/// only those). `limit` stops reading once that many rows are collected.
pub fn load_rows(path: &Path, limit: Option<usize>) -> Result<Vec<Row>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    if limit == Some(0) {
        return Ok(rows);
    }
    if meta.is_dir() {
        let files = data_files(path)?;
        if files.is_empty() {
            return Err(dataset_err(
                path,
                None,
                format!("no data files ({SUPPORTED_FORMATS}) in this folder"),
            ));
        }
        for file in &files {
            let left = limit.map(|l| l - rows.len());
            rows.extend(load_file(file, left)?);
            if limit.is_some_and(|l| rows.len() >= l) {
                break;
            }
        }
        if rows.is_empty() {
            let names: Vec<String> = files
                .iter()
                .map(|f| f.strip_prefix(path).unwrap_or(f).display().to_string())
                .collect();
            return Err(dataset_err(
                path,
                None,
                format!(
                    "no rows in any data file of this folder ({})",
                    names.join(", ")
                ),
            ));
        }
    } else {
        rows = load_file(path, limit)?;
        if rows.is_empty() {
            return Err(dataset_err(path, None, "no rows in this file".into()));
        }
    }
    Ok(rows)
}

pub(crate) fn dataset_err(path: &Path, line: Option<usize>, msg: String) -> Error {
    Error::Dataset {
        path: path.to_path_buf(),
        line,
        msg,
    }
}

/// Reads one data file (possibly yielding no rows).
fn load_file(path: &Path, limit: Option<usize>) -> Result<Vec<Row>> {
    match format_of(path) {
        Some(Format::Jsonl) => {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            read_jsonl(path, BufReader::new(file), limit)
        }
        Some(Format::Json) => read_json(path, limit),
        Some(Format::Parquet) => read_parquet(path, limit),
        None => Err(dataset_err(
            path,
            None,
            format!(
                "unsupported dataset format; supported: {SUPPORTED_FORMATS} (or a folder of them)"
            ),
        )),
    }
}

pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn read_jsonl(path: &Path, mut reader: impl BufRead, limit: Option<usize>) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut buf = Vec::new();
    for n in 1.. {
        if limit.is_some_and(|l| rows.len() >= l) {
            break;
        }
        buf.clear();
        // At most one byte past the limit is read, so a huge line costs no more than that.
        let got = (&mut reader)
            .take(MAX_ROW_BYTES as u64 + 2)
            .read_until(b'\n', &mut buf)
            .map_err(|e| dataset_err(path, Some(n), format!("cannot read line: {e}")))?;
        if got == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        if buf.len() > MAX_ROW_BYTES {
            return Err(dataset_err(
                path,
                Some(n),
                format!("the line is longer than {MAX_ROW_BYTES} bytes, the limit for one row"),
            ));
        }
        let line = std::str::from_utf8(&buf).map_err(|e| {
            dataset_err(path, Some(n), format!("cannot read line: not UTF-8 ({e})"))
        })?;
        let text = if n == 1 {
            line.trim_start_matches('\u{feff}')
        } else {
            line
        };
        if text.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text)
            .map_err(|e| dataset_err(path, Some(n), format!("malformed JSON: {e}")))?;
        if !value.is_object() {
            return Err(dataset_err(
                path,
                Some(n),
                format!("expected a JSON object, found {}", json_kind(&value)),
            ));
        }
        rows.push(Row {
            value,
            file: path.to_path_buf(),
            line: Some(n),
        });
    }
    Ok(rows)
}

/// A row's size as [`MAX_ROW_BYTES`] counts it: its strings' and keys' bytes plus 8 per other
/// value (about its JSON size), stopping early once past `cap`.
fn row_bytes(v: &Value, cap: usize) -> usize {
    fn walk(v: &Value, total: &mut usize, cap: usize) {
        if *total > cap {
            return;
        }
        match v {
            Value::String(s) => *total += s.len() + 2,
            Value::Array(a) => {
                *total += 2;
                for x in a {
                    walk(x, total, cap);
                }
            }
            Value::Object(o) => {
                *total += 2;
                for (k, x) in o {
                    *total += k.len() + 3;
                    walk(x, total, cap);
                }
            }
            _ => *total += 8,
        }
    }
    let mut total = 0;
    walk(v, &mut total, cap);
    total
}

/// Refuses a JSON or Parquet row larger than [`MAX_ROW_BYTES`] (`n` is 1-based).
fn check_row_size(path: &Path, n: usize, v: &Value) -> Result<()> {
    let size = row_bytes(v, MAX_ROW_BYTES);
    if size > MAX_ROW_BYTES {
        return Err(dataset_err(
            path,
            None,
            format!("row {n} is larger than {MAX_ROW_BYTES} bytes, the limit for one row"),
        ));
    }
    Ok(())
}

fn read_json(path: &Path, limit: Option<usize>) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let text = text.trim_start_matches('\u{feff}');
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        // Hub datasets often name JSON Lines files `.json`: several objects, one per line.
        Err(_) if first_line_is_object(text) => {
            return read_jsonl(path, text.as_bytes(), limit);
        }
        Err(e) => {
            return Err(dataset_err(
                path,
                Some(e.line()),
                format!("malformed JSON: {e}"),
            ))
        }
    };
    let items = match value {
        Value::Array(items) => items,
        Value::Object(mut obj) => {
            let key = ["data", "train", "rows"]
                .into_iter()
                .find(|k| obj.get(*k).is_some_and(Value::is_array));
            match key.and_then(|k| obj.remove(k)) {
                Some(Value::Array(items)) => items,
                _ => {
                    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
                    return Err(dataset_err(
                        path,
                        None,
                        format!(
                            "expected a top-level array of objects, or an object with a `data`, \
                             `train` or `rows` array (top-level keys: {})",
                            keys.join(", ")
                        ),
                    ));
                }
            }
        }
        other => {
            return Err(dataset_err(
                path,
                None,
                format!(
                    "expected a top-level array of objects, found {}",
                    json_kind(&other)
                ),
            ))
        }
    };
    let take = limit.unwrap_or(usize::MAX);
    items
        .into_iter()
        .take(take)
        .enumerate()
        .map(|(i, value)| {
            if !value.is_object() {
                return Err(dataset_err(
                    path,
                    None,
                    format!(
                        "element {} is {}, expected an object",
                        i + 1,
                        json_kind(&value)
                    ),
                ));
            }
            check_row_size(path, i + 1, &value)?;
            Ok(Row {
                value,
                file: path.to_path_buf(),
                line: None,
            })
        })
        .collect()
}

/// Whether the first non-blank line is a complete JSON object on its own (JSON Lines).
fn first_line_is_object(text: &str) -> bool {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|v| v.is_object())
}

/// Reads a Parquet file's rows. The `parquet` crate panics on some corrupt files (a page whose
/// lengths point past its end trips a slice index in `bit_util::read_num_bytes`; found by the
/// fuzz target `dataset_rows`), so the reading runs under `catch_unwind` and a panic becomes an
/// error naming the file. Nothing outlives a panic: the reader and the rows read so far are
/// dropped with it.
fn read_parquet(path: &Path, limit: Option<usize>) -> Result<Vec<Row>> {
    let read = std::panic::AssertUnwindSafe(|| read_parquet_rows(path, limit));
    match std::panic::catch_unwind(read) {
        Ok(rows) => rows,
        Err(panic) => Err(dataset_err(
            path,
            None,
            format!(
                "cannot read Parquet file: it is corrupt (the parquet library panicked: {})",
                crate::tokenizer::panic_message(&*panic)
            ),
        )),
    }
}

fn read_parquet_rows(path: &Path, limit: Option<usize>) -> Result<Vec<Row>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: parquet::errors::ParquetError| {
        dataset_err(path, None, format!("cannot read Parquet file: {e}"))
    };
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    // The footer's row count is only a hint: a corrupt file may claim anything.
    let total = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
    let take = limit.unwrap_or(usize::MAX);
    let mut rows = Vec::with_capacity(total.min(take).min(1 << 16));
    for (i, row) in reader
        .get_row_iter(None)
        .map_err(bad)?
        .take(take)
        .enumerate()
    {
        let row = row.map_err(bad)?;
        let value = row_to_json(&row);
        check_row_size(path, i + 1, &value)?;
        rows.push(Row {
            value,
            file: path.to_path_buf(),
            line: None,
        });
    }
    Ok(rows)
}

/// A Parquet record as a JSON object (what `Row::to_json_value` does behind the crate's `json`
/// feature, except that binary values that are valid UTF-8 become strings).
fn row_to_json(row: &parquet::record::Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, field)| (name.clone(), field_to_json(field)))
            .collect(),
    )
}

fn field_to_json(field: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    let float = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    match field {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(n) => (*n).into(),
        F::Short(n) => (*n).into(),
        F::Int(n) => (*n).into(),
        F::Long(n) => (*n).into(),
        F::UByte(n) => (*n).into(),
        F::UShort(n) => (*n).into(),
        F::UInt(n) => (*n).into(),
        F::ULong(n) => (*n).into(),
        F::Float16(x) => float(f64::from(*x)),
        F::Float(x) => float(f64::from(*x)),
        F::Double(x) => float(*x),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::Array(b.data().iter().map(|&x| x.into()).collect()),
        },
        F::Decimal(_)
        | F::Date(_)
        | F::TimeMillis(_)
        | F::TimeMicros(_)
        | F::TimestampMillis(_)
        | F::TimestampMicros(_) => Value::String(field.to_string()),
        F::Group(row) => row_to_json(row),
        F::ListInternal(list) => Value::Array(list.elements().iter().map(field_to_json).collect()),
        F::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, field_to_json(v))
                })
                .collect(),
        ),
    }
}

/// Extracts the string field `field` from every row; error naming file and line when absent or
/// not a string. Rows are numbered from 1 within their file ("row N"); JSONL errors also carry
/// the line number.
pub fn texts(rows: &[Row], field: &str) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(rows.len());
    let mut n = 0usize;
    let mut prev: Option<&Path> = None;
    for row in rows {
        if prev != Some(row.file.as_path()) {
            n = 0;
            prev = Some(row.file.as_path());
        }
        n += 1;
        let err = |msg: String| dataset_err(&row.file, row.line, msg);
        match row.value.get(field) {
            Some(Value::String(s)) => out.push(s.clone()),
            Some(other) => {
                return Err(err(format!(
                    "row {n}: field `{field}` is {}, expected a string",
                    json_kind(other)
                )))
            }
            None => {
                let fields = match &row.value {
                    Value::Object(obj) if !obj.is_empty() => obj
                        .keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                    Value::Object(_) => "none".to_owned(),
                    other => format!("not an object but {}", json_kind(other)),
                };
                return Err(err(format!(
                    "row {n} has no field `{field}` (fields: {fields})"
                )));
            }
        }
    }
    Ok(out)
}
