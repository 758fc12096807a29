//! Perplexity, GPTQ protocol: the text as one string, tokenized once, cut into
//! non-overlapping windows of `seqlen` tokens (the remainder dropped), every window evaluated
//! from position 0, `ppl = exp(mean NLL)` over all `seqlen - 1` predictions of all windows.
//! (llama.cpp's `llama-perplexity` scores only the second half of each window, so its numbers
//! are lower and not comparable one to one.)

use crate::error::{EvalError, Result};
use adadim_model::{Block, Model, WeightSource};
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

/// Token ids of `text`, encoded in pieces of about [`PIECE`] bytes, each cut just after a lone
/// `\n` that has a non-whitespace character on both sides: there the byte-level pre-tokenizers
/// split anyway, and the `\n` is a pre-token of its own whether it ends a piece or not, so the
/// ids are those of encoding the text whole (tested on the real tokenizer with cuts every few
/// bytes, and by the WikiText-2 golden ids against llama.cpp's), while the tokenizer's working
/// memory stays at one piece (the whole 5 MB Shakespeare corpus at once took ~0.8 GB). A cut
/// after a run of whitespace would not be: "\n\nIRAS" encodes as "\n", "\n", "IRAS" whole but
/// as "\n\n", "IRAS" when the run ends a piece. Special tokens are added on the first piece
/// only.
pub fn tokenize(tok: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>> {
    tokenize_in_pieces(tok, text, what, PIECE)
}

/// As [`tokenize`], with no special tokens at all (an encoder's text, cut into samples that
/// get their own [CLS] / [SEP]).
pub fn tokenize_plain(tok: &Tokenizer, text: &str, what: &str) -> Result<Vec<u32>> {
    encode_pieces(tok, text, what, PIECE, false)
}

/// [`tokenize`] with pieces of at least `target` bytes (tests use small ones to cut often).
pub fn tokenize_in_pieces(tok: &Tokenizer, text: &str, what: &str, target: usize) -> Result<Vec<u32>> {
    encode_pieces(tok, text, what, target, true)
}

/// The pieces of `text` encoded one after another; `first_special`: the first with the
/// tokenizer's special tokens (a BOS), the others without.
fn encode_pieces(tok: &Tokenizer, text: &str, what: &str, target: usize, first_special: bool) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for (i, piece) in pieces(text, target).enumerate() {
        let enc = tok
            .encode(piece, first_special && i == 0)
            .map_err(|e| EvalError::Tokenize { what: what.into(), msg: e.to_string() })?;
        ids.extend_from_slice(enc.get_ids());
    }
    Ok(ids)
}

/// Target size of the pieces [`tokenize`] encodes one at a time.
const PIECE: usize = 1 << 18;

