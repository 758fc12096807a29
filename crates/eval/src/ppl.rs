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

/// Token ids of `text`, encoded in pieces of about [`PIECE`] bytes cut just after a newline
/// that a non-space character follows: there the byte-level pre-tokenizers split anyway, so the
/// ids are those of encoding the text whole (the WikiText-2 golden tests check it, all 303,415
/// tokens against llama.cpp's), while the tokenizer's working memory stays at one piece (the
/// whole 5 MB Shakespeare corpus at once took ~0.8 GB). Special tokens are added on the first
/// piece only.
pub fn tokenize(tok: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for (i, piece) in pieces(text, PIECE).enumerate() {
        let enc = tok.encode(piece, i == 0).map_err(|e| EvalError::Tokenize { what: what.into(), msg: e.to_string() })?;
        ids.extend_from_slice(enc.get_ids());
    }
    Ok(ids)
}

/// Target size of the pieces [`tokenize`] encodes one at a time.
const PIECE: usize = 1 << 18;

/// `text` cut into pieces of at least `target` bytes (the last may be shorter), each cut right
/// after a `\n` that a non-whitespace character follows.
fn pieces(text: &str, target: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let b = rest.as_bytes();
        let mut cut = rest.len();
        let mut i = target.min(rest.len());
        while i < b.len() {
            if b[i - 1] == b'\n' && !b[i].is_ascii_whitespace() && rest.is_char_boundary(i) {
                cut = i;
                break;
            }
            i += 1;
        }
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
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
    fn pieces_cover_the_text_and_cut_after_a_newline_before_text() {
        let text = "ab\n\n cd\nef\n\ngh é\nij";
        for target in 1..text.len() + 2 {
            let p: Vec<&str> = pieces(text, target).collect();
            assert_eq!(p.concat(), text, "target {target}");
            for w in p.windows(2) {
                assert!(w[0].ends_with('\n') && !w[1].starts_with(char::is_whitespace), "target {target}: {p:?}");
            }
        }
        assert_eq!(pieces("", 4).count(), 0);
    }

    #[test]
    fn windows_drop_the_remainder() {
        let ids: Vec<u32> = (0..10).collect();
        let w = windows(&ids, 3, None);
        assert_eq!(w, vec![&[0, 1, 2][..], &[3, 4, 5], &[6, 7, 8]]);
        assert_eq!(windows(&ids, 3, Some(2)).len(), 2);
        assert_eq!(windows(&ids, 11, None).len(), 0);
    }
}
