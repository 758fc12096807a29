//! Tokenizers: load `tokenizer.json`, or build one from a GGUF file's tokenizer metadata.
//!
//! GGUF stores a byte-level BPE tokenizer as its vocabulary (`tokenizer.ggml.tokens`), merge
//! rules (`tokenizer.ggml.merges`), token types (3 = control, i.e. special) and a pre-tokenizer
//! name (`tokenizer.ggml.pre`). We rebuild the equivalent Hugging Face `tokenizer.json`; the
//! pre-tokenizer for each name follows what llama.cpp does for it (src/llama-vocab.cpp).

use crate::error::{io_err, LoadError, Result};
use crate::gguf::Gguf;
use candle_core::quantized::gguf_file::Value;
use serde_json::json;
use std::path::Path;
pub use tokenizers::Tokenizer;

/// LLaMA-3 / Qwen2 style split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn load(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(LoadError::NotFound { path, hint: " (every model directory needs its tokenizer)".into() });
    }
    let bytes = crate::read_capped(&path, 1 << 30, "tokenizer.json")?;
    Tokenizer::from_bytes(&bytes).map_err(|e| LoadError::Tokenizer { path, msg: e.to_string() })
}

/// A sentence encoder's tokenizer (`dir/tokenizer.json`) as sentence-transformers runs it:
/// special tokens added, truncated at `max_len` tokens, no padding (the file's own padding and
/// truncation settings are replaced).
pub fn sentence_tokenizer(dir: &Path, max_len: usize) -> Result<Tokenizer> {
    let mut tok = load(dir)?;
    let path = dir.join("tokenizer.json");
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| LoadError::Tokenizer { path, msg: e.to_string() })?;
    Ok(tok)
}

/// `tokenizer_config.json` of the model in `dir` (chat template, EOS token): `None` when the
/// model has none; present but unreadable or not a JSON object is an error naming it, since
/// skipping it would silently drop the chat template.
pub fn config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("tokenizer_config.json");
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LoadError::Io { path, source: e }),
        Ok(_) => {}
    }
    let bytes = crate::read_capped(&path, 64 << 20, "tokenizer_config.json")?;
    let bad = |msg: String| LoadError::Tokenizer { path: path.clone(), msg };
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    if !v.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    for key in ["chat_template", "eos_token"] {
        if v.get(key).is_some_and(|t| {
            !(t.is_null() || t.is_string() || key == "eos_token" && t.get("content").is_some_and(|c| c.is_string()))
        }) {
            return Err(bad(format!("'{key}' is not a string")));
        }
    }
    Ok(Some(v))
}

pub fn save(tok: &TokenizerFiles, dir: &Path) -> Result<()> {
    for (name, v) in [("tokenizer.json", &tok.tokenizer_json), ("tokenizer_config.json", &tok.tokenizer_config)] {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_string(v).expect("JSON value")).map_err(io_err(&p))?;
    }
    Ok(())
}

/// `tokenizer.json` and `tokenizer_config.json` (chat template, special tokens).
pub struct TokenizerFiles {
    pub tokenizer_json: serde_json::Value,
    pub tokenizer_config: serde_json::Value,
}

impl TokenizerFiles {
    pub fn build(&self) -> std::result::Result<Tokenizer, String> {
        self.tokenizer_json.to_string().parse::<Tokenizer>().map_err(|e| e.to_string())
    }
}

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>> {
    match g.content.metadata.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(tok_err(g, format!("{key} holds a non-string"))),
            })
            .collect(),
        _ => Err(tok_err(g, format!("metadata key '{key}' is missing"))),
    }
}

fn tok_err(g: &Gguf, msg: String) -> LoadError {
    LoadError::Tokenizer { path: g.path.clone(), msg }
}

pub fn from_gguf(g: &Gguf) -> Result<TokenizerFiles> {
    let model = g.meta_str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(tok_err(
            g,
            format!("tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\", is)"),
        ));
    }
    let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // llama.cpp: digits split one by one, then the GPT-2 regex.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        other => {
            return Err(tok_err(
                g,
                format!("pre-tokenizer {other:?} is not supported yet (smollm, gpt2, llama-bpe, qwen2 are)"),
            ))
        }
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| crate::gguf::value_as_f64(v).unwrap_or(1.0) as i64).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    if vocab.len() != tokens.len() {
        return Err(tok_err(g, "tokenizer.ggml.tokens has duplicate entries".into()));
    }
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&3) || types.get(*i) == Some(&4))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types.get(i) == Some(&3)})
        })
        .collect();
    let id_of = |key: &str| {
        g.content
            .metadata
            .get(key)
            .and_then(crate::gguf::value_as_f64)
            .map(|x| x as usize)
            .and_then(|i| tokens.get(i).cloned())
    };
    let bos = id_of("tokenizer.ggml.bos_token_id");
    let eos = id_of("tokenizer.ggml.eos_token_id");
    let add_bos = matches!(g.content.metadata.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
    let post_processor = match (&bos, add_bos) {
        (Some(b), true) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [tokens.iter().position(|t| t == b)], "tokens": [b]}}}),
        _ => serde_json::Value::Null,
    };
    let tokenizer_json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let tokenizer_config = json!({
        "bos_token": bos, "eos_token": eos, "add_bos_token": add_bos,
        "chat_template": g.meta_str("tokenizer.chat_template"),
        "source": "built by adadim from GGUF tokenizer metadata",
    });
    let files = TokenizerFiles { tokenizer_json, tokenizer_config };
    files.build().map_err(|e| tok_err(g, format!("the rebuilt tokenizer does not load: {e}")))?;
    Ok(files)
}
