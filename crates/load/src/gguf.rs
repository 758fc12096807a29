//! Import a GGUF file of the `llama` architecture as a Hugging Face checkpoint directory.
//!
//! Flow: read the header with candle's GGUF reader -> derive `config.json` from the metadata ->
//! dequantize each tensor to f32 (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K),
//! undo llama.cpp's row permutation of Q and K, rename to HF names -> stream the tensors into
//! `model.safetensors` -> build `tokenizer.json` from the GGUF's own tokenizer metadata.
//! Everything is written into a temporary directory that is renamed into place at the end,
//! so an interrupted import never leaves a directory that looks complete.

use crate::config::LlamaConfig;
use crate::error::{io_err, LoadError, Result};
use crate::{safetensors_out, tokenizer};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

/// A parsed GGUF header plus the open file.
pub struct Gguf {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let mut reader = BufReader::new(file);
        // candle divides by `general.alignment` unchecked: a 0 there must be caught first.
        if declared_alignment(&mut reader) == Some(0) {
            return Err(LoadError::Gguf { path: path.to_path_buf(), msg: "general.alignment is 0 (it must be a positive multiple of 8)".into() });
        }
        reader.rewind().map_err(io_err(path))?;
        let content = Content::read(&mut reader).map_err(|e| gguf_err(path, e))?;
        Ok(Gguf { path: path.to_path_buf(), content, reader })
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u(&self, key: &str) -> Result<usize> {
        let v = self.meta(key).ok_or_else(|| self.err(format!("metadata key '{key}' is missing")))?;
        value_as_f64(v).map(|x| x as usize).ok_or_else(|| self.err(format!("metadata key '{key}' is not a number")))
    }

    fn meta_f(&self, key: &str, default: f64) -> Result<f64> {
        match self.meta(key) {
            None => Ok(default),
            Some(v) => value_as_f64(v).ok_or_else(|| self.err(format!("metadata key '{key}' is not a number"))),
        }
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    fn err(&self, msg: String) -> LoadError {
        LoadError::Gguf { path: self.path.clone(), msg }
    }

    /// The HF config implied by the metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.meta_str("general.architecture").unwrap_or("").to_string();
        if arch != "llama" {
            return Err(LoadError::UnsupportedArch {
                path: self.path.clone(),
                arch,
                supported: "llama".into(),
            });
        }
        let n_head = self.meta_u("llama.attention.head_count")?;
        let d = self.meta_u("llama.embedding_length")?;
        let vocab = match self.meta_u("llama.vocab_size") {
            Ok(v) => v,
            Err(_) => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => return Err(self.err("neither llama.vocab_size nor tokenizer.ggml.tokens present".into())),
            },
        };
        let head_dim = match self.meta("llama.attention.key_length") {
            Some(v) => value_as_f64(v).map(|x| x as usize),
            None => None,
        };
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": d,
            "intermediate_size": self.meta_u("llama.feed_forward_length")?,
            "num_hidden_layers": self.meta_u("llama.block_count")?,
            "num_attention_heads": n_head,
            "num_key_value_heads": self.meta_u("llama.attention.head_count_kv").unwrap_or(n_head),
            "head_dim": head_dim.unwrap_or(if n_head > 0 { d / n_head } else { 0 }),
            "vocab_size": vocab,
            "rms_norm_eps": self.meta_f("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            "rope_theta": self.meta_f("llama.rope.freq_base", 10_000.0)?,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "max_position_embeddings": self.meta_u("llama.context_length").ok(),
            "bos_token_id": self.meta_u("tokenizer.ggml.bos_token_id").ok(),
            "eos_token_id": self.meta_u("tokenizer.ggml.eos_token_id").ok(),
            "torch_dtype": "float32",
        });
        LlamaConfig::from_json(&self.path, &json.to_string())
    }

    /// Fail early, naming the tensor, if its data would run past the end of the file.
    fn check_extent(&mut self, name: &str) -> Result<()> {
        let info = &self.content.tensor_infos[name];
        let elems = info.shape.elem_count() as u64;
        let bytes = elems / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64;
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let len = self.reader.get_ref().metadata().map_err(io_err(&self.path))?.len();
        if start.saturating_add(bytes) > len {
            return Err(LoadError::Tensor {
                path: self.path.clone(),
                tensor: name.into(),
                msg: format!("needs bytes {start}..{} but the file has {len} (truncated?)", start.saturating_add(bytes)),
            });
        }
        Ok(())
    }

    /// Dequantize one GGUF tensor to f32, row-major with the HF shape `[out, in]`.
    pub fn tensor_f32(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.content.tensor_infos.get(name).ok_or_else(|| LoadError::MissingTensor {
            path: self.path.clone(),
            tensor: name.into(),
        })?;
        let dims = info.shape.dims().to_vec();
        let terr = |msg: String| LoadError::Tensor { path: self.path.clone(), tensor: name.into(), msg: first_line(msg) };
        if dims.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).is_none_or(|n| n == 0 || n > (1 << 40)) {
            return Err(terr(format!("implausible shape {dims:?}")));
        }
        if matches!(info.ggml_dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
            return Err(LoadError::UnsupportedDtype {
                path: self.path.clone(),
                tensor: name.into(),
                dtype: format!("{:?} (an intermediate type llama.cpp never stores)", info.ggml_dtype),
            });
        }
        let q = info
            .read(&mut self.reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| terr(e.to_string()))?;
        let t = q.dequantize(&Device::Cpu).map_err(|e| terr(e.to_string()))?;
        let v = t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| terr(e.to_string()))?;
        crate::checkpoint::check_finite(&self.path, name, &v)?;
        Ok((dims, v))
    }
}

