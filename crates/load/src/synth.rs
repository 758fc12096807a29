//! Random-weight checkpoints with a real model's shapes: fixtures for tests, and (later)
//! scale tests on shapes larger than any model we can download.
//!
//! Weights are seeded (SplitMix64 + Box-Muller), scaled like an initialized transformer
//! (`N(0, 1/sqrt(in))`), norms near 1; the tokenizer is byte-level BPE with the 256 byte
//! symbols and no merges, so any text tokenizes.

use crate::config::LlamaConfig;
use crate::error::{io_err, Result};
use crate::safetensors_out::{DenseDtype, DenseWriter};
use std::path::Path;

/// Deterministic normal samples.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    pub fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// A small LLaMA config for tests: 2 layers, GQA, ragged sizes.
pub fn tiny_config() -> LlamaConfig {
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 48, "intermediate_size": 80,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    LlamaConfig::from_json(Path::new("tiny"), &json.to_string()).expect("valid tiny config")
}

/// Write `config.json`, `model.safetensors` and `tokenizer.json` for `cfg` into `dir`.
pub fn write_random_checkpoint(dir: &Path, cfg: &LlamaConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tensors = cfg.expected_tensors();
    let st = dir.join("model.safetensors");
    let mut w = DenseWriter::create(&st, &tensors, &[("format".into(), "pt".into())], DenseDtype::F32)?;
    let mut rng = Rng::new(seed);
    for (name, shape) in &tensors {
        let n: usize = shape.iter().product();
        let v = if shape.len() == 1 && name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect()
        } else if shape.len() == 1 {
            rng.normals(n, 0.02)
        } else {
            rng.normals(n, 1.0 / (shape[1] as f32).sqrt())
        };
        w.write_tensor(name, &v)?;
    }
    w.finish()?;
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(cfg).expect("config serializes")).map_err(io_err(&cfg_path))?;
    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, byte_tokenizer_json(cfg.vocab_size).to_string()).map_err(io_err(&tok_path))?;
    Ok(())
}

/// Byte-level BPE over the 256 byte symbols (ids 0..256), no merges; ids above 255 unused.
pub fn byte_tokenizer_json(vocab_size: usize) -> serde_json::Value {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
    for i in alphabet.len()..vocab_size {
        vocab.insert(format!("<unused{i}>"), i.into());
    }
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_seeded_and_roughly_normal() {
        let a = Rng::new(7).normals(20_000, 1.0);
        assert_eq!(a, Rng::new(7).normals(20_000, 1.0));
        assert_ne!(a, Rng::new(8).normals(20_000, 1.0));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }

    #[test]
    fn random_checkpoint_opens_and_tokenizes() {
        let d = tempfile::tempdir().unwrap();
        write_random_checkpoint(d.path(), &tiny_config(), 1).unwrap();
        let ck = crate::Checkpoint::open(d.path()).unwrap();
        assert_eq!(ck.tensor("model.layers.1.mlp.down_proj.weight").unwrap().dims(), &[48, 80]);
        let tok = crate::tokenizer::load(d.path()).unwrap();
        let ids = tok.encode("héllo 12", false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), "héllo 12".len(), "one token per byte");
        assert!(ids.iter().all(|&i| i < 256));
    }
}
