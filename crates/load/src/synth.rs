//! Random-weight checkpoints with a real model's shapes: fixtures for tests, and scale tests on
//! shapes larger than any model we can download ([`write_synthetic`]: LLaMA-2-7B / 13B shapes,
//! f16, sharded, with optional activation-outlier channels).
//!
//! Weights are seeded (SplitMix64 + Box-Muller), scaled like an initialized transformer
//! (`N(0, 1/sqrt(in))`), norms near 1; the tokenizer is byte-level BPE with the 256 byte
//! symbols and no merges, so any text tokenizes.

use crate::config::LlamaConfig;
use crate::error::{io_err, LoadError, Result};
use crate::safetensors_out::{DenseDtype, DenseWriter};
use rayon::prelude::*;
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
    std::fs::write(&cfg_path, serde_json::to_string_pretty(cfg).expect("config serializes"))
        .map_err(io_err(&cfg_path))?;
    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, byte_tokenizer_json(cfg.vocab_size).to_string()).map_err(io_err(&tok_path))?;
    Ok(())
}

/// The real models whose shapes `adadim synth --shape` knows.
pub const SHAPES: [&str; 5] = ["tiny", "smollm2", "llama2-7b", "llama2-13b", "llama3-8b"];

/// The config of a named shape (LLaMA architecture; vocabularies as the real models').
pub fn shape_config(name: &str) -> Result<LlamaConfig> {
    let (d, f, l, h, kv, vocab, tied, theta) = match name {
        "tiny" => return Ok(tiny_config()),
        "smollm2" => (576, 1536, 30, 9, 3, 49152, true, 100000.0),
        "llama2-7b" => (4096, 11008, 32, 32, 32, 32000, false, 10000.0),
        "llama2-13b" => (5120, 13824, 40, 40, 40, 32000, false, 10000.0),
        "llama3-8b" => (4096, 14336, 32, 32, 8, 128256, false, 500000.0),
        _ => {
            return Err(LoadError::Config {
                path: name.into(),
                msg: format!("unknown shape '{name}' (known: {})", SHAPES.join(", ")),
            });
        }
    };
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": d, "intermediate_size": f,
        "num_hidden_layers": l, "num_attention_heads": h, "num_key_value_heads": kv,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": theta, "tie_word_embeddings": tied,
        "max_position_embeddings": 4096, "torch_dtype": "float16"
    });
    LlamaConfig::from_json(Path::new(name), &json.to_string())
}

/// Activation-outlier channels to inject: `channels` hidden channels (seeded choice) whose
/// RMSNorm gains (both norms of every block) are multiplied by `scale`, and the matching input
/// columns of q, k, v, gate and up divided by it. The model computes the same function, but the
/// linears see inputs with a few channels `scale` times larger and weights with small columns
/// there: the structure of real LLM activations that per-IC groups isolate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outliers {
    pub channels: usize,
    pub scale: f32,
}

/// What [`write_synthetic`] writes.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub dtype: DenseDtype,
    pub seed: u64,
    pub outliers: Option<Outliers>,
    /// Largest shard in bytes (HF-style `model-0000i-of-0000n.safetensors` + index when more than one).
    pub shard_bytes: usize,
}

/// The outlier channels of `cfg` for `o` (seeded, distinct, sorted).
pub fn outlier_channels(cfg: &LlamaConfig, o: &Outliers, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ 0x0071_1e55);
    let mut ch: Vec<usize> = Vec::new();
    while ch.len() < o.channels.min(cfg.hidden_size) {
        let c = (rng.next_u64() % cfg.hidden_size as u64) as usize;
        if !ch.contains(&c) {
            ch.push(c);
        }
    }
    ch.sort_unstable();
    ch
}

/// Values of tensor `name` (`shape`), seeded by `(seed, name)` and generated in parallel
/// chunks with their own streams, so any thread count gives the same values.
fn synth_tensor(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let (norm, std) = if shape.len() == 1 && name.ends_with("norm.weight") {
        (true, 0.1)
    } else if shape.len() == 1 {
        (false, 0.02)
    } else {
        (false, 1.0 / (shape[1] as f32).sqrt())
    };
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng = Rng::new(seed ^ h ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        for x in c {
            *x = if norm { 1.0 + std * rng.normal() } else { std * rng.normal() };
        }
    });
    v
}

