//! A Hugging Face checkpoint directory: `config.json`, one `model.safetensors` or shards listed
//! in `model.safetensors.index.json`, and `tokenizer.json`.
//!
//! Shards are memory-mapped, never read whole: a tensor is converted to f32 only when asked
//! for, so a caller that walks the model one decoder block at a time holds one block.

use crate::config::LlamaConfig;
use crate::error::{io_err, LoadError, Result};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    /// Names this file if it is truncated while mapped (declared first: dropped first).
    _mapped: crate::mapped::Mapped,
    mmap: Mmap,
    /// Byte offset of the data section (8-byte length + JSON header).
    data_start: usize,
}

/// Where one tensor lives and what it is.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the shard's data section.
    pub range: (usize, usize),
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    shards: Vec<Shard>,
    entries: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint").field("dir", &self.dir).field("tensors", &self.entries.len()).finish()
    }
}

impl Checkpoint {
    /// Open a checkpoint directory, check every tensor the config implies is present with the
    /// right shape and a float dtype. Tensor data is not read (see [`Checkpoint::check_finite`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(LoadError::NotFound {
                path: dir.to_path_buf(),
                hint: " (expected a model directory with config.json and *.safetensors, or a .gguf file)".into(),
            });
        }
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let shard_names = shard_files(dir)?;
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for name in shard_names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the file is opened read-only; we treat a concurrent writer as corrupt input,
            // as every mmap-based loader (safetensors, candle) does.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| LoadError::Safetensors { path: path.clone(), msg: e.to_string() })?;
            let shard = shards.len();
            for (tname, info) in meta.tensors() {
                if entries.contains_key(&tname) {
                    return Err(LoadError::Tensor {
                        path: path.clone(),
                        tensor: tname,
                        msg: "appears in more than one shard".into(),
                    });
                }
                entries.insert(
                    tname,
                    TensorEntry { shard, dtype: info.dtype, shape: info.shape.clone(), range: info.data_offsets },
                );
            }
            let _mapped = crate::mapped::Mapped::register(&mmap, &path);
            shards.push(Shard { path, _mapped, mmap, data_start: 8 + n });
        }
        let ckpt = Checkpoint { dir: dir.to_path_buf(), config, shards, entries };
        ckpt.check_layout()?;
        Ok(ckpt)
    }

    fn check_layout(&self) -> Result<()> {
        // Every tensor held must be one the config describes: a config edited to fewer layers
        // (or another shape family) would otherwise run a silently truncated model.
        let expected: std::collections::HashSet<String> =
            self.config.expected_tensors().into_iter().map(|(n, _)| n).collect();
        let mut extra: Vec<&String> =
            self.entries.keys().filter(|n| !expected.contains(*n) && !n.ends_with("rotary_emb.inv_freq")).collect();
        if !extra.is_empty() {
            extra.sort();
            let e = &self.entries[extra[0]];
            let why = if extra[0].starts_with("model.layers.") {
                format!(
                    "a layer beyond the {} that config.json's num_hidden_layers declares",
                    self.config.num_hidden_layers
                )
            } else if extra[0] == "lm_head.weight" {
                "config.json ties the head to the embedding (tie_word_embeddings), yet the checkpoint holds its own head".into()
            } else {
                "no part of the model config.json describes".into()
            };
            return Err(LoadError::Tensor {
                path: self.shards[e.shard].path.clone(),
                tensor: crate::printable(extra[0]).into_owned(),
                msg: format!(
                    "not used: {why} ({} such tensors); the config does not match the checkpoint",
                    extra.len()
                ),
            });
        }
        for (name, shape) in self.config.expected_tensors() {
            let e = self.entry(&name)?;
            if e.shape != shape {
                return Err(LoadError::ShapeMismatch {
                    path: self.shards[e.shard].path.clone(),
                    tensor: name,
                    expected: shape,
                    found: e.shape.clone(),
                });
            }
            if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(LoadError::UnsupportedDtype {
                    path: self.shards[e.shard].path.clone(),
                    tensor: name,
                    dtype: format!("{:?} (expected F32, F16 or BF16)", e.dtype),
                });
            }
        }
        Ok(())
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.entries
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor { path: self.dir.clone(), tensor: name.to_string() })
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|s| s.as_str())
    }

    /// The file a tensor lives in (for error messages).
    pub fn tensor_path(&self, name: &str) -> PathBuf {
        self.entries.get(name).map(|e| self.shards[e.shard].path.clone()).unwrap_or_else(|| self.dir.clone())
    }

    /// Read one tensor as f32 on the CPU, rejecting NaN / Inf.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let values = self.tensor_f32(name)?;
        let shape = self.entry(name)?.shape.clone();
        Tensor::from_vec(values, shape, &Device::Cpu).map_err(|e| LoadError::Tensor {
            path: self.tensor_path(name),
            tensor: name.into(),
            msg: e.to_string(),
        })
    }

    /// Read one tensor as a flat f32 vector (row-major), rejecting NaN / Inf.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        let shard = &self.shards[e.shard];
        let bytes = shard.mmap.get(shard.data_start + e.range.0..shard.data_start + e.range.1).ok_or_else(|| {
            LoadError::Safetensors { path: shard.path.clone(), msg: format!("tensor '{name}' out of range") }
        })?;
        let values = bytes_to_f32(bytes, e.dtype).ok_or_else(|| LoadError::UnsupportedDtype {
            path: shard.path.clone(),
            tensor: name.into(),
            dtype: format!("{:?}", e.dtype),
        })?;
        check_finite(&shard.path, name, &values)?;
        // The values are copied out: let the kernel drop the mapped pages from this process
        // (they stay in the page cache), so reading a model block by block keeps the resident
        // set at about one block instead of growing with every tensor touched.
        if bytes.len() >= RELEASE_BYTES {
            // SAFETY: the mapping is read-only and file-backed; nothing borrows this range any
            // more (the values above are an owned copy). A later read faults the pages back in
            // from the file with the same contents.
            let _ = unsafe {
                shard.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    shard.data_start + e.range.0,
                    e.range.1 - e.range.0,
                )
            };
        }
        Ok(values)
    }
}

