//! Greedy completion cut at text stop sequences: what HumanEval and GSM8K both generate with.

use crate::error::{EvalError, Result};
use adadim_model::{KvCache, Model};
use tokenizers::Tokenizer;

/// Greedy tokens after `rest` (the prompt past the positions `cache` holds), until an `eos`
/// token, `max_tokens`, or `cut(text)` shortens the decoded text (a stop sequence appeared).
/// Returns the text cut by `cut` and the tokens generated; `what` names the item in errors.
#[allow(clippy::too_many_arguments)]
pub fn greedy(
    model: &Model,
    tok: &Tokenizer,
    cache: KvCache,
    rest: &[u32],
    eos: &[u32],
    max_tokens: usize,
    cut: &dyn Fn(&str) -> &str,
    what: &str,
) -> Result<(String, usize)> {
    let settings = adadim_run::Settings { max_tokens, temperature: 0.0, seed: 0 };
    let mut ids = Vec::new();
    let mut decode_err = None;
    adadim_run::generate_after(model, cache, rest, eos, &settings, &mut |t| {
        ids.push(t);
        match tok.decode(&ids, true) {
            Ok(text) => cut(&text).len() == text.len(),
            Err(e) => {
                decode_err = Some(e.to_string());
                false
            }
        }
    })?;
    let err = |msg: String| EvalError::Tokenize { what: format!("decoding {what}"), msg };
    if let Some(msg) = decode_err {
        return Err(err(msg));
    }
    let text = tok.decode(&ids, true).map_err(|e| err(e.to_string()))?;
    Ok((cut(&text).to_string(), ids.len()))
}
