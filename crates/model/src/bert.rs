//! A BERT sentence encoder (sentence-transformers' layout, as all-MiniLM-L6-v2 ships): word +
//! position + token-type embeddings and LayerNorm, post-LN blocks (bidirectional attention over
//! a padded batch with a mask, GELU in its erf form), then pooling as `1_Pooling/config.json`
//! says (the mean over the real tokens) and L2 normalisation where `modules.json` lists it.
//!
//! ```text
//! sentences -> tokenizer.json (truncated at sentence_bert_config's max_seq_length)
//!   -> ids (B, T) padded, mask (B, T)
//!   -> x = LN(word[ids] + pos[0..T] + type[0])                      (B*T, d)
//!   -> per layer: x = LN(x + O(attn(Qx, Kx, Vx, mask)));  x = LN(x + W2 gelu(W1 x))
//!   -> mean over the mask, / ||.||                                    (B, d)
//! ```
//! The six linears of each layer are [`Linear`]s, dense or packed like the decoder's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use adadim_load::LoadError;
use adadim_pack::PackedFile;
use candle_core::{DType, Device, Tensor};

use crate::error::{Ctx, ModelError, Result};
use crate::linear::{Linear, Weight};
use crate::settings::DecodeSettings;

/// The fields of a BERT `config.json` the encoder uses, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
}

fn config_err(path: &Path, msg: String) -> ModelError {
    ModelError::Load(LoadError::Config { path: path.to_path_buf(), msg })
}

impl BertConfig {
    /// From a config.json's text: every field present and in range, the activation GELU, the
    /// position embeddings absolute, else an error naming the field.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| config_err(path, format!("not valid JSON: {e}")))?;
        let model_type = v["model_type"].as_str().unwrap_or("");
        if model_type != "bert" {
            return Err(config_err(path, format!("model_type is {}: a BERT encoder needs \"bert\"", v["model_type"])));
        }
        let size = |k: &str| -> Result<usize> {
            match v.get(k) {
                None => Err(config_err(path, format!("`{k}` is missing"))),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0 && n <= 1 << 24)
                    .map(|n| n as usize)
                    .ok_or_else(|| config_err(path, format!("`{k}` is {x}: expected a positive integer"))),
            }
        };
        let act = v["hidden_act"].as_str().unwrap_or("(missing)");
        if act != "gelu" {
            return Err(config_err(path, format!("hidden_act {act:?} is not supported (gelu, the erf form, is)")));
        }
        if let Some(p) = v.get("position_embedding_type").and_then(|p| p.as_str()).filter(|&p| p != "absolute") {
            return Err(config_err(path, format!("position_embedding_type {p:?} is not supported (absolute is)")));
        }
        let eps = v["layer_norm_eps"].as_f64().filter(|e| *e > 0.0 && *e < 1.0);
        let c = BertConfig {
            vocab_size: size("vocab_size")?,
            hidden_size: size("hidden_size")?,
            num_hidden_layers: size("num_hidden_layers")?,
            num_attention_heads: size("num_attention_heads")?,
            intermediate_size: size("intermediate_size")?,
            max_position_embeddings: size("max_position_embeddings")?,
            type_vocab_size: size("type_vocab_size")?,
            layer_norm_eps: eps
                .ok_or_else(|| config_err(path, "`layer_norm_eps` is missing or not in (0, 1)".into()))?,
        };
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(config_err(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    c.hidden_size, c.num_attention_heads
                ),
            ));
        }
        Ok(c)
    }
}

/// One post-LN encoder layer.
#[derive(Debug, Clone)]
pub struct BertLayer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attn_out: Linear,
    attn_ln: (Tensor, Tensor),
    pub intermediate: Linear,
    pub output: Linear,
    out_ln: (Tensor, Tensor),
}

/// The encoder with its pooling.
#[derive(Debug, Clone)]
pub struct Bert {
    pub config: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_ln: (Tensor, Tensor),
    pub layers: Vec<BertLayer>,
    /// `modules.json` lists a Normalize module.
    pub normalize: bool,
    /// Tokens per sentence at most (sentence_bert_config.json's max_seq_length).
    pub max_seq_length: usize,
}

/// Reads `dir/name` as JSON (a sentence-transformers side file), `None` when absent.
fn side_json(dir: &Path, name: &str) -> Result<Option<(PathBuf, serde_json::Value)>> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ModelError::Load(LoadError::Io { path: path.clone(), source: e }))?;
    let v = serde_json::from_str(&text).map_err(|e| config_err(&path, format!("not valid JSON: {e}")))?;
    Ok(Some((path, v)))
}

