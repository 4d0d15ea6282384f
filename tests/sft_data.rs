//! The SFT data pipeline (`qlora::train::data`) on the real guanaco-llama2-1k rows and the Llama-2
//! tokenizer and chat template: ids, labels, truncation, skipping, batches, packing, splits.

use qlora::data::{load_rows, Row};
use qlora::tokenizer::Tokenizer;
use qlora::train::data::{
    build_examples, epoch_batches, split_eval, BatchOptions, Example, SftOptions,
};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tok() -> Tokenizer {
    Tokenizer::from_dir(&root().join("tests/fixtures/tiny/tokenizer")).unwrap()
}

fn opts(max_seq_len: usize, completion_only: bool) -> SftOptions {
    SftOptions {
        text_field: "text".into(),
        messages_field: "messages".into(),
        completion_only_loss: completion_only,
        max_seq_len,
    }
}

fn rows(values: Vec<serde_json::Value>) -> Vec<Row> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, value)| Row {
            value,
            file: PathBuf::from("mem.jsonl"),
            line: Some(i + 1),
        })
        .collect()
}

fn sha256_ids(ids: &[u32]) -> String {
    use sha2::Digest;
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    format!("{:x}", sha2::Sha256::digest(&bytes))
}

#[test]
fn guanaco_text_rows_match_python_ids_plus_eos() {
    let path = root().join("tests/fixtures/guanaco-llama2-1k/train.jsonl");
    let rows = load_rows(&path, Some(50)).unwrap();
    let llama2 = Tokenizer::from_dir(&root().join("tests/fixtures/llama-2-7b-chat-hf")).unwrap();
    let (ex, stats) = build_examples(&rows, &llama2, &opts(100_000, false), &path).unwrap();
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/tiny/guanaco_llama2_ids.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ex.len(), 50);
    assert_eq!((stats.rows, stats.examples, stats.truncated), (50, 50, 0));
    for (e, g) in ex.iter().zip(golden["rows"].as_array().unwrap()) {
        // Python's ids (the rows already end with a literal "</s>", so no EOS is appended).
        let n = g["len"].as_u64().unwrap() as usize;
        assert_eq!(e.ids.last(), Some(&2), "ends with EOS");
        let body = if e.ids.len() == n {
            &e.ids[..]
        } else {
            &e.ids[..e.ids.len() - 1]
        };
        assert_eq!(body.len(), n);
        assert_eq!(sha256_ids(body), g["sha256"].as_str().unwrap());
        assert_eq!(
            e.labels,
            e.ids.iter().map(|&i| i as i32).collect::<Vec<_>>()
        );
    }
    assert_eq!(stats.tokens, ex.iter().map(Example::len).sum::<usize>());
}

#[test]
fn eos_is_appended_to_text_without_it() {
    let r = rows(vec![json!({"text": "Hello world"})]);
    let (ex, _) = build_examples(&r, &tok(), &opts(64, false), Path::new("mem")).unwrap();
    assert_eq!(ex[0].ids[0], 1, "BOS");
    assert_eq!(*ex[0].ids.last().unwrap(), 2, "EOS appended");
    assert_eq!(tok().decode(&ex[0].ids, true).unwrap(), "Hello world");
}

#[test]
fn completion_only_loss_labels_exactly_the_assistant_turns() {
    let t = tok();
    let r = rows(vec![json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six."}
    ]})]);
    let (ex, _) = build_examples(&r, &t, &opts(512, true), Path::new("mem")).unwrap();
    let e = &ex[0];
    // The labelled tokens, in runs, decode to each assistant turn followed by its EOS.
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for (&id, &l) in e.ids.iter().zip(&e.labels) {
        let on = l != -100;
        if on && !prev {
            runs.push(Vec::new());
        }
        if on {
            assert_eq!(l, id as i32);
            runs.last_mut().unwrap().push(id);
        }
        prev = on;
    }
    assert_eq!(runs.len(), 2, "two assistant turns");
    for (run, want) in runs.iter().zip(["It is 4.", "Six."]) {
        assert_eq!(*run.last().unwrap(), 2, "the turn's EOS is learned");
        assert_eq!(t.decode(run, true).unwrap().trim(), want);
    }
    // Without completion-only loss every token is labelled.
    let (all, _) = build_examples(&r, &t, &opts(512, false), Path::new("mem")).unwrap();
    assert_eq!(all[0].ids, e.ids);
    assert!(all[0].labels.iter().all(|&l| l != -100));
}

