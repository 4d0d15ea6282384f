//! Dataset loading: JSONL / JSON / Parquet files and folders, and the error messages users see.

use qlora::data::{data_files, load_rows, select_data_files, texts, Row};
use qlora::Error;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn guanaco() -> PathBuf {
    fixtures().join("guanaco-llama2-1k")
}

const GUANACO_PARQUET: &str = "train-00000-of-00001-9ad84bb9cf65a42f.parquet";

fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn values(rows: &[Row]) -> Vec<Value> {
    rows.iter().map(|r| r.value.clone()).collect()
}

#[test]
fn jsonl_rows_with_lines_and_blank_lines_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.jsonl",
        "{\"text\": \"a\"}\n\n{\"text\": \"b\", \"n\": 2}\r\n   \n{\"text\": \"c\"}",
    );
    let rows = load_rows(&path, None).unwrap();
    assert_eq!(
        values(&rows),
        vec![
            json!({"text": "a"}),
            json!({"text": "b", "n": 2}),
            json!({"text": "c"})
        ]
    );
    let lines: Vec<_> = rows.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![Some(1), Some(3), Some(5)]);
    assert!(rows.iter().all(|r| r.file == path));
    assert_eq!(texts(&rows, "text").unwrap(), vec!["a", "b", "c"]);
}

#[test]
fn json_array_and_wrapped_array() {
    let dir = tempfile::tempdir().unwrap();
    let arr = write(dir.path(), "a.json", r#"[{"text": "x"}, {"text": "y"}]"#);
    let rows = load_rows(&arr, None).unwrap();
    assert_eq!(texts(&rows, "text").unwrap(), vec!["x", "y"]);
    assert_eq!(rows[0].line, None);

    for key in ["data", "train", "rows"] {
        let path = write(
            dir.path(),
            &format!("{key}-wrapped.json"),
            &format!(r#"{{"version": 1, "{key}": [{{"text": "z"}}]}}"#),
        );
        let rows = load_rows(&path, None).unwrap();
        assert_eq!(texts(&rows, "text").unwrap(), vec!["z"], "key {key}");
    }

    let bad = write(dir.path(), "bad.json", r#"{"version": 1, "items": []}"#);
    let msg = load_rows(&bad, None).unwrap_err().to_string();
    assert!(msg.contains("bad.json") && msg.contains("`data`"), "{msg}");

    let not_obj = write(dir.path(), "scalars.json", r#"[{"text": "ok"}, 3]"#);
    let msg = load_rows(&not_obj, None).unwrap_err().to_string();
    assert!(msg.contains("element 2 is a number"), "{msg}");
}

#[test]
fn json_file_holding_json_lines_is_read_as_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "train.json",
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\n",
    );
    let rows = load_rows(&path, None).unwrap();
    assert_eq!(texts(&rows, "text").unwrap(), vec!["a", "b"]);
    assert_eq!(rows[1].line, Some(2));
}

#[test]
fn guanaco_parquet_equals_jsonl() {
    let parquet = load_rows(&guanaco().join(GUANACO_PARQUET), None).unwrap();
    let jsonl = load_rows(&guanaco().join("train.jsonl"), None).unwrap();
    assert_eq!(parquet.len(), 1000);
    assert_eq!(jsonl.len(), 1000);
    assert_eq!(values(&parquet), values(&jsonl));
    let t = texts(&parquet, "text").unwrap();
    assert!(t[0].starts_with("<s>[INST] "), "{}", &t[0][..40]);
    assert_eq!(t, texts(&jsonl, "text").unwrap());
}

#[test]
fn nested_parquet_columns_become_json_arrays_of_objects() {
    let dir = fixtures().join("data");
    let parquet = load_rows(&dir.join("chat.parquet"), None).unwrap();
    let jsonl = load_rows(&dir.join("chat.jsonl"), None).unwrap();
    assert_eq!(parquet.len(), 3);
    assert_eq!(values(&parquet), values(&jsonl));
    assert_eq!(
        parquet[0].value["messages"],
        json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"}
        ])
    );
    assert_eq!(parquet[1].value["source"], Value::Null);
    assert_eq!(parquet[2].value["messages"], json!([]));
}