/// Whether `dir/config.json` declares a BERT (`"model_type": "bert"`): the encoder's paths
/// (quantize, embed) rather than the decoder's.
pub fn is_bert(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v["model_type"] == "bert")
}

impl Bert {
    /// Loads a sentence-transformers directory: config.json, model.safetensors (f32, with or
    /// without a `bert.` prefix), the pooling and normalisation modules.
    pub fn load(dir: &Path) -> Result<Bert> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| ModelError::Load(LoadError::Io { path: cfg_path.clone(), source: e }))?;
        let config = BertConfig::from_json(&cfg_path, &text)?;
        if let Some((path, p)) = side_json(dir, "1_Pooling/config.json")? {
            let on = |k: &str| p[k].as_bool().unwrap_or(false);
            let others = ["pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens"];
            if !on("pooling_mode_mean_tokens") || others.iter().any(|k| on(k)) {
                return Err(config_err(
                    &path,
                    "only mean pooling (pooling_mode_mean_tokens alone) is supported".into(),
                ));
            }
        }
        let normalize = side_json(dir, "modules.json")?.is_some_and(|(_, m)| {
            m.as_array().is_some_and(|a| a.iter().any(|x| x["type"].as_str().is_some_and(|t| t.ends_with("Normalize"))))
        });
        let max_seq_length = match side_json(dir, "sentence_bert_config.json")? {
            Some((path, s)) => {
                let n = s["max_seq_length"].as_u64().unwrap_or(config.max_position_embeddings as u64) as usize;
                if n > config.max_position_embeddings {
                    return Err(config_err(
                        &path,
                        format!(
                            "max_seq_length {n} is longer than the position table ({})",
                            config.max_position_embeddings
                        ),
                    ));
                }
                n
            }
            None => config.max_position_embeddings,
        };
        let st = dir.join("model.safetensors");
        let w = if crate::source::is_packed(dir) {
            let file = PackedFile::open(&st)?;
            let prefix =
                if file.dense_value_bytes("embeddings.word_embeddings.weight").is_some() { "" } else { "bert." };
            Weights { tensors: Tensors::Packed(file), prefix, path: st }
        } else {
            let tensors = candle_core::safetensors::load(&st, &Device::Cpu)
                .map_err(|e| ModelError::Load(LoadError::Safetensors { path: st.clone(), msg: e.to_string() }))?;
            let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") { "" } else { "bert." };
            Weights { tensors: Tensors::Dense(tensors), prefix, path: st }
        };
        let (d, f) = (config.hidden_size, config.intermediate_size);
        let linear = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
            Ok(Linear { weight: w.linear(name, rows, cols)?, bias: Some(w.get(&format!("{name}.bias"), &[rows])?) })
        };
        let ln = |name: &str| -> Result<(Tensor, Tensor)> {
            Ok((w.get(&format!("{name}.weight"), &[d])?, w.get(&format!("{name}.bias"), &[d])?))
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = format!("encoder.layer.{i}");
            layers.push(BertLayer {
                query: linear(&format!("{l}.attention.self.query"), d, d)?,
                key: linear(&format!("{l}.attention.self.key"), d, d)?,
                value: linear(&format!("{l}.attention.self.value"), d, d)?,
                attn_out: linear(&format!("{l}.attention.output.dense"), d, d)?,
                attn_ln: ln(&format!("{l}.attention.output.LayerNorm"))?,
                intermediate: linear(&format!("{l}.intermediate.dense"), f, d)?,
                output: linear(&format!("{l}.output.dense"), d, f)?,
                out_ln: ln(&format!("{l}.output.LayerNorm"))?,
            });
        }
        Ok(Bert {
            word: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, d])?,
            position: w.get("embeddings.position_embeddings.weight", &[config.max_position_embeddings, d])?,
            token_type: w.get("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, d])?,
            emb_ln: ln("embeddings.LayerNorm")?,
            layers,
            normalize,
            max_seq_length,
            config,
        })
    }

    /// Sentence embeddings of a batch of token-id sequences (each with its [CLS] ... [SEP]),
    /// padded to the longest and masked.
    pub fn embed(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (b, t) = (batch.len(), batch.iter().map(Vec::len).max().unwrap_or(0));
        let (enc, mut x) = self.start(batch)?;
        let mut run = || -> candle_core::Result<Vec<Vec<f32>>> {
            for i in 0..self.layers.len() {
                x = self.layer(i, &enc, &x)?;
            }
            self.pool(&enc, &x)
        };
        run().ctx(|| format!("BERT forward over {b} sentences of up to {t} tokens"))
    }

    /// The padded batch's mask and the embeddings entering the first layer, `(B*T, d)`.
    pub fn start(&self, batch: &[Vec<u32>]) -> Result<(Padded, Tensor)> {
        let c = &self.config;
        let b = batch.len();
        let t = batch.iter().map(Vec::len).max().unwrap_or(0);
        if let Some((i, s)) =
            batch.iter().enumerate().find(|(_, s)| s.is_empty() || s.len() > c.max_position_embeddings)
        {
            return Err(ModelError::Tensor {
                context: format!("sentence {i}"),
                source: candle_core::Error::Msg(format!(
                    "{} tokens: 1 to {} (the position table) fit",
                    s.len(),
                    c.max_position_embeddings
                )),
            });
        }
        if let Some(&id) = batch.iter().flatten().find(|&&id| id as usize >= c.vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, vocab: c.vocab_size });
        }
        let ids: Vec<u32> =
            batch.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len()))).collect();
        let mask: Vec<f32> =
            batch.iter().flat_map(|s| (0..t).map(move |j| if j < s.len() { 1.0 } else { 0.0 })).collect();
        let dev = Device::Cpu;
        let eps = c.layer_norm_eps as f32;
        let run = || -> candle_core::Result<(Padded, Tensor)> {
            let ids = Tensor::from_vec(ids, b * t, &dev)?;
            let pos = self.position.narrow(0, 0, t)?.repeat((b, 1))?;
            let x = (self.word.index_select(&ids, 0)? + pos)?.broadcast_add(&self.token_type.narrow(0, 0, 1)?)?;
            let x = candle_nn::ops::layer_norm(&x, &self.emb_ln.0, &self.emb_ln.1, eps)?;
            // Padded keys get -inf-like scores (a large negative, so a softmax row never sees NaN).
            let bias = ((Tensor::from_vec(mask.clone(), (b, 1, 1, t), &dev)? - 1.0)? * 1e30)?;
            let real: Vec<u32> = (0..b * t).filter(|&i| mask[i] > 0.0).map(|i| i as u32).collect();
            let real = Tensor::from_vec(real.clone(), real.len(), &dev)?;
            Ok((Padded { b, t, mask, bias, real }, x))
        };
        run().ctx(|| format!("BERT embeddings of {b} sentences of up to {t} tokens"))
    }

    /// Layer `i` whole: the stream `x` entering it to the stream leaving it.
    pub fn layer(&self, i: usize, p: &Padded, x: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.attention(i, p, x)?;
        let x = self.attn_residual(i, x, &a)?;
        let f = self.ffn_hidden(i, &x)?;
        self.ffn_residual(i, &x, &f)
    }

    /// Layer `i`'s self-attention over the batch: the input of its attention output linear.
    pub fn attention(&self, i: usize, p: &Padded, x: &Tensor) -> candle_core::Result<Tensor> {
        let (l, s) = (&self.layers[i], DecodeSettings::DEFAULT);
        let (b, t, d, h) = (p.b, p.t, self.config.hidden_size, self.config.num_attention_heads);
        let hd = d / h;
        let heads =
            |y: Tensor| -> candle_core::Result<Tensor> { y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous() };
        let q = heads(l.query.forward(x, &s)?)?;
        let k = heads(l.key.forward(x, &s)?)?;
        let v = heads(l.value.forward(x, &s)?)?;
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (hd as f64).sqrt())?.broadcast_add(&p.bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b * t, d))
    }

    /// `LN(x + attn_out(a))`: the stream after layer `i`'s attention.
    pub fn attn_residual(&self, i: usize, x: &Tensor, a: &Tensor) -> candle_core::Result<Tensor> {
        let l = &self.layers[i];
        let y = (x + l.attn_out.forward(a, &DecodeSettings::DEFAULT)?)?;
        candle_nn::ops::layer_norm(&y, &l.attn_ln.0, &l.attn_ln.1, self.config.layer_norm_eps as f32)
    }

    /// `gelu(intermediate(x))`: the input of layer `i`'s output linear ([`crate::kernels::gelu_erf`]
    /// in parallel pieces: candle's runs libm's `erf` one value at a time).
    pub fn ffn_hidden(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        use rayon::prelude::*;
        let h = self.layers[i].intermediate.forward(x, &DecodeSettings::DEFAULT)?;
        let dims = h.dims().to_vec();
        let mut v = h.flatten_all()?.to_vec1::<f32>()?;
        v.par_chunks_mut(1 << 14).for_each(crate::kernels::gelu_erf);
        Tensor::from_vec(v, dims, &Device::Cpu)
    }

    /// `LN(x + output(f))`: the stream leaving layer `i`.
    pub fn ffn_residual(&self, i: usize, x: &Tensor, f: &Tensor) -> candle_core::Result<Tensor> {
        self.out_norm(i, &self.ffn_sum(i, x, f)?)
    }

    /// `x + output(f)`: layer `i`'s residual sum before its last LayerNorm (where BERT's
    /// activation outliers are reported).
    pub fn ffn_sum(&self, i: usize, x: &Tensor, f: &Tensor) -> candle_core::Result<Tensor> {
        x + self.layers[i].output.forward(f, &DecodeSettings::DEFAULT)?
    }

    /// Layer `i`'s last LayerNorm.
    pub fn out_norm(&self, i: usize, y: &Tensor) -> candle_core::Result<Tensor> {
        let l = &self.layers[i];
        candle_nn::ops::layer_norm(y, &l.out_ln.0, &l.out_ln.1, self.config.layer_norm_eps as f32)
    }

    /// The sentence embeddings of the last layer's stream `x`: mean over the mask, normalised
    /// where the model says so.
    pub fn pool(&self, p: &Padded, x: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
        let x = x.reshape((p.b, p.t, self.config.hidden_size))?;
        let m = Tensor::from_vec(p.mask.clone(), (p.b, p.t, 1), &Device::Cpu)?;
        let pooled = x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?; // (b, d)
        let out = if self.normalize {
            let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        out.to_dtype(DType::F32)?.to_vec2::<f32>()
    }
}

