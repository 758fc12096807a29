//! A float checkpoint with its residual stream rotated ([`adadim_quantize::rotate`]): the same
//! function, weights that quantize with fewer outliers. Each RMSNorm's weight moves into the
//! linears that read it (the norms become ones, which commute with any rotation), the
//! embedding becomes `E Q`, o_proj and down_proj `Q^T W`, and the head `W diag(g) Q`: untied
//! from the embedding even where the source ties them, since the final norm's weight now lives
//! in it. With `heads`, each key/value head's values are rotated too (`Q_h^T` on v_proj's rows
//! of that head, `Q_h` on o_proj's columns of every query head that reads it): attention mixes
//! values linearly, so the model is unchanged and o_proj's input channels lose their outliers.

use crate::error::{CalibError, Result};
use adadim_load::safetensors_out::{DenseDtype, DenseWriter};
use adadim_load::Checkpoint;
use adadim_quantize::rotate;
use std::path::{Path, PathBuf};

/// What [`rotate_checkpoint`] wrote.
#[derive(Debug, serde::Serialize)]
pub struct Rotated {
    pub out_dir: PathBuf,
    pub seed: u64,
    pub width: usize,
    /// Whether the values were rotated per head too.
    pub heads: bool,
    pub tensors: usize,
}

/// Which rule one tensor of a LLaMA checkpoint follows.
enum Rule {
    /// Read the stream after the norm named: `W diag(g) Q`.
    Reads(Option<String>),
    /// Write into the stream: `Q^T W` (a bias is a one-column matrix).
    Writes,
    /// An RMSNorm weight: ones.
    Norm,
    Keep,
}

fn rule(name: &str) -> Rule {
    let layer = |n: &str| n.rsplit_once(".self_attn.").or_else(|| n.rsplit_once(".mlp.")).map(|(p, _)| p.to_string());
    match name {
        "model.embed_tokens.weight" => Rule::Reads(None),
        "lm_head.weight" => Rule::Reads(Some("model.norm.weight".into())),
        "model.norm.weight" => Rule::Norm,
        n if n.ends_with("layernorm.weight") => Rule::Norm,
        n if n.ends_with("o_proj.weight") || n.ends_with("down_proj.weight") => Rule::Writes,
        n if n.ends_with("o_proj.bias") || n.ends_with("down_proj.bias") => Rule::Writes,
        n if n.ends_with("_proj.weight") && (n.contains(".self_attn.") || n.contains(".mlp.")) => {
            let norm = if n.contains(".self_attn.") { "input_layernorm" } else { "post_attention_layernorm" };
            Rule::Reads(layer(n).map(|p| format!("{p}.{norm}.weight")))
        }
        _ => Rule::Keep,
    }
}

/// Where the per-head value rotation goes.
enum HeadRule {
    /// v_proj's weight or bias: each key/value head's rows.
    ValueRows,
    /// o_proj's weight: each query head's columns.
    OutputCols,
}

fn head_rule(name: &str) -> Option<HeadRule> {
    if name.ends_with("self_attn.v_proj.weight") || name.ends_with("self_attn.v_proj.bias") {
        Some(HeadRule::ValueRows)
    } else if name.ends_with("self_attn.o_proj.weight") {
        Some(HeadRule::OutputCols)
    } else {
        None
    }
}

/// Drawn with the residual rotation's seed, a different stream.
const HEAD_SEED: u64 = 0x4ead_5eed;