/// The `general.alignment` candle's reader will use, found by walking the metadata as the spec
/// lays it out (magic, version, counts, then key / type / value entries). `None` where the key
/// is absent or not an integer candle takes, and wherever the walk fails: candle's own parse
/// then reports what is wrong with the file.
fn declared_alignment<R: Read>(r: &mut R) -> Option<u64> {
    fn bytes<const N: usize, R: Read>(r: &mut R) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        r.read_exact(&mut b).ok().map(|()| b)
    }
    fn u32_<R: Read>(r: &mut R) -> Option<u32> {
        bytes::<4, R>(r).map(u32::from_le_bytes)
    }
    fn skip<R: Read>(r: &mut R, n: u64) -> Option<()> {
        (std::io::copy(&mut r.by_ref().take(n), &mut std::io::sink()).ok()? == n).then_some(())
    }
    // Lengths and counts are u32 in version 1, u64 after.
    fn len<R: Read>(r: &mut R, v1: bool) -> Option<u64> {
        if v1 {
            u32_(r).map(u64::from)
        } else {
            bytes::<8, R>(r).map(u64::from_le_bytes)
        }
    }
    // Skip one value of type `ty` (candle reads values nested up to 64 deep).
    fn skip_value<R: Read>(r: &mut R, ty: u32, v1: bool, depth: usize) -> Option<()> {
        if depth > 64 {
            return None;
        }
        match ty {
            0 | 1 | 7 => skip(r, 1),
            2 | 3 => skip(r, 2),
            4..=6 => skip(r, 4),
            10..=12 => skip(r, 8),
            8 => {
                let n = len(r, v1)?;
                skip(r, n)
            }
            9 => {
                let elem = u32_(r)?;
                let n = len(r, v1)?;
                for _ in 0..n {
                    skip_value(r, elem, v1, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
    // Whether the next `n` key bytes are `general.alignment` as candle reads keys: with any
    // number of trailing NULs dropped.
    fn is_alignment_key<R: Read>(r: &mut R, n: u64) -> Option<bool> {
        const KEY: &[u8; 17] = b"general.alignment";
        if n < 17 {
            return skip(r, n).map(|()| false);
        }
        let matches = &bytes::<17, R>(r)? == KEY;
        let mut rest = n - 17;
        let mut only_nuls = true;
        let mut buf = [0u8; 4096];
        while rest > 0 {
            let k = rest.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..k]).ok()?;
            only_nuls &= buf[..k].iter().all(|&b| b == 0);
            rest -= k as u64;
        }
        Some(matches && only_nuls)
    }
    // candle takes the magic in either byte order.
    if !matches!(&bytes::<4, R>(r)?, b"GGUF" | b"FUGG") {
        return None;
    }
    let v1 = u32_(r)? == 1;
    let _tensors = len(r, v1)?;
    let kv = len(r, v1)?;
    let mut alignment = None;
    for _ in 0..kv {
        let klen = len(r, v1)?;
        let is_alignment = is_alignment_key(r, klen)?;
        let ty = u32_(r)?;
        if !is_alignment {
            skip_value(r, ty, v1, 0)?;
            continue;
        }
        // As candle reads it: unsigned 8/16/32-bit, or signed and not negative; the last wins.
        alignment = match ty {
            0 => Some(u64::from(bytes::<1, R>(r)?[0])),
            2 => Some(u64::from(u16::from_le_bytes(bytes::<2, R>(r)?))),
            4 => Some(u64::from(u32_(r)?)),
            1 => u64::try_from(i8::from_le_bytes(bytes::<1, R>(r)?)).ok(),
            3 => u64::try_from(i16::from_le_bytes(bytes::<2, R>(r)?)).ok(),
            5 => u64::try_from(i32::from_le_bytes(bytes::<4, R>(r)?)).ok(),
            _ => {
                skip_value(r, ty, v1, 0)?;
                None
            }
        };
    }
    alignment
}

/// candle errors may carry a backtrace after the message; users get the message.
fn first_line(msg: String) -> String {
    msg.lines().next().unwrap_or_default().to_string()
}

fn gguf_err(path: &Path, e: candle_core::Error) -> LoadError {
    let msg = first_line(e.to_string());
    let msg = if msg.contains("unknown dtype") {
        format!("{msg}: a tensor uses a GGUF type this importer cannot dequantize \
                 (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)")
    } else if msg.contains("magic") {
        format!("{msg} (not a GGUF file?)")
    } else {
        msg
    };
    LoadError::Gguf { path: path.to_path_buf(), msg }
}

pub(crate) fn value_as_f64(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => *x as f64,
        Value::I8(x) => *x as f64,
        Value::U16(x) => *x as f64,
        Value::I16(x) => *x as f64,
        Value::U32(x) => *x as f64,
        Value::I32(x) => *x as f64,
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        _ => return None,
    })
}

