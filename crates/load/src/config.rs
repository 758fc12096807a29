//! The model configuration: the subset of a Hugging Face `config.json` that a LLaMA-family
//! decoder needs, checked for consistency when read.

use crate::error::{LoadError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Architectures whose checkpoints share LLaMA's tensor layout and forward pass.
/// Mistral adds nothing we need (sliding windows are longer than our eval windows);
/// Qwen2 adds biases on q/k/v.
pub const SUPPORTED_ARCHS: &[&str] = &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// The largest width a config may declare (hidden, intermediate, vocabulary, the attention
/// widths): far beyond any real model, small enough that every size derived from the config
/// (tensor elements, parameters per block) fits a `usize`.
pub const MAX_WIDTH: usize = 1 << 24;
/// The most decoder layers a config may declare: a damaged `num_hidden_layers` must be an
/// error, not a list of billions of expected tensors.
pub const MAX_LAYERS: usize = 1 << 12;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Qwen2 has biases on q/k/v; some LLaMA variants declare `attention_bias`.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default)]
    pub torch_dtype: Option<String>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::read_capped(path, 16 << 20, "config.json")?;
        let text = String::from_utf8(bytes)
            .map_err(|e| LoadError::Config { path: path.to_path_buf(), msg: format!("not UTF-8 text ({e})") })?;
        Self::from_json(path, &text)
    }

    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let err = |msg: String| LoadError::Config { path: path.to_path_buf(), msg };
        let cfg: LlamaConfig = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
        let arch = cfg.architectures.first().cloned().unwrap_or_default();
        if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
            return Err(LoadError::UnsupportedArch {
                path: path.to_path_buf(),
                arch: if arch.is_empty() { format!("model_type={:?}", cfg.model_type) } else { arch },
                supported: SUPPORTED_ARCHS.join(", "),
            });
        }
        if let Some(s) = &cfg.rope_scaling {
            if !s.is_null() {
                return Err(err(format!("rope_scaling {s} is not supported yet")));
            }
        }
        for (name, v) in [
            ("hidden_size", cfg.hidden_size),
            ("intermediate_size", cfg.intermediate_size),
            ("num_hidden_layers", cfg.num_hidden_layers),
            ("num_attention_heads", cfg.num_attention_heads),
            ("vocab_size", cfg.vocab_size),
        ] {
            if v == 0 {
                return Err(err(format!("{name} must be positive")));
            }
        }
        for (name, v, max) in [
            ("hidden_size", cfg.hidden_size, MAX_WIDTH),
            ("intermediate_size", cfg.intermediate_size, MAX_WIDTH),
            ("vocab_size", cfg.vocab_size, MAX_WIDTH),
            ("num_attention_heads", cfg.num_attention_heads, MAX_WIDTH),
            ("num_hidden_layers", cfg.num_hidden_layers, MAX_LAYERS),
        ] {
            if v > max {
                return Err(err(format!("{name} {v} is implausible (at most {max})")));
            }
        }
        let kv = cfg.n_kv_heads();
        if kv == 0 || !cfg.num_attention_heads.is_multiple_of(kv) {
            return Err(err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                cfg.num_attention_heads
            )));
        }
        if cfg.head_dim.is_none() && !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.head_dim() == 0 || cfg.num_attention_heads.checked_mul(cfg.head_dim()).is_none_or(|q| q > MAX_WIDTH) {
            return Err(err(format!(
                "head_dim {} with {} attention heads is implausible (positive, at most {MAX_WIDTH} in all)",
                cfg.head_dim(),
                cfg.num_attention_heads
            )));
        }
        if !cfg.head_dim().is_multiple_of(2) {
            return Err(err(format!("head_dim {} must be even for RoPE", cfg.head_dim())));
        }
        if !(cfg.rms_norm_eps > 0.0 && cfg.rope_theta > 0.0) {
            return Err(err("rms_norm_eps and rope_theta must be positive".into()));
        }
        Ok(cfg)
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim()
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads() * self.head_dim()
    }
    pub fn has_qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.architectures.first().is_some_and(|a| a == "Qwen2ForCausalLM"))
    }

    /// Every tensor the checkpoint must hold, with the shape this config implies
    /// (row-major `[out, in]` for linears, as in PyTorch).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (qd, kvd) = (self.q_dim(), self.kv_dim());
        let mut out =
            vec![("model.embed_tokens.weight".to_string(), vec![v, d]), ("model.norm.weight".to_string(), vec![d])];
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, d]));
        }
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![qd, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kvd, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kvd, d]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, qd]));
            if self.has_qkv_bias() {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![qd]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kvd]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kvd]));
            }
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
        }
        out
    }

    /// Parameters of the decoder blocks' linears (what quantization touches) and FLOPs per
    /// token of a forward pass at context position `pos` (matmuls only, 2 FLOPs per MAC).
    pub fn linear_params_per_block(&self) -> usize {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        2 * d * self.q_dim() + 2 * d * self.kv_dim() + 3 * d * f
    }

    /// Matmul FLOPs to process one window of `seqlen` tokens: the useful work only, i.e.
    /// causal attention where position `i` attends to `i + 1` keys (scores and context).
    pub fn forward_flops(&self, seqlen: usize) -> f64 {
        let t = seqlen as f64;
        let linears = 2.0 * self.linear_params_per_block() as f64 * t;
        let attn = 2.0 * 2.0 * (t * (t + 1.0) / 2.0) * self.q_dim() as f64;
        let head = 2.0 * (self.hidden_size * self.vocab_size) as f64 * t;
        self.num_hidden_layers as f64 * (linears + attn) + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2_json() -> String {
        r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true}"#
            .to_string()
    }

    #[test]
    fn smollm2_shapes() {
        let c = LlamaConfig::from_json(Path::new("config.json"), &smollm2_json()).unwrap();
        assert_eq!((c.head_dim(), c.kv_dim(), c.q_dim()), (64, 192, 576));
        let t = c.expected_tensors();
        assert_eq!(t.len(), 2 + 30 * 9);
        assert!(t.iter().any(|(n, s)| n == "model.layers.0.self_attn.k_proj.weight" && s == &[192, 576]));
        assert_eq!(c.linear_params_per_block(), 3_538_944);
    }

    #[test]
    fn rejects_bad_configs() {
        let p = Path::new("/x/config.json");
        let bad_arch = smollm2_json().replace("LlamaForCausalLM", "GPT2LMHeadModel");
        let e = LlamaConfig::from_json(p, &bad_arch).unwrap_err().to_string();
        assert!(e.contains("/x/config.json") && e.contains("GPT2LMHeadModel"), "{e}");
        let bad_heads = smollm2_json().replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":4");
        let e = LlamaConfig::from_json(p, &bad_heads).unwrap_err().to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = LlamaConfig::from_json(p, "{not json").unwrap_err().to_string();
        assert!(e.contains("invalid config"), "{e}");
        let missing = smollm2_json().replace("\"hidden_size\":576,", "");
        let e = LlamaConfig::from_json(p, &missing).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
        // Damaged sizes are errors before anything is derived from them (found while fuzzing:
        // num_hidden_layers 3e9 made Checkpoint::open list 36e9 tensors, out of memory).
        for (from, to, want) in [
            (
                "\"num_hidden_layers\":30",
                "\"num_hidden_layers\":3000000000",
                "num_hidden_layers 3000000000 is implausible",
            ),
            ("\"vocab_size\":49152", "\"vocab_size\":18446744073709551615", "vocab_size"),
            ("\"num_key_value_heads\":3", "\"num_key_value_heads\":3,\"head_dim\":1152921504606846976", "head_dim"),
            ("\"num_key_value_heads\":3", "\"num_key_value_heads\":3,\"head_dim\":0", "head_dim 0"),
        ] {
            let json = smollm2_json().replace(from, to);
            let e = LlamaConfig::from_json(p, &json).unwrap_err().to_string();
            assert!(e.contains(want), "{to}: {e}");
        }
    }
}