#[test]
fn chat_fixture_rows_skip_and_count() {
    let path = root().join("tests/fixtures/data/chat.jsonl");
    let rows = load_rows(&path, None).unwrap();
    let (ex, stats) = build_examples(&rows, &tok(), &opts(512, true), &path).unwrap();
    // chat.jsonl: two conversations with an assistant turn, one with no messages at all.
    assert_eq!(stats.rows, rows.len());
    assert_eq!(stats.examples, ex.len());
    assert_eq!(
        stats.skipped_no_assistant + stats.skipped_empty + ex.len(),
        rows.len()
    );
    assert!(stats.skipped_no_assistant >= 1);
}

#[test]
fn rows_without_assistant_turn_are_skipped_and_counted() {
    let r = rows(vec![
        json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}),
        json!({"messages": [{"role": "user", "content": "Anyone?"}]}),
    ]);
    let (ex, stats) = build_examples(&r, &tok(), &opts(64, true), Path::new("mem")).unwrap();
    assert_eq!(ex.len(), 1);
    assert_eq!(stats.skipped_no_assistant, 1);
    // All skipped: a clear error with the counts.
    let only = rows(vec![
        json!({"messages": [{"role": "user", "content": "Anyone?"}]}),
    ]);
    let err = build_examples(&only, &tok(), &opts(64, true), Path::new("x.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("x.jsonl") && err.contains("1 without an assistant turn"),
        "{err}"
    );
}

#[test]
fn truncation_is_counted() {
    let r = rows(vec![
        json!({"text": "one two three four five six seven eight nine ten eleven twelve"}),
        json!({"text": "short"}),
    ]);
    let (ex, stats) = build_examples(&r, &tok(), &opts(6, false), Path::new("mem")).unwrap();
    assert_eq!(stats.truncated, 1);
    assert_eq!(ex[0].len(), 6);
    assert_eq!(ex[0].labels.len(), 6);
}

#[test]
fn prompt_completion_masks_the_prompt() {
    let r = rows(vec![json!({"prompt": "Q: 2+2?", "completion": " A: 4"})]);
    let (ex, _) = build_examples(&r, &tok(), &opts(64, true), Path::new("mem")).unwrap();
    let e = &ex[0];
    let labelled: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.labels)
        .filter(|(_, &l)| l != -100)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(tok().decode(&labelled, true).unwrap().trim(), "A: 4");
    assert_eq!(*labelled.last().unwrap(), 2);
}

#[test]
fn bad_rows_are_clear_errors() {
    let t = tok();
    let err = |r: Vec<serde_json::Value>, o: SftOptions| {
        build_examples(&rows(r), &t, &o, Path::new("d.jsonl"))
            .unwrap_err()
            .to_string()
    };
    let e = err(vec![], opts(64, false));
    assert!(e.contains("d.jsonl") && e.contains("empty"), "{e}");
    let e = err(vec![json!({"body": "x"})], opts(64, false));
    assert!(e.contains("mem.jsonl") && e.contains("body"), "{e}");
    let e = err(
        vec![json!({"text": "a"}), json!({"text": 3})],
        opts(64, false),
    );
    assert!(e.contains("mem.jsonl:2") && e.contains("a number"), "{e}");
    let e = err(vec![json!({"text": "a"})], opts(64, true));
    assert!(e.contains("--completion-only-loss"), "{e}");
    let e = err(vec![json!({"messages": "hi"})], opts(64, false));
    assert!(e.contains("messages"), "{e}");
}

fn lengths() -> Vec<usize> {
    (0..103).map(|i| 5 + (i * 37) % 90).collect()
}