#[test]
fn folder_prefers_train_files_sorted_and_recursive() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "README.md", "# card");
    write(d, ".hidden/train.jsonl", "{\"text\": \"hidden\"}");
    write(d, "test.jsonl", "{\"text\": \"test\"}");
    write(d, "data/validation-00000.jsonl", "{\"text\": \"val\"}");
    write(d, "data/train-00001-of-00002.jsonl", "{\"text\": \"t2\"}");
    write(
        d,
        "data/train-00000-of-00002.jsonl",
        "{\"text\": \"t1a\"}\n{\"text\": \"t1b\"}",
    );
    write(d, "dataset_info.json", "{\"description\": \"\"}");
    let rows = load_rows(d, None).unwrap();
    assert_eq!(texts(&rows, "text").unwrap(), vec!["t1a", "t1b", "t2"]);

    // Without train files every data file is read, in sorted order; metadata files are not.
    let other = tempfile::tempdir().unwrap();
    write(other.path(), "b.jsonl", "{\"text\": \"b\"}");
    write(other.path(), "a.jsonl", "{\"text\": \"a\"}");
    write(other.path(), "dataset_info.json", "{\"description\": \"\"}");
    write(other.path(), "notes.txt", "not data");
    let rows = load_rows(other.path(), None).unwrap();
    assert_eq!(texts(&rows, "text").unwrap(), vec!["a", "b"]);
    assert_eq!(data_files(other.path()).unwrap().len(), 2);

    // Files of several formats are copies of one split: only the preferred format is read.
    write(other.path(), "c.json", "[{\"text\": \"c\"}]");
    let rows = load_rows(other.path(), None).unwrap();
    assert_eq!(texts(&rows, "text").unwrap(), vec!["a", "b"]);
}

#[test]
fn folder_of_the_real_guanaco_reads_one_copy_of_the_split() {
    // The folder holds the split twice (parquet and a JSONL copy): only the parquet is read.
    let rows = load_rows(&guanaco(), None).unwrap();
    assert_eq!(rows.len(), 1000);
    assert!(rows[0].file.ends_with(GUANACO_PARQUET));
    assert!(rows[999].file.ends_with(GUANACO_PARQUET));
}

#[test]
fn select_data_files_on_a_hub_listing() {
    let listing = [
        ".gitattributes",
        "README.md",
        "data/test-00000-of-00001.parquet",
        "data/train-00000-of-00001-9ad84bb9cf65a42f.parquet",
    ];
    assert_eq!(
        select_data_files(&listing),
        vec!["data/train-00000-of-00001-9ad84bb9cf65a42f.parquet"]
    );
    let by_folder = ["default/train/0000.parquet", "default/test/0000.parquet"];
    assert_eq!(
        select_data_files(&by_folder),
        vec!["default/train/0000.parquet"]
    );
    let no_train = ["z.jsonl", "dataset_infos.json", "a.jsonl", "x.csv"];
    assert_eq!(select_data_files(&no_train), vec!["a.jsonl", "z.jsonl"]);
    let mixed = ["z.jsonl", "a.json", "data/train.parquet", "train.jsonl"];
    assert_eq!(select_data_files(&mixed), vec!["data/train.parquet"]);
}

