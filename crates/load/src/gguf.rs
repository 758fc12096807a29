//! Import a GGUF file of the `llama` architecture as a Hugging Face checkpoint directory.
//!
//! Flow: read the header with candle's GGUF reader -> derive `config.json` from the metadata ->
//! dequantize each tensor to f32 (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K with
//! candle; the i-quants IQ1_S..IQ4_XS, which candle cannot read, with [`crate::iquant`]: their
//! type fields are masked for candle's header parse and their bytes read here),
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
    /// The header as candle parsed it; an i-quant tensor appears in it as F32 (see `iq`).
    pub content: Content,
    reader: BufReader<File>,
    /// The i-quant tensors: name -> GGML type id (their entry in `content` says F32).
    iq: HashMap<String, u32>,
    /// The i-quant codebooks, read on the first i-quant tensor.
    books: Option<crate::iquant::Codebooks>,
}

/// An i-quant tensor's type name, or candle's debug name of its type.
pub fn type_name(g: &Gguf, tensor: &str) -> String {
    match g.iq.get(tensor).and_then(|&id| crate::iquant::type_info(id)) {
        Some((name, _, _)) => name.to_string(),
        None => g.content.tensor_infos.get(tensor).map_or_else(String::new, |i| format!("{:?}", i.ggml_dtype)),
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut reader = BufReader::new(file);
        let raw = raw_header(&mut reader);
        // candle divides by `general.alignment` unchecked: a 0 there must be caught first.
        if raw.as_ref().is_some_and(|r| r.alignment == Some(0)) {
            return Err(LoadError::Gguf {
                path: path.to_path_buf(),
                msg: "general.alignment is 0 (it must be a power of two)".into(),
            });
        }
        reader.rewind().map_err(io_err(path))?;
        // i-quant types: candle refuses them, so its parse reads a copy of the header with their
        // type fields set to F32 (the same length, so the data offset it derives is the file's).
        let iq: Vec<&(String, u32, u64)> = raw
            .as_ref()
            .map(|r| r.types.iter().filter(|t| crate::iquant::type_info(t.1).is_some()).collect())
            .unwrap_or_default();
        let content = if iq.is_empty() {
            Content::read(&mut reader).map_err(|e| gguf_err(path, e))?
        } else {
            let end = raw.as_ref().map_or(0, |r| r.end);
            let mut head = vec![0u8; end as usize];
            reader.read_exact(&mut head).map_err(io_err(path))?;
            for (_, _, at) in &iq {
                head[*at as usize..*at as usize + 4].copy_from_slice(&0u32.to_le_bytes());
            }
            Content::read(&mut std::io::Cursor::new(head)).map_err(|e| gguf_err(path, e))?
        };
        let iq = iq.into_iter().map(|(n, id, _)| (n.clone(), *id)).collect();
        let g = Gguf { path: path.to_path_buf(), content, reader, iq, books: None };
        if let Some(raw) = &raw {
            g.check_unique(raw)?;
        }
        g.check_layout(len)?;
        Ok(g)
    }

    /// candle keeps the header's keys and tensor names in maps, so a second entry of one name
    /// silently replaces the first: refuse the file instead of guessing which was meant.
    fn check_unique(&self, raw: &RawHeader) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        if let Some(k) = raw.keys.iter().find(|k| !seen.insert(k.as_str())) {
            return Err(self.err(format!("metadata key '{k}' appears more than once")));
        }
        seen.clear();
        if let Some(t) = raw.tensors.iter().find(|t| !seen.insert(t.as_str())) {
            return Err(LoadError::Tensor {
                path: self.path.clone(),
                tensor: t.clone(),
                msg: "appears more than once in the tensor table".into(),
            });
        }
        Ok(())
    }

    /// The tensor data as the spec lays it out, checked for every tensor the file lists (as
    /// llama.cpp's loader does), not only those an import reads: `general.alignment` a power of
    /// two, each tensor's offset a multiple of it, its bytes inside the file (`len` bytes) and
    /// no two tensors sharing bytes. candle checks none of this but the end of the file, and a
    /// misaligned or overlapping offset would otherwise be read as weights.
    fn check_layout(&self, len: u64) -> Result<()> {
        let alignment = match self.meta("general.alignment") {
            None => candle_core::quantized::gguf_file::DEFAULT_ALIGNMENT,
            Some(v) => match *v {
                Value::U8(a) => u64::from(a),
                Value::U16(a) => u64::from(a),
                Value::U32(a) => u64::from(a),
                Value::I8(a) if a >= 0 => a as u64,
                Value::I16(a) if a >= 0 => a as u64,
                Value::I32(a) if a >= 0 => a as u64,
                // candle would quietly use the default, 32, for anything else.
                _ => {
                    return Err(self.err(format!(
                        "general.alignment is {} (it must be a 32-bit unsigned power of two)",
                        value_text(v)
                    )))
                }
            },
        };
        if !alignment.is_power_of_two() {
            return Err(self.err(format!("general.alignment is {alignment} (it must be a power of two)")));
        }
        let base = self.content.tensor_data_offset;
        let mut extents = Vec::with_capacity(self.content.tensor_infos.len());
        for (name, info) in &self.content.tensor_infos {
            let terr = |msg: String| LoadError::Tensor { path: self.path.clone(), tensor: name.clone(), msg };
            if info.offset % alignment != 0 {
                return Err(terr(format!(
                    "data offset {} is not a multiple of the file's alignment {alignment} (general.alignment)",
                    info.offset
                )));
            }
            let (block, block_bytes) = match self.iq.get(name).and_then(|&id| crate::iquant::type_info(id)) {
                Some((_, per, bytes)) => (per as u64, bytes as u64),
                None => (info.ggml_dtype.block_size() as u64, info.ggml_dtype.type_size() as u64),
            };
            let elems = info.shape.dims().iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            let bytes = elems.filter(|n| n % block == 0).and_then(|n| (n / block).checked_mul(block_bytes));
            let Some(bytes) = bytes else {
                return Err(terr(format!(
                    "shape {:?} is not a whole number of {} blocks of {block}",
                    info.shape.dims(),
                    type_name(self, name)
                )));
            };
            let start = base.checked_add(info.offset);
            let Some((start, end)) = start.and_then(|s| Some((s, s.checked_add(bytes)?))).filter(|&(_, e)| e <= len)
            else {
                return Err(terr(format!(
                    "needs {bytes} bytes at data offset {} but the file has {len} (truncated?)",
                    info.offset
                )));
            };
            extents.push((start, end, name));
        }
        extents.sort();
        // Each tensor against the furthest-reaching one before it (empty tensors take no bytes).
        let mut reach: Option<(u64, u64, &String)> = None;
        for &(start, end, name) in extents.iter().filter(|(s, e, _)| s < e) {
            if let Some((s0, e0, other)) = reach.filter(|&(_, e0, _)| start < e0) {
                return Err(LoadError::Tensor {
                    path: self.path.clone(),
                    tensor: name.clone(),
                    msg: format!("data bytes {start}..{end} overlap tensor '{other}' at {s0}..{e0}"),
                });
            }
            if reach.is_none_or(|(_, e0, _)| end > e0) {
                reach = Some((start, end, name));
            }
        }
        Ok(())
    }

    /// Values per block and bytes per block of a tensor's stored type (i-quants included).
    pub fn block_of(&self, name: &str) -> Option<(u64, u64)> {
        match self.iq.get(name).and_then(|&id| crate::iquant::type_info(id)) {
            Some((_, per, bytes)) => Some((per as u64, bytes as u64)),
            None => self
                .content
                .tensor_infos
                .get(name)
                .map(|i| (i.ggml_dtype.block_size() as u64, i.ggml_dtype.type_size() as u64)),
        }
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
        let arch = match self.meta("general.architecture") {
            Some(Value::String(a)) => a.clone(),
            Some(v) => return Err(self.err(format!("metadata key 'general.architecture' is {}, not a string", value_text(v)))),
            None => return Err(self.err("metadata key 'general.architecture' is missing (every GGUF names its architecture; this importer takes llama)".into())),
        };
        if arch != "llama" {
            return Err(LoadError::UnsupportedArch { path: self.path.clone(), arch, supported: "llama".into() });
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
            "head_dim": head_dim.unwrap_or(d.checked_div(n_head).unwrap_or(0)),
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

    /// Dequantize one GGUF tensor to f32, row-major with the HF shape `[out, in]`.
    pub fn tensor_f32(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor { path: self.path.clone(), tensor: name.into() })?;
        let dims = info.shape.dims().to_vec();
        let terr =
            |msg: String| LoadError::Tensor { path: self.path.clone(), tensor: name.into(), msg: first_line(msg) };
        if dims.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).is_none_or(|n| n == 0 || n > (1 << 40)) {
            return Err(terr(format!("implausible shape {dims:?}")));
        }
        if let Some(&id) = self.iq.get(name) {
            let (per, bytes) = crate::iquant::type_info(id).map(|t| (t.1, t.2)).unwrap_or((1, 1));
            let n: usize = dims.iter().product();
            let mut raw = vec![0u8; n / per * bytes];
            let start = self.content.tensor_data_offset + info.offset;
            self.reader.seek(std::io::SeekFrom::Start(start)).map_err(io_err(&self.path))?;
            self.reader.read_exact(&mut raw).map_err(io_err(&self.path))?;
            if self.books.is_none() {
                self.books = Some(crate::iquant::Codebooks::load(&crate::fetch::adadim_home())?);
            }
            let mut v = vec![0f32; n];
            self.books.as_ref().expect("loaded above").dequantize(id, &raw, &mut v).map_err(terr)?;
            crate::checkpoint::check_finite(&self.path, name, &v)?;
            return Ok((dims, v));
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

/// What candle's GGUF reader keeps in maps or quietly replaces, read from the header as the
/// spec lays it out (magic, version, counts, key / type / value entries, tensor infos): the
/// `general.alignment` it will divide by, and every key and tensor name in file order (a map
/// keeps the last of two equal names). `None` wherever the walk fails: candle's own parse then
/// reports what is wrong with the file.
struct RawHeader {
    alignment: Option<u64>,
    keys: Vec<String>,
    tensors: Vec<String>,
    /// Each tensor's name, GGML type id and the byte position of that id in the file.
    types: Vec<(String, u32, u64)>,
    /// The byte position where the tensor infos end.
    end: u64,
}

/// A reader that counts the bytes taken from it.
struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn raw_header<R0: Read>(r: &mut R0) -> Option<RawHeader> {
    let r = &mut Counted { inner: r, pos: 0 };
    fn bytes<const N: usize, R: Read>(r: &mut R) -> Option<[u8; N]> {
        let mut b = [0u8; N];
        r.read_exact(&mut b).ok().map(|()| b)
    }
    fn u32_<R: Read>(r: &mut R) -> Option<u32> {
        bytes::<4, _>(r).map(u32::from_le_bytes)
    }
    fn skip<R: Read>(r: &mut R, n: u64) -> Option<()> {
        (std::io::copy(&mut r.by_ref().take(n), &mut std::io::sink()).ok()? == n).then_some(())
    }
    // Lengths and counts are u32 in version 1, u64 after.
    fn len<R: Read>(r: &mut R, v1: bool) -> Option<u64> {
        if v1 {
            u32_(r).map(u64::from)
        } else {
            bytes::<8, _>(r).map(u64::from_le_bytes)
        }
    }
    // A string as candle reads it: at most 1 GiB, trailing NULs dropped, lossy UTF-8.
    fn string<R: Read>(r: &mut R, v1: bool) -> Option<String> {
        let n = len(r, v1)?;
        if n > 1 << 30 {
            return None;
        }
        let mut v = Vec::new();
        (r.by_ref().take(n).read_to_end(&mut v).ok()? as u64 == n).then_some(())?;
        while v.last() == Some(&0) {
            v.pop();
        }
        Some(String::from_utf8_lossy(&v).into_owned())
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
    // candle takes the magic in either byte order.
    if !matches!(&bytes::<4, _>(r)?, b"GGUF" | b"FUGG") {
        return None;
    }
    let v1 = u32_(r)? == 1;
    let n_tensors = len(r, v1)?;
    let n_kv = len(r, v1)?;
    // candle refuses more than 2^30 of either.
    if n_tensors > 1 << 30 || n_kv > 1 << 30 {
        return None;
    }
    let mut h = RawHeader { alignment: None, keys: Vec::new(), tensors: Vec::new(), types: Vec::new(), end: 0 };
    for _ in 0..n_kv {
        let key = string(r, v1)?;
        let ty = u32_(r)?;
        let is_alignment = key == "general.alignment";
        h.keys.push(key);
        if !is_alignment {
            skip_value(r, ty, v1, 0)?;
            continue;
        }
        // As candle reads it: unsigned 8/16/32-bit, or signed and not negative; the last wins.
        h.alignment = match ty {
            0 => Some(u64::from(bytes::<1, _>(r)?[0])),
            2 => Some(u64::from(u16::from_le_bytes(bytes::<2, _>(r)?))),
            4 => Some(u64::from(u32_(r)?)),
            1 => u64::try_from(i8::from_le_bytes(bytes::<1, _>(r)?)).ok(),
            3 => u64::try_from(i16::from_le_bytes(bytes::<2, _>(r)?)).ok(),
            5 => u64::try_from(i32::from_le_bytes(bytes::<4, _>(r)?)).ok(),
            _ => {
                skip_value(r, ty, v1, 0)?;
                None
            }
        };
    }
    for _ in 0..n_tensors {
        let name = string(r, v1)?;
        h.tensors.push(name.clone());
        let dims = u32_(r)?;
        if dims > 4 {
            return None;
        }
        skip(r, u64::from(dims) * if v1 { 4 } else { 8 })?;
        let at = r.pos;
        h.types.push((name, u32_(r)?, at));
        skip(r, 8)?; // offset
    }
    h.end = r.pos;
    Some(h)
}

/// A metadata value for a message: numbers and strings as they are, arrays by their length.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string \"{s}\""),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Array(a) => format!("an array of {} values", a.len()),
        v => value_as_f64(v).map_or_else(String::new, |x| x.to_string()),
    }
}

/// candle errors may carry a backtrace after the message; users get the message.
fn first_line(msg: String) -> String {
    msg.lines().next().unwrap_or_default().to_string()
}

fn gguf_err(path: &Path, e: candle_core::Error) -> LoadError {
    let msg = first_line(e.to_string());
    let msg = if msg.contains("unknown dtype") {
        format!(
            "{msg}: a tensor uses a GGUF type this importer cannot dequantize \
                 (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, \
                 IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS)"
        )
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
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output directory already exists; remove it or choose another",
            ),
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
        let src = by_hf
            .get(&hf)
            .cloned()
            .ok_or_else(|| LoadError::MissingTensor { path: g.path.clone(), tensor: gguf_name_of(&hf) })?;
        let info = &g.content.tensor_infos[&src];
        if info.shape.dims() != shape.as_slice() {
            return Err(LoadError::ShapeMismatch {
                path: g.path.clone(),
                tensor: src,
                expected: shape,
                found: info.shape.dims().to_vec(),
            });
        }
        plan.push((hf, shape, src));
    }
    plan.sort_by_key(|a| natural_key(&a.0));

    write_dir(out_dir, |tmp| -> Result<ImportSummary> {
        let mut source_types: HashMap<String, usize> = HashMap::new();
        let header: Vec<(String, Vec<usize>)> = plan.iter().map(|(h, s, _)| (h.clone(), s.clone())).collect();
        let meta = [
            ("format".to_string(), "pt".to_string()),
            ("source".to_string(), format!("gguf:{}", gguf_path.file_name().unwrap_or_default().to_string_lossy())),
        ];
        let st_path = tmp.join("model.safetensors");
        let mut writer =
            safetensors_out::DenseWriter::create(&st_path, &header, &meta, safetensors_out::DenseDtype::F32)?;
        let total = plan.len();
        for (i, (hf, _, src)) in plan.iter().enumerate() {
            let ty = type_name(&g, src);
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
        tokenizer::save(&tok, tmp)?;
        Ok(ImportSummary { out_dir: out_dir.to_path_buf(), tensors: total, source_types })
    })
}

/// A directory written whole by `fill` (into a fresh directory beside `out_dir`), then renamed
/// to `out_dir`; when `fill` fails, the partial directory is removed and nothing appears.
pub fn write_dir<T, E: From<LoadError>>(
    out_dir: &Path,
    fill: impl FnOnce(&Path) -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let tmp = tempdir_for(out_dir)?;
    match fill(&tmp) {
        Ok(v) => {
            std::fs::rename(&tmp, out_dir).map_err(io_err(out_dir))?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// A fresh hidden directory beside `target` (its parent created if need be), for
/// write-then-rename: `.NAME.partial-PID-N`, where NAME is `target`'s name, or for a name too
/// long to leave room for the rest within the filesystem's 255 bytes, its first bytes and a
/// hash of the whole.
pub(crate) fn tempdir_for(target: &Path) -> Result<PathBuf> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let stem = short_name(&name);
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

/// `name` if it has at most 200 bytes (NAME_MAX, 255, less room for a prefix and suffix);
/// else its first bytes, `~` and 16 hex digits of its SHA-256, 200 bytes or fewer, so two long
/// names that share their start still differ.
pub(crate) fn short_name(name: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 200;
    if name.len() <= MAX {
        return name.into();
    }
    let mut cut = MAX - 17;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{}", &name[..cut], &crate::fetch::sha256_hex(name.as_bytes())[..16]).into()
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
    fn long_names_get_a_short_hashed_temp_dir() {
        let d = tempfile::tempdir().unwrap();
        let long = "é".repeat(120); // 240 bytes: with `.` and `.partial-PID-N`, over 255
        let other = format!("{}x", &long[..238]);
        let a = tempdir_for(&d.path().join(&long)).unwrap();
        let b = tempdir_for(&d.path().join(&other)).unwrap();
        let (an, bn) = (a.file_name().unwrap().to_str().unwrap(), b.file_name().unwrap().to_str().unwrap());
        assert!(an.len() <= 255 && an.starts_with(".éé") && an.contains('~'), "{an}");
        assert_ne!(an.split(".partial").next(), bn.split(".partial").next());
        let short = tempdir_for(&d.path().join("model")).unwrap();
        assert!(short.file_name().unwrap().to_str().unwrap().starts_with(".model.partial-"));
    }

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
