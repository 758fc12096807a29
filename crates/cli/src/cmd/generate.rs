//! `adadim generate`: a prompt (in the chat template unless `--raw`), decoded with the KV
//! cache, printed as it comes.

use crate::args::GenerateArgs;
use crate::resolve::{decoding_model, eos_ids, model_dir};
use anyhow::Result;

/// Tokenize the prompt (chat template unless `--raw`), decode, print the text as it comes
/// and the speed at the end.
pub fn generate(a: GenerateArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        anyhow::bail!("--temperature {}: must be a finite number >= 0", a.temperature);
    }
    let dir = model_dir(&a.model.model)?;
    let src = adadim_model::open(&dir)?;
    let tok = adadim_load::tokenizer::load(&dir)?;
    let tok_config = adadim_load::tokenizer::config(&dir)?.unwrap_or_default();
    let template = tok_config["chat_template"].as_str().and_then(adadim_run::ChatTemplate::from_jinja);
    let text = match (&template, a.raw) {
        (Some(t), false) => t.render(&a.prompt),
        (None, false) if tok_config["chat_template"].is_string() => {
            eprintln!("note: this model's chat template is not ChatML; the prompt goes in raw (--raw to silence)");
            a.prompt.clone()
        }
        _ => a.prompt.clone(),
    };
    let prompt =
        tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?.get_ids().to_vec();
    if prompt.is_empty() {
        anyhow::bail!("--prompt: empty after tokenization");
    }
    let stop = eos_ids(&dir, &tok, &tok_config)?;
    crate::limits::check_positions(
        src.config(),
        &dir.join("config.json"),
        prompt.len() + a.max_tokens,
        &format!("--max-tokens {} (after a prompt of {} tokens)", a.max_tokens, prompt.len()),
    )?;
    let model = decoding_model(src.as_ref(), &dir, prompt.len() + a.max_tokens, &a.decode)?;
    let (mut ids, mut shown) = (Vec::new(), 0usize);
    use std::io::Write;
    let settings = adadim_run::Settings { max_tokens: a.max_tokens, temperature: a.temperature, seed: a.seed };
    let stats = adadim_run::generate(&model, &prompt, &stop, &settings, &mut |t| {
        // Decode everything so far and print what is new: multi-token characters come out whole.
        ids.push(t);
        if let Ok(s) = tok.decode(&ids, true) {
            if s.len() > shown && s.is_char_boundary(shown) {
                print!("{}", &s[shown..]);
                let _ = std::io::stdout().flush();
                shown = s.len();
            }
        }
    })?;
    println!();
    eprintln!(
        "{} prompt tokens ({:.1} tokens/s prefill), {} generated at {:.1} tokens/s, KV cache {:.1} MB {}{}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_s(),
        stats.generated,
        stats.decode_tokens_per_s(),
        stats.kv_cache_bytes as f64 / 1e6,
        a.decode.kv_cache,
        if stats.stopped_by_token { "" } else { " (token limit)" }
    );
    Ok(())
}