/// GGUF tensor name -> HF tensor name.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = leaf.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undo the row permutation llama.cpp's converter applies to Q and K projections
/// (`reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`): GGUF row `h*hd + 2j + two` is HF row
/// `h*hd + two*hd/2 + j`. `cols` is 1 for a bias.
pub fn unpermute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for j in 0..half {
            for two in 0..2 {
                let src = h * hd + 2 * j + two;
                let dst = h * hd + two * half + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// What an import did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    pub tensors: usize,
    pub source_types: HashMap<String, usize>,
}

/// Import `gguf_path` into the HF directory `out_dir` (which must not exist yet).
/// `progress(done, total)` is called after each tensor.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<ImportSummary> {
    if out_dir.exists() {
        return Err(LoadError::Io {
            path: out_dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "output directory already exists; remove it or choose another"),
        });
    }
    let mut g = Gguf::open(gguf_path)?;
    let config = g.config()?;
    let tok = tokenizer::from_gguf(&g)?;

    // Plan: HF name, shape and GGUF source for every tensor the config needs.
    let mut plan: Vec<(String, Vec<usize>, String)> = Vec::new();
    let mut by_hf: HashMap<String, String> = HashMap::new();
    for name in g.content.tensor_infos.keys() {
        match hf_name(name) {
            Some(hf) => {
                by_hf.insert(hf, name.clone());
            }
            None if name == "rope_freqs.weight" => {
                return Err(LoadError::Tensor {
                    path: g.path.clone(),
                    tensor: name.clone(),
                    msg: "rope frequency scaling (LLaMA-3.1 style) is not supported yet".into(),
                })
            }
            None => {} // e.g. rope caches some converters store; not needed.
        }
    }
    for (hf, shape) in config.expected_tensors() {
        let src = by_hf.get(&hf).cloned().ok_or_else(|| LoadError::MissingTensor {
            path: g.path.clone(),
            tensor: gguf_name_of(&hf),
        })?;
        let info = &g.content.tensor_infos[&src];
        if info.shape.dims() != shape.as_slice() {
            return Err(LoadError::ShapeMismatch {
                path: g.path.clone(),
                tensor: src,
                expected: shape,
                found: info.shape.dims().to_vec(),
            });
        }
        g.check_extent(&src)?;
        plan.push((hf, shape, src));
    }
    plan.sort_by(|a, b| natural_key(&a.0).cmp(&natural_key(&b.0)));

    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = tempdir_in(parent, out_dir)?;
    let result = (|| -> Result<ImportSummary> {
        let mut source_types: HashMap<String, usize> = HashMap::new();
        let header: Vec<(String, Vec<usize>)> = plan.iter().map(|(h, s, _)| (h.clone(), s.clone())).collect();
        let meta = [
            ("format".to_string(), "pt".to_string()),
            ("source".to_string(), format!("gguf:{}", gguf_path.file_name().unwrap_or_default().to_string_lossy())),
        ];
        let st_path = tmp.join("model.safetensors");
        let mut writer = safetensors_out::DenseWriter::create(&st_path, &header, &meta, safetensors_out::DenseDtype::F32)?;
        let total = plan.len();
        for (i, (hf, _, src)) in plan.iter().enumerate() {
            let ty = format!("{:?}", g.content.tensor_infos[src].ggml_dtype);
            *source_types.entry(ty).or_default() += 1;
            let (_, mut v) = g.tensor_f32(src)?;
            let cols = if hf.ends_with(".bias") { 1 } else { config.hidden_size };
            if hf.contains("self_attn.q_proj") {
                v = unpermute_rows(&v, config.num_attention_heads, cols);
            } else if hf.contains("self_attn.k_proj") {
                v = unpermute_rows(&v, config.n_kv_heads(), cols);
            }
            writer.write_tensor(hf, &v)?;
            progress(i + 1, total);
        }
        writer.finish()?;
        let cfg_path = tmp.join("config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).unwrap()).map_err(io_err(&cfg_path))?;
        tokenizer::save(&tok, &tmp)?;
        Ok(ImportSummary { out_dir: out_dir.to_path_buf(), tensors: total, source_types })
    })();
    match result {
        Ok(s) => {
            std::fs::rename(&tmp, out_dir).map_err(io_err(out_dir))?;
            Ok(s)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// A fresh hidden directory next to `target`, for write-then-rename.
pub(crate) fn tempdir_in(parent: &Path, target: &Path) -> Result<PathBuf> {
    let stem = target.file_name().unwrap_or_default().to_string_lossy().to_string();
    for i in 0..1000u32 {
        let p = parent.join(format!(".{stem}.partial-{}-{i}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(LoadError::Io { path: p, source: e }),
        }
    }
    Err(LoadError::Io {
        path: parent.to_path_buf(),
        source: std::io::Error::other("could not create a temporary directory"),
    })
}

/// Sort `model.layers.10.x` after `model.layers.9.x`.
fn natural_key(name: &str) -> (usize, String) {
    let layer = name
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok())
        .map(|n| n + 1)
        .unwrap_or(0);
    (layer, name.to_string())
}

fn gguf_name_of(hf: &str) -> String {
    // Only for error messages: say which GGUF tensor we looked for.
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let pairs = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ];
    let mut s = hf.replacen("model.layers.", "blk.", 1);
    for (h, g) in pairs {
        s = s.replace(h, g);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for g in ["token_embd.weight", "blk.7.attn_k.weight", "blk.29.ffn_down.weight", "blk.0.attn_q.bias"] {
            let hf = hf_name(g).unwrap();
            assert_eq!(gguf_name_of(&hf), g);
        }
        assert_eq!(hf_name("blk.3.attn_output.weight").unwrap(), "model.layers.3.self_attn.o_proj.weight");
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    /// Permute as llama.cpp's converter does, then undo: identity.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (n_head, hd, cols) = (3, 8, 5);
        let rows = n_head * hd;
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        // permute: out[h, j, two] = in[h, two, j]
        let mut p = vec![0.0; w.len()];
        for h in 0..n_head {
            for two in 0..2 {
                for j in 0..hd / 2 {
                    let src = h * hd + two * hd / 2 + j;
                    let dst = h * hd + j * 2 + two;
                    p[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, n_head, cols), w);
    }
}
