//! The SFT data pipeline: dataset rows → labelled token sequences → batches.
//!
//! Row formats (detected from the first row, every row must then follow it):
//! - **plain text** (`--text-field`, default `text`): `ids = encode(text)` (BOS once) with EOS
//!   appended when the text does not already end with it, as TRL's `SFTTrainer` does; the loss is
//!   taken on every token.
//! - **conversation** (`--messages-field`, default `messages`: a list of `{role, content}`):
//!   rendered with the model's chat template. With `--completion-only-loss` only the tokens of
//!   assistant turns carry labels. An assistant turn `i` spans the characters from the end of
//!   `render(messages[..i], add_generation_prompt = true)` to the end of
//!   `render(messages[..=i])`: its content plus whatever the template emits right after it
//!   (Llama-2: `" </s>"`, ChatML: `<|im_end|>\n`), so the model learns to stop, as TRL's
//!   assistant masks do. Tokens overlapping that span are labelled.
//! - **prompt / completion** (`prompt` and `completion` strings, TRL's format):
//!   `encode(prompt) ++ encode_raw(completion) ++ EOS`; completion-only loss masks the prompt.
//!
//! `labels` follow transformers: same length as `ids`, unshifted, `-100` where no loss is taken
//! (the trainer shifts: position `t` predicts `labels[t + 1]`). Examples longer than
//! `max_seq_len` are truncated (and counted); examples left with no target are skipped (and
//! counted).
//!
//! Batches ([`epoch_batches`]) are a pure function of the example lengths, the options and the
//! epoch number, so a resumed run finds its place from the step number alone.

use crate::backend::cpu::dropout::splitmix64;
use crate::data::{dataset_err, json_kind, Row};
use crate::error::{Error, Result};
use crate::tokenizer::{Message, Tokenizer};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;
use std::path::Path;

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Same length as `ids`, unshifted, `-100` = no loss.
    pub labels: Vec<i32>,
}

impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of positions that predict a labelled token (`labels[1..] != -100`).
    pub fn num_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != -100).count()
    }
}

/// How rows become examples.
#[derive(Debug, Clone, PartialEq)]
pub struct SftOptions {
    pub text_field: String,
    pub messages_field: String,
    pub completion_only_loss: bool,
    pub max_seq_len: usize,
}

/// Counts for the log and the summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    pub rows: usize,
    pub examples: usize,
    pub truncated: usize,
    pub skipped_no_assistant: usize,
    pub skipped_empty: usize,
    /// Tokens of the kept examples (after truncation).
    pub tokens: usize,
    /// Targets (positions with a loss) of the kept examples.
    pub target_tokens: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Text,
    Chat,
    PromptCompletion,
}

/// Where a row came from, for errors: `file: line N` (JSONL) or `file: row N`.
fn row_err(row: &Row, n: usize, msg: String) -> Error {
    let what = if row.line.is_some() {
        msg
    } else {
        format!("row {n}: {msg}")
    };
    dataset_err(&row.file, row.line, what)
}

fn detect(row: &Row, opts: &SftOptions) -> Option<Format> {
    let has = |f: &str| row.value.get(f).is_some();
    if has(&opts.messages_field) {
        Some(Format::Chat)
    } else if has(&opts.text_field) {
        Some(Format::Text)
    } else if has("prompt") && has("completion") {
        Some(Format::PromptCompletion)
    } else {
        None
    }
}

fn string_field<'a>(row: &'a Row, n: usize, field: &str) -> Result<&'a str> {
    match row.value.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(row_err(
            row,
            n,
            format!("field `{field}` is {}, expected a string", json_kind(other)),
        )),
        None => Err(row_err(row, n, format!("no field `{field}`"))),
    }
}

/// The most messages one conversation row may hold. Completion-only loss renders the template
/// once per assistant turn (on the conversation so far), so a row's cost grows with the square of
/// its length; real conversations have tens of turns.
pub const MAX_MESSAGES: usize = 1000;

fn messages(row: &Row, n: usize, field: &str) -> Result<Vec<Message>> {
    let v = row
        .value
        .get(field)
        .ok_or_else(|| row_err(row, n, format!("no field `{field}`")))?;
    if let Some(a) = v.as_array() {
        if a.len() > MAX_MESSAGES {
            return Err(row_err(
                row,
                n,
                format!(
                    "field `{field}` holds {} messages, more than the limit of {MAX_MESSAGES} for one conversation",
                    a.len()
                ),
            ));
        }
    }
    serde_json::from_value(v.clone()).map_err(|e| {
        row_err(
            row,
            n,
            format!("field `{field}` must be a list of {{\"role\", \"content\"}} strings: {e}"),
        )
    })
}

/// Labels of a token with byte span `(s, e)`: kept if it overlaps one of `spans`.
fn in_spans(tok: (usize, usize), spans: &[(usize, usize)]) -> bool {
    tok.1 > tok.0 && spans.iter().any(|&(s, e)| tok.0 < e && tok.1 > s)
}