/// Write a random-weight checkpoint of `cfg` into `dir` (must not exist; written to a temporary
/// sibling and renamed, so a crash never leaves a partial model): config.json, tokenizer.json
/// (byte-level) and the safetensors shard(s) in `opts.dtype`, one tensor in memory at a time.
/// `progress(done, total)` counts tensors.
pub fn write_synthetic(
    dir: &Path,
    cfg: &LlamaConfig,
    opts: &SynthOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    if dir.exists() {
        return Err(LoadError::Config {
            path: dir.into(),
            msg: "already exists; choose a new output directory".into(),
        });
    }
    let tmp = crate::gguf::tempdir_for(dir)?;
    let result = write_synthetic_into(&tmp, cfg, opts, progress);
    match result {
        Ok(()) => std::fs::rename(&tmp, dir).map_err(io_err(dir)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn write_synthetic_into(
    dir: &Path,
    cfg: &LlamaConfig,
    opts: &SynthOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let tensors = cfg.expected_tensors();
    let size = |shape: &Vec<usize>| shape.iter().product::<usize>() * opts.dtype.size();
    // Shards: consecutive tensors up to shard_bytes each.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut filled = 0usize;
    for (n, shape) in &tensors {
        if filled > 0 && filled + size(shape) > opts.shard_bytes {
            shards.push(Vec::new());
            filled = 0;
        }
        filled += size(shape);
        shards.last_mut().expect("one shard").push((n.clone(), shape.clone()));
    }
    let outliers = opts.outliers.map(|o| (outlier_channels(cfg, &o, opts.seed), o.scale));
    let count = shards.len();
    let file = |i: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        }
    };
    let mut weight_map = serde_json::Map::new();
    let mut done = 0;
    for (i, shard) in shards.iter().enumerate() {
        let path = dir.join(file(i));
        let mut w = DenseWriter::create(&path, shard, &[("format".into(), "pt".into())], opts.dtype)?;
        for (name, shape) in shard {
            let mut v = synth_tensor(name, shape, opts.seed);
            if let Some((ch, scale)) = &outliers {
                if name.ends_with("input_layernorm.weight") || name.ends_with("post_attention_layernorm.weight") {
                    ch.iter().for_each(|&c| v[c] *= scale);
                } else if ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
                    .iter()
                    .any(|m| name.ends_with(&format!("{m}.weight")))
                {
                    let cols = shape[1];
                    for r in 0..shape[0] {
                        ch.iter().for_each(|&c| v[r * cols + c] /= scale);
                    }
                }
            }
            w.write_tensor(name, &v)?;
            weight_map.insert(name.clone(), file(i).into());
            done += 1;
            progress(done, tensors.len());
        }
        w.finish()?;
    }
    if count > 1 {
        let total: usize = tensors.iter().map(|(_, s)| size(s)).sum();
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = dir.join("model.safetensors.index.json");
        std::fs::write(&p, serde_json::to_string_pretty(&index).expect("json")).map_err(io_err(&p))?;
    }
    let mut c = serde_json::to_value(cfg).expect("config serializes");
    c["torch_dtype"] = match opts.dtype {
        DenseDtype::F32 => "float32",
        DenseDtype::F16 => "float16",
        DenseDtype::BF16 => "bfloat16",
    }
    .into();
    if let Some((ch, scale)) = &outliers {
        c["adadim_synth_outliers"] = serde_json::json!({"channels": ch, "scale": scale, "seed": opts.seed});
    }
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&c).expect("json")).map_err(io_err(&cfg_path))?;
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
    fn synthetic_shards_open_as_one_checkpoint_with_compensated_outliers() {
        let d = tempfile::tempdir().unwrap();
        let cfg = tiny_config();
        let o = Outliers { channels: 3, scale: 50.0 };
        let opts = |outliers| SynthOptions { dtype: DenseDtype::F16, seed: 5, outliers, shard_bytes: 20_000 };
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        write_synthetic(&a, &cfg, &opts(None), &mut |_, _| {}).unwrap();
        write_synthetic(&b, &cfg, &opts(Some(o)), &mut |_, _| {}).unwrap();
        assert!(write_synthetic(&a, &cfg, &opts(None), &mut |_, _| {})
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        assert!(a.join("model.safetensors.index.json").exists(), "20 kB shards: more than one");
        let (ca, cb) = (crate::Checkpoint::open(&a).unwrap(), crate::Checkpoint::open(&b).unwrap());
        assert_eq!(ca.entry("model.embed_tokens.weight").unwrap().dtype, safetensors::Dtype::F16);
        let ch = outlier_channels(&cfg, &o, 5);
        assert_eq!(ch.len(), 3);
        let (na, nb) = (
            ca.tensor_f32("model.layers.1.input_layernorm.weight").unwrap(),
            cb.tensor_f32("model.layers.1.input_layernorm.weight").unwrap(),
        );
        let (qa, qb) = (
            ca.tensor_f32("model.layers.1.self_attn.q_proj.weight").unwrap(),
            cb.tensor_f32("model.layers.1.self_attn.q_proj.weight").unwrap(),
        );
        for c in 0..cfg.hidden_size {
            let k = if ch.contains(&c) { 50.0 } else { 1.0 };
            // f16 rounding on both sides: compare the gain-times-column products.
            assert!((na[c] * k - nb[c]).abs() <= 1e-2 * nb[c].abs(), "norm channel {c}");
            assert!((qa[c] / k - qb[c]).abs() <= 1e-2 * qa[c].abs() / k + 1e-6, "q column {c}");
        }
        assert!(shape_config("llama2-7b").unwrap().linear_params_per_block() > 200_000_000);
        assert!(shape_config("gpt5").is_err());
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
