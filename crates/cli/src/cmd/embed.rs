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
    let ids = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            tok.encode(*s, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| anyhow::anyhow!("line {}: tokenizing: {e}", i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let t = std::time::Instant::now();
    let embeddings = embed_sorted(&bert, &ids, a.batch, &|_| format!("embedding {}", a.input.display()))?;
    let seconds = t.elapsed().as_secs_f64();
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
    eprintln!(
        "{} sentences, {} dimensions, embedded in {seconds:.3} s ({:.1} sentences/s, batches of {})",
        sentences.len(),
        bert.config.hidden_size,
        sentences.len() as f64 / seconds.max(1e-9),
        a.batch
    );
    Ok(())
}

/// Embeds `sentences` (token ids) in batches; returns them and sentences per second.
fn embed_all(bert: &adadim_model::Bert, ids: &[Vec<u32>], batch: usize) -> Result<(Vec<Vec<f32>>, f64)> {
    let t = std::time::Instant::now();
    let out = embed_sorted(bert, ids, batch, &|_| String::new())?;
    Ok((out, ids.len() as f64 / t.elapsed().as_secs_f64().max(1e-9)))
}

fn embed_sorted(
    bert: &adadim_model::Bert,
    ids: &[Vec<u32>],
    batch: usize,
    what: &dyn Fn(usize) -> String,
) -> Result<Vec<Vec<f32>>> {
    adadim_eval::embed::embed_sorted(bert, ids, batch).map_err(|b| {
        let (first, e) = *b;
        anyhow::Error::new(e).context(what(first))
    })
}

/// The reference's embeddings of `ids`, from `$ADADIM_HOME/embed-cache` when this model file
/// embedded these sentences before (the speed is then not measured: `None`).
fn reference_embeddings(
    dir: &std::path::Path,
    bert: &adadim_model::Bert,
    ids: &[Vec<u32>],
    batch: usize,
) -> Result<(Vec<Vec<f32>>, Option<f64>)> {
    use adadim_eval::embed::{cache_path, read_cache, write_cache};
    let sha = adadim_load::fetch::sha256_file(&dir.join("model.safetensors"))?;
    let path = cache_path(&adadim_load::fetch::adadim_home().join("embed-cache"), &sha, ids);
    if let Some(e) = read_cache(&path, ids.len(), bert.config.hidden_size) {
        return Ok((e, None));
    }
    let (e, rate) = embed_all(bert, ids, batch)?;
    if let Err(err) = write_cache(&path, &e) {
        eprintln!("warning: {}: reference embeddings not cached: {err}", path.display());
    }
    Ok((e, Some(rate)))
}

pub fn eval_embed(a: crate::cmd::eval_tasks::EmbedEvalArgs) -> Result<()> {
    use adadim_eval::embed;
    if a.queries == 0 || a.corpus == 0 || a.batch == 0 || a.max_tokens < 3 {
        bail!("--queries, --corpus and --batch must be at least 1, --max-tokens at least 3");
    }
    let data = crate::resolve::resolve_dataset(&a.dataset)?;
    let text = data.read_text()?;
    let (model_dir, ref_dir) = (model_dir(&a.model)?, model_dir(&a.reference)?);
    let (model, reference) = (adadim_model::Bert::load(&model_dir)?, adadim_model::Bert::load(&ref_dir)?);
    if model.config.hidden_size != reference.config.hidden_size {
        bail!(
            "--model embeds in {} dimensions, --reference in {}",
            model.config.hidden_size,
            reference.config.hidden_size
        );
    }
    let tok = adadim_load::tokenizer::sentence_tokenizer(&ref_dir, reference.max_seq_length.max(a.max_tokens + 1))?;
    let need = a.queries + a.corpus;
    let mut ids = Vec::with_capacity(need);
    for s in embed::sentences(&text) {
        let e = tok.encode(s.as_str(), true).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", data.label))?;
        if e.get_ids().len() <= a.max_tokens {
            ids.push(e.get_ids().to_vec());
            if ids.len() == need {
                break;
            }
        }
    }
    if ids.len() < need {
        bail!(
            "{}: {} sentences of at most {} tokens, {need} needed (--queries + --corpus)",
            data.label,
            ids.len(),
            a.max_tokens
        );
    }
    let (want, ref_rate) = reference_embeddings(&ref_dir, &reference, &ids, a.batch)?;
    let (got, rate) = embed_all(&model, &ids, a.batch)?;
    let cos = embed::cosines(&got, &want);
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    let p5 = embed::percentile(&cos, 5.0);
    let (q, c) = (a.queries, a.corpus);
    let nn_ref = embed::neighbours(&want[..q], &want[q..q + c], 10);
    let nn = embed::neighbours(&got[..q], &got[q..q + c], 10);
    let (r1, r10) = embed::agreement(&nn_ref, &nn);
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": a.model, "reference": a.reference, "dataset": data.label, "sentences": ids.len(),
                "queries": q, "corpus": c, "mean_cosine": mean, "p5_cosine": p5, "recall_at_1": r1, "recall_at_10": r10,
                "sentences_per_s": rate, "reference_sentences_per_s": ref_rate})
        );
    } else {
        println!("{} against {} on {} sentences of {}:", a.model, a.reference, ids.len(), data.label);
        println!("  cosine to the reference: mean {mean:.6}, 5th percentile {p5:.6}");
        println!("  retrieval ({q} queries, {c} corpus): recall@1 {r1:.4}, recall@10 {r10:.4}");
        match ref_rate {
            Some(r) => println!("  {rate:.1} sentences/s (reference {r:.1})"),
            None => println!("  {rate:.1} sentences/s (reference embeddings from the cache)"),
        }
    }
    Ok(())
}