/// `text` cut into pieces of at least `target` bytes (the last may be shorter), each cut right
/// after a `\n` whose neighbours on both sides are not whitespace (Unicode's definition, as the
/// pre-tokenizers' `\s`).
fn pieces(text: &str, target: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let b = rest.as_bytes();
        let mut cut = rest.len();
        let mut i = target.max(2).min(rest.len());
        while i < b.len() {
            if b[i - 1] == b'\n' && rest.is_char_boundary(i) && lone_newline_before(rest, i) {
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

/// Whether `s[..i]` ends in a `\n` preceded by a non-whitespace character and `s[i..]` starts
/// with one.
fn lone_newline_before(s: &str, i: usize) -> bool {
    let before = s[..i - 1].chars().next_back();
    let after = s[i..].chars().next();
    matches!((before, after), (Some(a), Some(c)) if !a.is_whitespace() && !c.is_whitespace())
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
    let ws = checked_windows(ids, seqlen, limit, model.rope.max_positions())?;
    let start = Instant::now();
    let mut window_nll = Vec::with_capacity(ws.len());
    for (i, w) in ws.iter().enumerate() {
        let hidden = model.forward_hidden(&w[..seqlen - 1])?;
        window_nll.push(window_nll_of(model, &hidden, w)?);
        progress(i + 1, ws.len());
    }
    Ok(report(ids.len(), seqlen, window_nll, start))
}

/// As [`perplexity`], for models larger than memory: `model` holds the embedding, final norm
/// and head only ([`Model::load_shell`]); the windows go through the decoder in batches whose
/// hidden states fit in `batch_bytes`, each batch reading the blocks from `src` one at a time
/// (dropped after use), so the peak is one block plus a batch of hidden states. The same
/// operations in the same order per window as [`perplexity`]: the same bits.
/// `progress(blocks done, blocks to do)` over all batches.
pub fn perplexity_streaming(
    model: &Model,
    src: &dyn WeightSource,
    ids: &[u32],
    seqlen: usize,
    limit: Option<usize>,
    batch_bytes: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PplReport> {
    let ws = checked_windows(ids, seqlen, limit, model.rope.max_positions())?;
    let start = Instant::now();
    let layers = model.config.num_hidden_layers;
    let per_window = (seqlen - 1) * model.config.hidden_size * 4;
    let batch = (batch_bytes / per_window).clamp(1, ws.len());
    let batches = ws.len().div_ceil(batch);
    let mut window_nll = Vec::with_capacity(ws.len());
    for (k, group) in ws.chunks(batch).enumerate() {
        let mut xs = group.iter().map(|w| model.embed(&w[..seqlen - 1])).collect::<adadim_model::Result<Vec<_>>>()?;
        for layer in 0..layers {
            let block = Block::load(src, layer)?;
            for x in xs.iter_mut() {
                *x = block.forward(x, &model.rope, &model.settings())?;
            }
            progress(k * layers + layer + 1, batches * layers);
        }
        for (x, w) in xs.iter().zip(group) {
            window_nll.push(window_nll_of(model, x, w)?);
        }
    }
    Ok(report(ids.len(), seqlen, window_nll, start))
}

/// The windows to score, after checking `seqlen` against the model and the text.
fn checked_windows(ids: &[u32], seqlen: usize, limit: Option<usize>, positions: usize) -> Result<Vec<&[u32]>> {
    if seqlen < 2 {
        return Err(EvalError::Invalid(format!("seqlen must be at least 2, got {seqlen}")));
    }
    if seqlen > positions {
        return Err(EvalError::Invalid(format!("seqlen {seqlen} exceeds the model's prepared positions {positions}")));
    }
    if limit == Some(0) {
        return Err(EvalError::Invalid("a limit of 0 windows leaves nothing to evaluate (give at least 1)".into()));
    }
    let ws = windows(ids, seqlen, limit);
    if ws.is_empty() {
        return Err(EvalError::Invalid(format!(
            "the text has {} tokens, fewer than one window of {seqlen}; use a smaller --seqlen",
            ids.len()
        )));
    }
    Ok(ws)
}

/// Total NLL of window `w`'s last `seqlen - 1` tokens from its hidden states.
fn window_nll_of(model: &Model, hidden: &candle_core::Tensor, w: &[u32]) -> Result<f64> {
    let lp = model.target_logprobs(hidden, &w[1..], 512)?;
    Ok(-lp.iter().sum::<f64>())
}

/// The report from each window's total NLL.
fn report(tokens: usize, seqlen: usize, window_totals: Vec<f64>, start: Instant) -> PplReport {
    let seconds = start.elapsed().as_secs_f64();
    let windows = window_totals.len();
    let scored = windows * (seqlen - 1);
    let mean_nll = window_totals.iter().sum::<f64>() / scored as f64;
    let window_nll = window_totals.iter().map(|t| t / (seqlen - 1) as f64).collect();
    PplReport {
        ppl: mean_nll.exp(),
        mean_nll,
        tokens,
        windows,
        seqlen,
        scored,
        seconds,
        tokens_per_s: (windows * seqlen) as f64 / seconds,
        window_nll,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_text_and_cut_only_after_a_lone_newline_between_text() {
        let text = "ab\n\n cd\nef\n\ngh é\nij \nk\u{a0}\nl\nm";
        for target in 1..text.len() + 2 {
            let p: Vec<&str> = pieces(text, target).collect();
            assert_eq!(p.concat(), text, "target {target}");
            for w in p.windows(2) {
                let before = w[0].strip_suffix('\n').and_then(|s| s.chars().next_back());
                assert!(before.is_some_and(|c| !c.is_whitespace()), "target {target}: {p:?}");
                assert!(!w[1].starts_with(char::is_whitespace), "target {target}: {p:?}");
            }
        }
        // Only "ef\ngh", "é\nij", "\nl\nm" qualify; never after "\n\n", " \n" or NBSP "\n".
        let cuts: Vec<&str> = pieces(text, 1).collect();
        assert_eq!(cuts, ["ab\n\n cd\n", "ef\n\ngh é\n", "ij \nk\u{a0}\nl\n", "m"]);
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
