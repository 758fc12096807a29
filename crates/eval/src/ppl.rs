//! Perplexity, GPTQ protocol: the text as one string, tokenized once, cut into
//! non-overlapping windows of `seqlen` tokens (the remainder dropped), every window evaluated
//! from position 0, `ppl = exp(mean NLL)` over all `seqlen - 1` predictions of all windows.
//! (llama.cpp's `llama-perplexity` scores only the second half of each window, so its numbers
//! are lower and not comparable one to one.)

use crate::error::{EvalError, Result};
use adadim_model::Model;
use serde::Serialize;
use std::time::Instant;
use tokenizers::Tokenizer;

#[derive(Debug, Clone, Serialize)]
pub struct PplReport {
    pub ppl: f64,
    pub mean_nll: f64,
    /// Tokens the whole text produced.
    pub tokens: usize,
    /// Windows evaluated (after `--limit`).
    pub windows: usize,
    pub seqlen: usize,
    /// Predictions scored: `windows * (seqlen - 1)`.
    pub scored: usize,
    pub seconds: f64,
    /// Tokens pushed through the model per second (`windows * seqlen / seconds`).
    pub tokens_per_s: f64,
    pub window_nll: Vec<f64>,
}

pub fn tokenize(tok: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| EvalError::Tokenize { what: what.into(), msg: e.to_string() })?;
    Ok(enc.get_ids().to_vec())
}

/// Cut `ids` into non-overlapping windows of `seqlen` (remainder dropped), at most `limit`.
pub fn windows(ids: &[u32], seqlen: usize, limit: Option<usize>) -> Vec<&[u32]> {
    let n = ids.len() / seqlen;
    ids.chunks_exact(seqlen).take(limit.unwrap_or(n).min(n)).collect()
}

/// Perplexity of `model` on token ids. `progress(done, total)` after each window.
pub fn perplexity(
    model: &Model,
    ids: &[u32],
    seqlen: usize,
    limit: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport> {
    if seqlen < 2 {
        return Err(EvalError::Invalid(format!("seqlen must be at least 2, got {seqlen}")));
    }
    if seqlen > model.rope.max_positions() {
        return Err(EvalError::Invalid(format!(
            "seqlen {seqlen} exceeds the model's prepared positions {}",
            model.rope.max_positions()
        )));
    }
    let ws = windows(ids, seqlen, limit);
    if ws.is_empty() {
        return Err(EvalError::Invalid(format!(
            "the text has {} tokens, fewer than one window of {seqlen}; use a smaller --seqlen",
            ids.len()
        )));
    }
    let start = Instant::now();
    let mut window_nll = Vec::with_capacity(ws.len());
    let mut total = 0.0f64;
    for (i, w) in ws.iter().enumerate() {
        let hidden = model.forward_hidden(&w[..seqlen - 1])?;
        let lp = model.target_logprobs(&hidden, &w[1..], 512)?;
        let nll: f64 = -lp.iter().sum::<f64>();
        total += nll;
        window_nll.push(nll / lp.len() as f64);
        progress(i + 1, ws.len());
    }
    let seconds = start.elapsed().as_secs_f64();
    let scored = ws.len() * (seqlen - 1);
    let mean_nll = total / scored as f64;
    Ok(PplReport {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens: ids.len(),
        windows: ws.len(),
        seqlen,
        scored,
        seconds,
        tokens_per_s: (ws.len() * seqlen) as f64 / seconds,
        window_nll,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_drop_the_remainder() {
        let ids: Vec<u32> = (0..10).collect();
        let w = windows(&ids, 3, None);
        assert_eq!(w, vec![&[0, 1, 2][..], &[3, 4, 5], &[6, 7, 8]]);
        assert_eq!(windows(&ids, 3, Some(2)).len(), 2);
        assert_eq!(windows(&ids, 11, None).len(), 0);
    }
}
