//! `qlora eval`: mean token cross-entropy and perplexity of a model over a text dataset.
//!
//! Each row is tokenized with the tokenizer's own special-token rules (no double BOS), truncated
//! to `max_seq_len`, and run as one sequence. A row of `n` tokens contributes `n − 1` predictions:
//! token `t` predicts token `t + 1` (transformers' label shift). The reported loss is the total
//! negative log-likelihood of all predictions of all rows divided by their count, so long rows
//! weigh in proportion to their tokens; perplexity is `exp(loss)`.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::model::{Llama, Logits};
use crate::tokenizer::Tokenizer;
use serde::Serialize;

/// Result of an evaluation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalReport {
    pub loss: f64,
    pub perplexity: f64,
    /// Number of predicted tokens the loss averages over.
    pub tokens: usize,
    pub rows: usize,
    /// Rows cut to `max_seq_len`.
    pub truncated_rows: usize,
    /// Rows with fewer than two tokens (nothing to predict).
    pub skipped_rows: usize,
    pub seconds: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Peak device memory of the backend's buffers, MiB (GPU backends; absent on the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_device_mib: Option<f64>,
}

/// Tokenizes one row for evaluation: encode, then cut to `max_seq_len`. Returns (ids, was_truncated).
pub fn eval_ids(tok: &Tokenizer, text: &str, max_seq_len: usize) -> Result<(Vec<u32>, bool)> {
    let mut ids = tok.encode(text)?;
    let truncated = ids.len() > max_seq_len;
    ids.truncate(max_seq_len);
    Ok((ids, truncated))
}

/// Sum of next-token NLL over one sequence and the number of predictions.
pub fn sequence_nll<B: Backend>(model: &Llama<B>, ids: &[u32]) -> Result<(f64, usize)> {
    if ids.len() < 2 {
        return Ok((0.0, 0));
    }
    let b = &model.backend;
    let mut cache = model.new_cache(ids.len())?;
    let logits = model.forward(ids, &mut cache, Logits::All)?;
    let mut targets: Vec<i32> = ids[1..].iter().map(|&i| i as i32).collect();
    targets.push(-100);
    let mut losses = b.zeros(ids.len())?;
    b.cross_entropy(&mut losses, &logits, &targets, model.cfg.vocab_size)?;
    let losses = b.download(&losses)?;
    Ok((losses.iter().map(|&l| l as f64).sum(), ids.len() - 1))
}

/// Evaluates `texts`; `on_row(done, tokens_so_far)` reports progress.
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    tok: &Tokenizer,
    texts: &[String],
    max_seq_len: usize,
    mut on_row: impl FnMut(usize, usize),
) -> Result<EvalReport> {
    if max_seq_len < 2 {
        return Err(Error::InvalidArg(format!(
            "--max-seq-len must be at least 2, got {max_seq_len}"
        )));
    }
    let max_seq_len = max_seq_len.min(model.cfg.max_position_embeddings);
    let t0 = std::time::Instant::now();
    let (mut nll, mut tokens, mut truncated_rows, mut skipped_rows) =
        (0.0f64, 0usize, 0usize, 0usize);
    for (i, text) in texts.iter().enumerate() {
        let (ids, cut) = eval_ids(tok, text, max_seq_len)?;
        truncated_rows += cut as usize;
        if ids.len() < 2 {
            skipped_rows += 1;
        }
        let (s, n) = sequence_nll(model, &ids)?;
        nll += s;
        tokens += n;
        on_row(i + 1, tokens);
    }
    if tokens == 0 {
        return Err(Error::InvalidArg(
            "no row has two or more tokens: nothing to evaluate".into(),
        ));
    }
    if truncated_rows > 0 {
        tracing::info!(
            truncated_rows,
            max_seq_len,
            "rows longer than max_seq_len were truncated"
        );
    }
    let loss = nll / tokens as f64;
    Ok(EvalReport {
        loss,
        perplexity: loss.exp(),
        tokens,
        rows: texts.len(),
        truncated_rows,
        skipped_rows,
        seconds: t0.elapsed().as_secs_f64(),
        peak_rss_mib: crate::sys::peak_rss_mib(),
        peak_device_mib: model.backend.device_memory_peak().map(crate::sys::mib),
    })
}
