// TEMPORARY STUB (replaced by the data branch)
use crate::error::Result;
use crate::tokenizer::Tokenizer;
use std::path::Path;
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub labels: Vec<i32>,
}
impl Example {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn num_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != -100).count()
    }
}
#[derive(Debug, Clone, PartialEq)]
pub struct SftOptions {
    pub text_field: String,
    pub messages_field: String,
    pub completion_only_loss: bool,
    pub max_seq_len: usize,
}
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataStats {
    pub rows: usize,
    pub examples: usize,
    pub truncated: usize,
    pub skipped_no_assistant: usize,
    pub skipped_empty: usize,
    pub tokens: usize,
    pub target_tokens: usize,
}
pub fn build_examples(
    rows: &[crate::data::Row],
    tok: &Tokenizer,
    opts: &SftOptions,
    _source: &Path,
) -> Result<(Vec<Example>, DataStats)> {
    let texts = crate::data::texts(rows, &opts.text_field)?;
    let mut out = vec![];
    let mut st = DataStats {
        rows: rows.len(),
        ..Default::default()
    };
    for t in texts {
        let mut ids = tok.encode(&t)?;
        if ids.len() > opts.max_seq_len {
            ids.truncate(opts.max_seq_len);
            st.truncated += 1;
        }
        let labels = ids.iter().map(|&i| i as i32).collect();
        out.push(Example { ids, labels });
    }
    st.examples = out.len();
    Ok((out, st))
}
pub fn split_eval(
    mut examples: Vec<Example>,
    fraction: f64,
    _seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    let n = ((examples.len() as f64 * fraction).ceil() as usize).max(1);
    let e = examples.split_off(examples.len() - n);
    Ok((examples, e))
}
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    pub batch_size: usize,
    pub group_by_length: bool,
    pub packing: bool,
    pub max_seq_len: usize,
    pub seed: u64,
    pub drop_last: bool,
}
pub type Batch = Vec<Vec<usize>>;
pub fn epoch_batches(lengths: &[usize], opts: &BatchOptions, _epoch: usize) -> Vec<Batch> {
    (0..lengths.len())
        .collect::<Vec<_>>()
        .chunks(opts.batch_size)
        .map(|c| c.iter().map(|&i| vec![i]).collect())
        .collect()
}