/// A conversation: ids, and labels on everything or on the assistant spans only.
fn chat_example(tok: &Tokenizer, msgs: &[Message], only_assistant: bool) -> Result<Example> {
    let full = tok.apply_chat_template(msgs, false)?;
    let (ids, offsets) = tok.encode_with_offsets(&full)?;
    if !only_assistant {
        let labels = ids.iter().map(|&i| i as i32).collect();
        return Ok(Example { ids, labels });
    }
    let mut spans = Vec::new();
    let mut cursor = 0;
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = tok.apply_chat_template(&msgs[..i], true)?;
        let through = tok.apply_chat_template(&msgs[..=i], false)?;
        if through.starts_with(&before) && full.starts_with(&through) {
            spans.push((before.len(), through.len()));
            cursor = through.len();
        } else if let Some(p) = full[cursor..].find(m.content.as_str()) {
            // Templates whose prefixes do not render as prefixes: fall back to the content.
            let s = cursor + p;
            spans.push((s, s + m.content.len()));
            cursor = s + m.content.len();
        }
    }
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &o)| if in_spans(o, &spans) { id as i32 } else { -100 })
        .collect();
    Ok(Example { ids, labels })
}

/// Tokenizes `rows` (read from `source`) into examples; see the module docs.
pub fn build_examples(
    rows: &[Row],
    tok: &Tokenizer,
    opts: &SftOptions,
    source: &Path,
) -> Result<(Vec<Example>, DataStats)> {
    let format = rows_format(rows, opts, source)?;
    let mut stats = DataStats {
        rows: rows.len(),
        ..DataStats::default()
    };
    let mut out = Vec::with_capacity(rows.len());
    for (n, row) in rows.iter().enumerate().map(|(i, r)| (i + 1, r)) {
        let (mut ex, no_assistant) = row_example(row, n, format, tok, opts)?;
        if ex.ids.len() > opts.max_seq_len {
            ex.ids.truncate(opts.max_seq_len);
            ex.labels.truncate(opts.max_seq_len);
            stats.truncated += 1;
        }
        if ex.num_targets() == 0 {
            if opts.completion_only_loss && no_assistant {
                stats.skipped_no_assistant += 1;
            } else {
                stats.skipped_empty += 1;
            }
            continue;
        }
        stats.tokens += ex.len();
        stats.target_tokens += ex.num_targets();
        out.push(ex);
    }
    stats.examples = out.len();
    if out.is_empty() {
        return Err(dataset_err(
            source,
            None,
            format!(
                "no usable rows: {} rows, {} without an assistant turn, {} with nothing to learn (empty, or everything masked after truncation to {} tokens)",
                stats.rows, stats.skipped_no_assistant, stats.skipped_empty, opts.max_seq_len
            ),
        ));
    }
    Ok((out, stats))
}

/// The format of the dataset, detected on its first row and checked against the options.
fn rows_format(rows: &[Row], opts: &SftOptions, source: &Path) -> Result<Format> {
    let first = rows
        .first()
        .ok_or_else(|| dataset_err(source, None, "dataset is empty".into()))?;
    let format = detect(first, opts).ok_or_else(|| {
        let fields = match &first.value {
            Value::Object(o) => o.keys().cloned().collect::<Vec<_>>().join(", "),
            _ => String::new(),
        };
        row_err(
            first,
            1,
            format!(
                "no `{}` (text), `{}` (conversation) or `prompt` + `completion` field; fields: {fields}",
                opts.text_field, opts.messages_field
            ),
        )
    })?;
    if format == Format::Text && opts.completion_only_loss {
        return Err(dataset_err(
            source,
            None,
            format!(
                "--completion-only-loss needs conversations (`{}`) or prompt/completion rows, but the rows are plain text (`{}`)",
                opts.messages_field, opts.text_field
            ),
        ));
    }
    Ok(format)
}

/// The untruncated example of row `n`, and whether it is a conversation with no assistant turn.
fn row_example(
    row: &Row,
    n: usize,
    format: Format,
    tok: &Tokenizer,
    opts: &SftOptions,
) -> Result<(Example, bool)> {
    let mut no_assistant = false;
    let ex = match format {
        Format::Text => text_example(tok, string_field(row, n, &opts.text_field)?)?,
        Format::Chat => {
            let msgs = messages(row, n, &opts.messages_field)?;
            no_assistant = !msgs.iter().any(|m| m.role == "assistant");
            if msgs.is_empty() {
                Example {
                    ids: vec![],
                    labels: vec![],
                }
            } else {
                chat_example(tok, &msgs, opts.completion_only_loss)
                    .map_err(|e| row_err(row, n, e.to_string()))?
            }
        }
        Format::PromptCompletion => prompt_completion_example(row, n, tok, opts)?,
    };
    Ok((ex, no_assistant))
}