/// A padded batch of sentences: its shape and mask, for the stages of [`Bert::embed`].
#[derive(Debug)]
pub struct Padded {
    b: usize,
    t: usize,
    mask: Vec<f32>,
    /// `(B, 1, 1, T)`: 0 at real keys, a large negative at padding.
    bias: Tensor,
    /// Row indices of the real (unpadded) tokens in a `(B*T, k)` activation.
    real: Tensor,
}

impl Padded {
    /// The rows of a `(B*T, k)` activation that belong to real tokens (what calibration counts).
    pub fn real_rows(&self, y: &Tensor) -> candle_core::Result<Tensor> {
        y.index_select(&self.real, 0)
    }
}

/// The checkpoint's tensors, named without the optional `bert.` prefix, checked for shape.
struct Weights {
    tensors: Tensors,
    prefix: &'static str,
    path: PathBuf,
}

/// A Hugging Face file (every tensor dense) or an adadim packed one (linears packed).
enum Tensors {
    Dense(HashMap<String, Tensor>),
    Packed(PackedFile),
}

impl Weights {
    fn shape_err(&self, tensor: String, expected: &[usize], found: &[usize]) -> ModelError {
        ModelError::Load(LoadError::ShapeMismatch {
            path: self.path.clone(),
            tensor,
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let t = match &self.tensors {
            Tensors::Dense(tensors) => tensors.get(&full).cloned().ok_or_else(|| {
                ModelError::Load(LoadError::MissingTensor { path: self.path.clone(), tensor: full.clone() })
            })?,
            Tensors::Packed(file) => {
                let (dims, values) = file.dense(&full)?;
                Tensor::from_vec(values, dims, &Device::Cpu).ctx(|| format!("tensor {full}"))?
            }
        };
        if t.dims() != shape {
            return Err(self.shape_err(full, shape, t.dims()));
        }
        t.to_dtype(DType::F32).ctx(|| format!("tensor {full}"))
    }

    /// The weight of linear `name` (without `.weight`): dense, or packed as quantized.
    fn linear(&self, name: &str, rows: usize, cols: usize) -> Result<Weight> {
        let full = format!("{}{name}", self.prefix);
        match &self.tensors {
            Tensors::Packed(file) if file.linear_names().any(|n| n == full) => {
                let p = file.linear(&full)?;
                if [p.rows(), p.cols()] != [rows, cols] {
                    return Err(self.shape_err(format!("{full}.weight"), &[rows, cols], &[p.rows(), p.cols()]));
                }
                Ok(Weight::Packed(Arc::new(p)))
            }
            _ => Ok(Weight::Dense(self.get(&format!("{name}.weight"), &[rows, cols])?)),
        }
    }
}