#[test]
fn empty_file_and_empty_folder_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.jsonl", "\n  \n");
    let err = load_rows(&empty, None).unwrap_err();
    assert!(matches!(err, Error::Dataset { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("empty.jsonl") && msg.contains("no rows in"),
        "{msg}"
    );

    let empty_arr = write(dir.path(), "empty.json", "[]");
    let msg = load_rows(&empty_arr, None).unwrap_err().to_string();
    assert!(msg.contains("no rows in"), "{msg}");

    let no_data = tempfile::tempdir().unwrap();
    write(no_data.path(), "README.md", "# nothing here");
    let msg = load_rows(no_data.path(), None).unwrap_err().to_string();
    assert!(msg.contains("no data files"), "{msg}");

    let folder = tempfile::tempdir().unwrap();
    write(folder.path(), "train.jsonl", "");
    let msg = load_rows(folder.path(), None).unwrap_err().to_string();
    assert!(
        msg.contains("no rows in") && msg.contains("train.jsonl"),
        "{msg}"
    );
}

#[test]
fn malformed_jsonl_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "broken.jsonl",
        "{\"text\": \"a\"}\n\n{\"text\": \"b\",}\n{\"text\": \"c\"}\n",
    );
    let err = load_rows(&path, None).unwrap_err();
    match &err {
        Error::Dataset { path: p, line, msg } => {
            assert_eq!(p, &path);
            assert_eq!(*line, Some(3));
            assert!(msg.contains("malformed JSON"), "{msg}");
            assert!(
                msg.contains("line 1 column"),
                "serde's error is kept: {msg}"
            );
        }
        other => panic!("expected Error::Dataset, got {other:?}"),
    }
    let shown = err.to_string();
    assert!(shown.contains("broken.jsonl:3:"), "{shown}");

    let not_object = write(
        dir.path(),
        "array-line.jsonl",
        "{\"text\": \"a\"}\n[1, 2]\n",
    );
    let msg = load_rows(&not_object, None).unwrap_err().to_string();
    assert!(
        msg.contains("array-line.jsonl:2:") && msg.contains("found an array"),
        "{msg}"
    );
}

#[test]
fn missing_text_field_names_row_line_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.jsonl",
        "{\"text\": \"a\"}\n\n{\"prompt\": \"p\", \"answer\": \"b\"}\n",
    );
    let rows = load_rows(&path, None).unwrap();
    let err = texts(&rows, "text").unwrap_err();
    assert!(
        matches!(err, Error::Dataset { line: Some(3), .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("d.jsonl:3:"), "{msg}");
    assert!(
        msg.contains("row 2 has no field `text` (fields: answer, prompt)"),
        "{msg}"
    );
}

#[test]
fn non_string_text_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.json",
        r#"[{"text": "a"}, {"text": 42}, {"text": null}]"#,
    );
    let rows = load_rows(&path, None).unwrap();
    let msg = texts(&rows, "text").unwrap_err().to_string();
    assert!(msg.contains("d.json"), "{msg}");
    assert!(
        msg.contains("row 2: field `text` is a number, expected a string"),
        "{msg}"
    );
    let msg = texts(&rows[2..], "text").unwrap_err().to_string();
    assert!(msg.contains("is null"), "{msg}");
}

#[test]
fn limit_stops_early_across_formats_and_files() {
    let jsonl = load_rows(&guanaco().join("train.jsonl"), Some(7)).unwrap();
    assert_eq!(jsonl.len(), 7);
    let parquet = load_rows(&guanaco().join(GUANACO_PARQUET), Some(7)).unwrap();
    assert_eq!(values(&parquet), values(&jsonl));

    // The limit is reached before the malformed line, which is therefore never parsed.
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.jsonl",
        "{\"text\": \"a\"}\n{\"text\": \"b\"}\nnot json\n",
    );
    assert_eq!(load_rows(&path, Some(2)).unwrap().len(), 2);
    assert!(load_rows(&path, None).is_err());

    write(
        dir.path(),
        "more/train-0.jsonl",
        "{\"text\": \"0\"}\n{\"text\": \"1\"}",
    );
    write(
        dir.path(),
        "more/train-1.jsonl",
        "{\"text\": \"2\"}\n{\"text\": \"3\"}",
    );
    let rows = load_rows(&dir.path().join("more"), Some(3)).unwrap();
    assert_eq!(texts(&rows, "text").unwrap(), vec!["0", "1", "2"]);
    assert!(load_rows(&path, Some(0)).unwrap().is_empty());
}

#[test]
fn unknown_extension_and_missing_path() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(dir.path(), "data.csv", "text\nhello\n");
    let msg = load_rows(&csv, None).unwrap_err().to_string();
    assert!(msg.contains("data.csv"), "{msg}");
    assert!(msg.contains(".jsonl") && msg.contains(".parquet"), "{msg}");

    let missing = dir.path().join("nope.jsonl");
    let err = load_rows(&missing, None).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.jsonl"));
}

#[test]
fn corrupt_parquet_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.parquet", "this is not parquet");
    let msg = load_rows(&path, None).unwrap_err().to_string();
    assert!(
        msg.contains("bad.parquet") && msg.contains("Parquet"),
        "{msg}"
    );
}