fn bopts(group: bool, packing: bool) -> BatchOptions {
    BatchOptions {
        batch_size: 4,
        group_by_length: group,
        packing,
        max_seq_len: 100,
        seed: 42,
        drop_last: false,
    }
}

fn flat(b: &[Vec<Vec<usize>>]) -> Vec<usize> {
    b.iter().flatten().flatten().copied().collect()
}

#[test]
fn every_example_once_per_epoch_deterministic_and_reshuffled() {
    let l = lengths();
    for (group, packing) in [(false, false), (true, false), (false, true)] {
        let o = bopts(group, packing);
        let e0 = epoch_batches(&l, &o, 0);
        let mut seen = flat(&e0);
        seen.sort_unstable();
        assert_eq!(seen, (0..l.len()).collect::<Vec<_>>(), "{group} {packing}");
        assert_eq!(e0, epoch_batches(&l, &o, 0), "deterministic");
        let e1 = epoch_batches(&l, &o, 1);
        assert_ne!(flat(&e0), flat(&e1), "reshuffled each epoch");
        assert_eq!(e0.len(), e1.len(), "same number of batches every epoch");
        assert!(e0.iter().all(|b| !b.is_empty() && b.len() <= 4));
        let mut other = o.clone();
        other.seed = 7;
        assert_ne!(flat(&e0), flat(&epoch_batches(&l, &other, 0)));
    }
    let mut o = bopts(false, false);
    o.drop_last = true;
    assert_eq!(epoch_batches(&l, &o, 0).len(), 103 / 4);
}

#[test]
fn group_by_length_puts_the_longest_first_and_groups_lengths() {
    let l = lengths();
    let b = epoch_batches(&l, &bopts(true, false), 3);
    let max = *l.iter().max().unwrap();
    assert!(b[0].iter().flatten().any(|&i| l[i] == max));
    // Length spread inside batches is far below the spread of random batches.
    let spread = |b: &[Vec<Vec<usize>>]| -> f64 {
        b.iter()
            .map(|x| {
                let ls: Vec<usize> = x.iter().flatten().map(|&i| l[i]).collect();
                (ls.iter().max().unwrap() - ls.iter().min().unwrap()) as f64
            })
            .sum::<f64>()
            / b.len() as f64
    };
    let random = epoch_batches(&l, &bopts(false, false), 3);
    assert!(
        spread(&b) * 3.0 < spread(&random),
        "{} vs {}",
        spread(&b),
        spread(&random)
    );
}

#[test]
fn packing_fills_rows_without_overflow() {
    let l = lengths();
    let b = epoch_batches(&l, &bopts(false, true), 0);
    let rows: Vec<&Vec<usize>> = b.iter().flatten().collect();
    assert!(rows
        .iter()
        .all(|r| r.iter().map(|&i| l[i]).sum::<usize>() <= 100));
    assert!(
        rows.len() < l.len() * 2 / 3,
        "{} rows for {} examples",
        rows.len(),
        l.len()
    );
    let ids: BTreeSet<usize> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    assert_eq!(ids.len(), l.len());
}

#[test]
fn eval_split_is_deterministic_and_disjoint() {
    let ex: Vec<Example> = (0..20u32)
        .map(|i| Example {
            ids: vec![1, i + 3],
            labels: vec![1, i as i32 + 3],
        })
        .collect();
    let (tr, ev) = split_eval(ex.clone(), 0.1, 42).unwrap();
    assert_eq!((tr.len(), ev.len()), (18, 2));
    let (tr2, ev2) = split_eval(ex.clone(), 0.1, 42).unwrap();
    assert_eq!((&tr, &ev), (&tr2, &ev2));
    let a: BTreeSet<u32> = tr.iter().map(|e| e.ids[1]).collect();
    assert!(ev.iter().all(|e| !a.contains(&e.ids[1])));
    assert_ne!(split_eval(ex.clone(), 0.1, 1).unwrap().1, ev);
    assert!(split_eval(ex.clone(), 1.0, 0).is_err());
    assert!(split_eval(ex[..1].to_vec(), 0.5, 0).is_err());
}