/// Write `src` rotated by the seeded `Q` of its width into `out_dir` (which must not exist;
/// written beside it and renamed into place, so an interrupted run leaves nothing there).
/// `progress(done, total)` after each tensor.
pub fn rotate_checkpoint(
    src: &Path,
    out_dir: &Path,
    seed: u64,
    heads: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Rotated> {
    if out_dir.exists() {
        return Err(CalibError::Invalid(format!(
            "{}: already exists; remove it or choose another output directory",
            out_dir.display()
        )));
    }
    if adadim_model::is_packed(src) {
        return Err(CalibError::Invalid(format!(
            "{}: this model is already quantized (an adadim packed checkpoint); rotate the float model",
            src.display()
        )));
    }
    if adadim_model::is_bert(src) {
        return Err(CalibError::Invalid(format!(
            "{}: a BERT encoder; rotation is for LLaMA-family decoders (RMSNorm, which commutes with it)",
            src.display()
        )));
    }
    let ckpt = Checkpoint::open(src)?;
    let mut config = ckpt.config.clone();
    let d = config.hidden_size;
    let q = rotate::rotation(d, seed).map_err(|e| CalibError::Invalid(format!("rotation of width {d}: {e}")))?;
    let hd = config.head_dim();
    let qh = rotate::rotation(hd, seed ^ HEAD_SEED)
        .map_err(|e| CalibError::Invalid(format!("rotation of width {hd}: {e}")))?;
    config.tie_word_embeddings = false;
    let plan = config.expected_tensors();
    let tensors = adadim_load::gguf::write_dir(out_dir, |tmp| -> Result<usize> {
        let meta = [
            ("format".to_string(), "pt".to_string()),
            ("source".to_string(), format!("{} rotated (seed {seed})", src.display())),
        ];
        let path = tmp.join("model.safetensors");
        let mut writer = DenseWriter::create(&path, &plan, &meta, DenseDtype::F32)?;
        for (i, (name, shape)) in plan.iter().enumerate() {
            // The head of a tied source is its embedding.
            let source = if name == "lm_head.weight" && ckpt.config.tie_word_embeddings {
                "model.embed_tokens.weight"
            } else {
                name.as_str()
            };
            let w = ckpt.tensor_f32(source)?;
            let bad = |e: adadim_quantize::Error| CalibError::Invalid(format!("{}: tensor {name}: {e}", src.display()));
            let v = match rule(name) {
                Rule::Reads(norm) => {
                    let g = norm.map(|n| ckpt.tensor_f32(&n)).transpose()?;
                    rotate::rotate_inputs(&w, shape[0], g.as_deref(), &q).map_err(bad)?
                }
                Rule::Writes => rotate::rotate_outputs(&w, shape.get(1).copied().unwrap_or(1), &q).map_err(bad)?,
                Rule::Norm => vec![1.0; w.len()],
                Rule::Keep => w,
            };
            let v = match (heads, head_rule(name)) {
                (true, Some(HeadRule::ValueRows)) => {
                    let cols = shape.get(1).copied().unwrap_or(1);
                    let mut out = Vec::with_capacity(v.len());
                    for head in v.chunks_exact(hd * cols) {
                        out.extend(rotate::rotate_outputs(head, cols, &qh).map_err(bad)?);
                    }
                    out
                }
                (true, Some(HeadRule::OutputCols)) => {
                    rotate::rotate_inputs(&v, v.len() / hd, None, &qh).map_err(bad)?
                }
                _ => v,
            };
            writer.write_tensor(name, &v)?;
            progress(i + 1, plan.len());
        }
        writer.finish()?;
        let cfg = tmp.join("config.json");
        let text = serde_json::to_string_pretty(&config).map_err(|e| CalibError::Invalid(e.to_string()))?;
        std::fs::write(&cfg, text).map_err(|source| CalibError::Io { path: cfg.clone(), source })?;
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
            let from = src.join(f);
            if from.is_file() {
                std::fs::copy(&from, tmp.join(f)).map_err(|source| CalibError::Io { path: from, source })?;
            }
        }
        Ok(plan.len())
    })?;
    Ok(Rotated { out_dir: out_dir.into(), seed, width: d, heads, tensors })
}

/// The rotated copy of `src` for `seed` (the residual stream only) under `cache`, made on
/// first use: `NAME-HASH-sSEED`, the hash over `src`'s path and its files' sizes and times, so
/// a changed source gets a new copy. Two runs making it at once both end with the one copy.
pub fn rotated_cached(src: &Path, cache: &Path, seed: u64) -> Result<PathBuf> {
    let out = rotated_path(src, cache, seed)?;
    if out.join("config.json").is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache).map_err(|source| CalibError::Io { path: cache.into(), source })?;
    let canon = src.canonicalize().map_err(|source| CalibError::Io { path: src.into(), source })?;
    match rotate_checkpoint(&canon, &out, seed, false, &mut |_, _| {}) {
        Ok(_) => Ok(out),
        // Another run finished the same copy first.
        Err(_) if out.join("config.json").is_file() => Ok(out),
        Err(e) => Err(e),
    }
}

/// Where [`rotated_cached`] keeps the rotated copy of `src` for `seed`, made or not.
pub fn rotated_path(src: &Path, cache: &Path, seed: u64) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    let canon = src.canonicalize().map_err(|source| CalibError::Io { path: src.into(), source })?;
    let mut h = Sha256::new();
    h.update(canon.to_string_lossy().as_bytes());
    let mut files: Vec<_> = std::fs::read_dir(&canon)
        .map_err(|source| CalibError::Io { path: canon.clone(), source })?
        .filter_map(|e| e.ok())
        .collect();
    files.sort_by_key(|e| e.file_name());
    for e in files {
        if let Ok(m) = e.metadata() {
            h.update(e.file_name().to_string_lossy().as_bytes());
            h.update(m.len().to_le_bytes());
            let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            h.update(t.map_or(0, |t| t.as_nanos()).to_le_bytes());
        }
    }
    let hash: String = h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
    let name = canon.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned());
    Ok(cache.join(format!("{name}-{hash}-s{seed}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_llama_tensor_gets_its_rule() {
        let reads = |n: &str| match rule(n) {
            Rule::Reads(norm) => norm,
            _ => panic!("{n} should read the stream"),
        };
        assert_eq!(
            reads("model.layers.3.self_attn.k_proj.weight").as_deref(),
            Some("model.layers.3.input_layernorm.weight")
        );
        assert_eq!(
            reads("model.layers.12.mlp.up_proj.weight").as_deref(),
            Some("model.layers.12.post_attention_layernorm.weight")
        );
        assert_eq!(reads("lm_head.weight").as_deref(), Some("model.norm.weight"));
        assert_eq!(reads("model.embed_tokens.weight"), None);
        assert!(matches!(rule("model.layers.0.self_attn.o_proj.weight"), Rule::Writes));
        assert!(matches!(rule("model.layers.0.mlp.down_proj.weight"), Rule::Writes));
        assert!(matches!(rule("model.layers.0.input_layernorm.weight"), Rule::Norm));
        assert!(matches!(rule("model.norm.weight"), Rule::Norm));
        assert!(matches!(rule("model.layers.0.self_attn.q_proj.bias"), Rule::Keep));
    }
}