impl Checkpoint {
    /// Scan every tensor for NaN / Inf straight from the mapped bytes (no f32 copy), so that a
    /// bad value in the last layer stops a run before the first block is quantized, not after
    /// the others. The first bad tensor in model order is reported.
    pub fn check_all_finite(&self) -> Result<()> {
        use rayon::prelude::*;
        let names: Vec<String> = self.config.expected_tensors().into_iter().map(|(n, _)| n).collect();
        let bad = names.par_iter().find_map_first(|name| {
            let e = self.entries.get(name)?;
            let shard = &self.shards[e.shard];
            let bytes = shard.mmap.get(shard.data_start + e.range.0..shard.data_start + e.range.1)?;
            let (width, mask): (usize, u32) = match e.dtype {
                Dtype::F32 => (4, 0x7f80_0000),
                Dtype::F16 => (2, 0x7c00),
                Dtype::BF16 => (2, 0x7f80),
                _ => return None,
            };
            let word = |c: &[u8]| {
                if width == 4 {
                    u32::from_le_bytes([c[0], c[1], c[2], c[3]])
                } else {
                    u32::from(u16::from_le_bytes([c[0], c[1]]))
                }
            };
            let mut it = bytes.chunks_exact(width).enumerate().filter(|(_, c)| word(c) & mask == mask);
            let found = it.next().map(|(first, _)| LoadError::NonFinite {
                path: shard.path.clone(),
                tensor: name.clone(),
                count: 1 + it.count(),
                first,
            });
            if bytes.len() >= RELEASE_BYTES {
                // SAFETY: as in `tensor_f32`: read-only, file-backed, nothing borrows the range now.
                let _ = unsafe {
                    shard.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        shard.data_start + e.range.0,
                        e.range.1 - e.range.0,
                    )
                };
            }
            found
        });
        bad.map_or(Ok(()), Err)
    }
}

/// Tensors at least this large release their mapped pages once read.
const RELEASE_BYTES: usize = 1 << 20;

/// Fail with [`LoadError::NonFinite`] if any value is NaN or infinite.
pub fn check_finite(path: &Path, tensor: &str, values: &[f32]) -> Result<()> {
    let mut bad = values.iter().enumerate().filter(|(_, v)| !v.is_finite());
    if let Some((first, _)) = bad.next() {
        return Err(LoadError::NonFinite {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            count: 1 + bad.count(),
            first,
        });
    }
    Ok(())
}

/// Decode little-endian F32 / F16 / BF16 bytes. `None` for other dtypes.
pub fn bytes_to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// The shard file names of a checkpoint directory, in a stable order.
fn shard_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let bytes = crate::read_capped(&index, 64 << 20, "model.safetensors.index.json")?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| LoadError::Config { path: index.clone(), msg: e.to_string() })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::Config { path: index.clone(), msg: "no \"weight_map\" object".into() })?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        for f in &files {
            if f.contains('/') || f.contains("..") {
                return Err(LoadError::Config {
                    path: index.clone(),
                    msg: format!("shard name {f:?} leaves the directory"),
                });
            }
        }
        if files.is_empty() {
            return Err(LoadError::Config { path: index, msg: "weight_map names no files".into() });
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec!["model.safetensors".into()]);
    }
    Err(LoadError::NotFound { path: single, hint: " (nor model.safetensors.index.json)".into() })
}
