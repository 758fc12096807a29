//! `adadim embed`: sentences in (one per line), their embeddings out as JSON
//! (`{"model", "dim", "embeddings": [[...], ...]}`), batched.

use std::io::Write;

use crate::args::EmbedArgs;
use crate::resolve::model_dir;
use anyhow::{bail, Context, Result};

pub fn embed(a: EmbedArgs) -> Result<()> {
    if a.batch == 0 {
        bail!("--batch 0: at least one sentence per forward pass");
    }
    let text = std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let text = String::from_utf8(text)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 (byte {})", a.input.display(), e.utf8_error().valid_up_to()))?;
    let sentences: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    if sentences.is_empty() {
        bail!("{}: no sentences (one per line)", a.input.display());
    }
    if let Some(i) = sentences.iter().position(|s| s.trim().is_empty()) {
        bail!("{}: line {} is empty (one sentence per line)", a.input.display(), i + 1);
    }
    let dir = model_dir(&a.model)?;
    let bert = adadim_model::Bert::load(&dir)?;
    let tok = adadim_load::tokenizer::sentence_tokenizer(&dir, bert.max_seq_length)?;
    let mut embeddings = Vec::with_capacity(sentences.len());
    for (n, chunk) in sentences.chunks(a.batch).enumerate() {
        let ids = chunk
            .iter()
            .enumerate()
            .map(|(i, s)| {
                tok.encode(*s, true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| anyhow::anyhow!("line {}: tokenizing: {e}", n * a.batch + i + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        embeddings.extend(bert.embed(&ids).with_context(|| format!("lines {}..", n * a.batch + 1))?);
    }
    let out = serde_json::json!({"model": a.model, "dim": bert.config.hidden_size, "embeddings": embeddings});
    match &a.out {
        None => {
            let mut so = std::io::stdout().lock();
            serde_json::to_writer(&mut so, &out)?;
            writeln!(so)?;
        }
        Some(path) => {
            // Written beside the target and renamed: no half-written file at the path.
            let tmp = path.with_file_name(format!(
                ".{}.partial-{}",
                path.file_name().map_or("embed".into(), |n| n.to_string_lossy().into_owned()),
                std::process::id()
            ));
            let written = std::fs::write(&tmp, serde_json::to_vec(&out)?).and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(e).with_context(|| format!("writing {}", path.display()));
            }
        }
    }
    eprintln!("{} sentences, {} dimensions", sentences.len(), bert.config.hidden_size);
    Ok(())
}