/// A plain-text example: the tokens plus eos (if not already last), every token a target.
fn text_example(tok: &Tokenizer, text: &str) -> Result<Example> {
    let mut ids = tok.encode(text)?;
    if let Some(e) = tok.eos_id {
        if ids.last() != Some(&e) && !ids.is_empty() {
            ids.push(e);
        }
    }
    let labels = ids.iter().map(|&i| i as i32).collect();
    Ok(Example { ids, labels })
}

/// A prompt + completion + eos example; the prompt is masked with `--completion-only-loss`.
fn prompt_completion_example(
    row: &Row,
    n: usize,
    tok: &Tokenizer,
    opts: &SftOptions,
) -> Result<Example> {
    let p = tok.encode(string_field(row, n, "prompt")?)?;
    let c = tok.encode_raw(string_field(row, n, "completion")?, false)?;
    let np = p.len();
    let mut ids = p;
    ids.extend(c);
    ids.extend(tok.eos_id);
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if opts.completion_only_loss && i < np {
                -100
            } else {
                id as i32
            }
        })
        .collect();
    Ok(Example { ids, labels })
}

/// Deterministic held-out split: `ceil(fraction · n)` examples (at least 1, at most `n − 1`),
/// chosen by a shuffle seeded with `seed`, go to eval; both parts keep the dataset order.
pub fn split_eval(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let n = examples.len();
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::InvalidArg(format!(
            "--eval-split must be in (0, 1), got {fraction}"
        )));
    }
    if n < 2 {
        return Err(Error::InvalidArg(format!(
            "--eval-split needs at least 2 examples, the dataset has {n}"
        )));
    }
    let k = ((fraction * n as f64).ceil() as usize).clamp(1, n - 1);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(splitmix64(
        seed ^ 0xE7A1,
    )));
    let mut is_eval = vec![false; n];
    for &i in &idx[..k] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (ex, e) in examples.into_iter().zip(is_eval) {
        if e {
            eval.push(ex)
        } else {
            train.push(ex)
        }
    }
    Ok((train, eval))
}

/// How examples are grouped into batches.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    pub batch_size: usize,
    pub group_by_length: bool,
    pub packing: bool,
    pub max_seq_len: usize,
    pub seed: u64,
    /// Drop the last short batch (transformers' default keeps it).
    pub drop_last: bool,
}

/// Up to `batch_size` rows; each row lists example indices (one, or several when packing).
pub type Batch = Vec<Vec<usize>>;

/// Best-fit-decreasing bins of capacity `cap` (examples longer than `cap` get a bin of their own).
fn pack_bins(lengths: &[usize], cap: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new(); // (free space, members)
    for i in order {
        let len = lengths[i].min(cap);
        let best = bins
            .iter()
            .enumerate()
            .filter(|(_, b)| b.0 >= len)
            .min_by_key(|(j, b)| (b.0, *j))
            .map(|(j, _)| j);
        match best {
            Some(j) => {
                bins[j].0 -= len;
                bins[j].1.push(i);
            }
            None => bins.push((cap - len, vec![i])),
        }
    }
    bins.into_iter().map(|b| b.1).collect()
}

/// The batches of epoch `epoch`; see the module docs. The number of batches is the same for
/// every epoch.
pub fn epoch_batches(lengths: &[usize], opts: &BatchOptions, epoch: usize) -> Vec<Batch> {
    let bs = opts.batch_size.max(1);
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(splitmix64(opts.seed ^ splitmix64(epoch as u64 + 1)));
    let rows: Vec<Vec<usize>> = if opts.packing {
        let mut bins = pack_bins(lengths, opts.max_seq_len.max(1));
        bins.shuffle(&mut rng);
        bins
    } else {
        let mut idx: Vec<usize> = (0..lengths.len()).collect();
        idx.shuffle(&mut rng);
        if opts.group_by_length {
            // transformers' get_length_grouped_indices: megabatches of 50 batches, each sorted
            // by length (descending), and the longest example moved to the very front.
            let mut megas: Vec<Vec<usize>> = idx
                .chunks(50 * bs)
                .map(|m| {
                    let mut m = m.to_vec();
                    m.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                    m
                })
                .collect();
            if let Some(k) =
                (0..megas.len()).max_by_key(|&k| (lengths[megas[k][0]], usize::MAX - k))
            {
                let (a, b) = (megas[0][0], megas[k][0]);
                megas[0][0] = b;
                megas[k][0] = a;
            }
            idx = megas.concat();
        }
        idx.into_iter().map(|i| vec![i]).collect()
    };
    let mut batches: Vec<Batch> = rows.chunks(bs).map(<[Vec<usize>]>::to_vec).collect();
    if opts.drop_last && batches.last().is_some_and(|b| b.len() < bs) {
        batches.pop();
    }
    batches
}
