//! The packed checkpoint: one safetensors file holding every quantized linear in its chosen
//! layout ([`crate::format`]) and the remaining tensors in the source model's float type, with
//! JSON metadata.
//!
//! | tensor | dtype | shape |
//! |---|---|---|
//! | `{linear}.qcodes` | U8 | `[rows, row_bytes(cols)]`, codes packed per row ([`crate::bits::pack_codes`]) |
//! | `{linear}.scales` | F16 | the param grid, per-OC `[rows, ceil(cols/g)]`, per-IC `[ceil(rows/g), cols]` |
//! | `{linear}.qzeros` | U8 | `[param rows, row_bytes(param cols)]`, zero points packed like codes |
//! | `{linear}.mins` | F16 | the param grid: float minima (`min: true`), in place of `qzeros` |
//! | `{linear}.perm` | I32 | `[cols]`, only for per-OC act-order (stored column -> input column) |
//! | anything else | F32, F16 or BF16 | as in the source model (its dtype kept) |
//!
//! `__metadata__`: `adadim.format = "packed"`, `adadim.format_version = "2"`,
//! `adadim.linears` (JSON: per linear `rows, cols, bits, group, axis, permuted`, and `min`
//! where true; a file with minima is `format_version = "3"`, so older readers refuse it) and
//! `adadim.quantization` (JSON chosen by the writer: method, calibration, source checksum,
//! tool version). A reader trusts none of it: every tensor is checked against the declared
//! layout before a byte of it is used, so a lying header is an error, never an out-of-bounds read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use adadim_load::checkpoint::bytes_to_f32;
use adadim_load::safetensors_out::{DenseDtype, StreamWriter};
use adadim_quantize::{Axis, GroupParams};
use half::f16;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::bits;
use crate::format::{Layout, PackedLinear};

/// The format version this build writes. Version 1 differs only in 3-bit codes, which it
/// stored as one bit stream per row; this build reads it and lays such codes out as version 2
/// does ([`crate::bits::pack_codes`]) while loading. A file with float minima is written as
/// [`FORMAT_VERSION_MIN`].
pub const FORMAT_VERSION: u32 = 2;
/// Version 2 plus linears with float minima (`{linear}.mins`).
pub const FORMAT_VERSION_MIN: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: tensor '{tensor}': {msg}")]
    Tensor { path: PathBuf, tensor: String, msg: String },
    #[error(transparent)]
    Write(#[from] adadim_load::LoadError),
}

pub type Result<T> = std::result::Result<T, PackError>;

/// What the metadata says of one linear.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearMeta {
    pub rows: usize,
    pub cols: usize,
    pub bits: u8,
    pub group: usize,
    pub axis: String,
    pub permuted: bool,
    /// Float minima (`{linear}.mins`) in place of packed zero points.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub min: bool,
}

impl LinearMeta {
    fn of(p: &PackedLinear) -> Self {
        let l = p.layout();
        LinearMeta {
            rows: p.rows(),
            cols: p.cols(),
            bits: l.bits,
            group: l.group,
            axis: axis_name(l.axis).into(),
            permuted: p.perm.is_some(),
            min: l.min,
        }
    }
}

fn axis_name(a: Axis) -> &'static str {
    match a {
        Axis::Oc => "oc",
        Axis::Ic => "ic",
    }
}

/// Streams a packed checkpoint to `path` (the caller writes it under a temporary name and
/// renames it when complete).
pub struct PackedWriter {
    out: StreamWriter,
    linears: BTreeMap<String, LinearMeta>,
}

impl PackedWriter {
    /// `tensors` bounds how many tensors will be written (it sizes the reserved header).
    pub fn create(path: &Path, tensors: usize) -> Result<Self> {
        // ~160 bytes per header entry, ~110 per linear in the metadata, 64 KiB for the rest.
        Ok(PackedWriter { out: StreamWriter::create(path, 65536 + 300 * tensors)?, linears: BTreeMap::new() })
    }

    /// A quantized linear under `name` (e.g. `model.layers.0.self_attn.q_proj`).
    pub fn linear(&mut self, name: &str, p: &PackedLinear) -> Result<()> {
        let (pr, pc) = p.layout().param_shape(p.rows(), p.cols());
        let rb = bits::row_bytes(p.cols(), p.layout().bits);
        self.out.write(&format!("{name}.qcodes"), "U8", &[p.rows(), rb], &p.codes[..p.rows() * rb])?;
        let scales: Vec<u8> = p.scales.iter().flat_map(|&s| f16::from_f32(s).to_le_bytes()).collect();
        self.out.write(&format!("{name}.scales"), "F16", &[pr, pc], &scales)?;
        if p.layout().min {
            // The minima the quantizer chose: each must give back exactly the zero it holds.
            let mut mins = Vec::with_capacity(2 * p.zeros.len());
            for (i, (&scale, &zero)) in p.scales.iter().zip(&p.zeros).enumerate() {
                let min = GroupParams { scale, zero }.min();
                if GroupParams::from_min(scale, min).zero.to_bits() != zero.to_bits() {
                    return Err(PackError::Tensor {
                        path: PathBuf::new(),
                        tensor: format!("{name}.mins"),
                        msg: format!("zero {zero} at {i} is not an f16 minimum over its scale {scale}"),
                    });
                }
                mins.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            }
            self.out.write(&format!("{name}.mins"), "F16", &[pr, pc], &mins)?;
            return self.rest(name, p);
        }
        let maxq = f32::from(((1u16 << p.layout().bits) - 1) as u8);
        if let Some(i) = p.zeros.iter().position(|&z| !(z.fract() == 0.0 && (0.0..=maxq).contains(&z))) {
            return Err(PackError::Tensor {
                path: PathBuf::new(),
                tensor: format!("{name}.qzeros"),
                msg: format!("zero point {} at {i} is not a whole number in 0..={maxq}", p.zeros[i]),
            });
        }
        let zeros: Vec<u8> = p.zeros.iter().map(|&z| z as u8).collect();
        let zb = bits::row_bytes(pc, p.layout().bits);
        let packed = bits::pack(&zeros, pr, pc, p.layout().bits);
        self.out.write(&format!("{name}.qzeros"), "U8", &[pr, zb], &packed[..pr * zb])?;
        self.rest(name, p)
    }

    /// The permutation and the metadata of a linear whose codes and params are written.
    fn rest(&mut self, name: &str, p: &PackedLinear) -> Result<()> {
        if let Some(perm) = &p.perm {
            let b: Vec<u8> = perm.iter().flat_map(|&c| (c as i32).to_le_bytes()).collect();
            self.out.write(&format!("{name}.perm"), "I32", &[perm.len()], &b)?;
        }
        self.linears.insert(name.to_string(), LinearMeta::of(p));
        Ok(())
    }

    /// A dense tensor (embeddings, norms, head) stored as `dtype`: the source model's, so that
    /// an f16 model's embedding and head are not doubled in size (1 GB of a 7B file).
    pub fn dense(&mut self, name: &str, shape: &[usize], values: &[f32], dtype: DenseDtype) -> Result<()> {
        let bytes = dtype.encode(values).map_err(|(i, v)| PackError::Tensor {
            path: PathBuf::new(),
            tensor: name.into(),
            msg: format!("value {v} at index {i} is beyond {}'s range", dtype.name()),
        })?;
        Ok(self.out.write(name, dtype.name(), shape, &bytes)?)
    }

    /// Write the header: the linears' layouts and `quantization` (free-form JSON), sealed by
    /// [`METADATA_DIGEST`].
    pub fn finish(self, quantization: &serde_json::Value) -> Result<()> {
        let mut meta = vec![
            ("format".to_string(), "pt".to_string()),
            ("adadim.format".to_string(), "packed".to_string()),
            (
                "adadim.format_version".to_string(),
                if self.linears.values().any(|m| m.min) { FORMAT_VERSION_MIN } else { FORMAT_VERSION }.to_string(),
            ),
            ("adadim.linears".to_string(), serde_json::to_string(&self.linears).expect("maps serialize")),
            ("adadim.quantization".to_string(), quantization.to_string()),
        ];
        let digest = metadata_digest(meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        meta.push((METADATA_DIGEST.to_string(), digest));
        Ok(self.out.finish(&meta)?)
    }
}

/// The metadata key holding the SHA-256 of every other metadata entry: a value edited into
/// another valid one (a format version, a layout) is caught rather than believed. Files
/// written before it existed (format version 2 without it) are read as they are.
pub const METADATA_DIGEST: &str = "adadim.metadata_sha256";

fn metadata_digest<'a>(entries: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut sorted: Vec<(&str, &str)> = entries.filter(|(k, _)| *k != METADATA_DIGEST).collect();
    sorted.sort();
    let mut bytes = Vec::new();
    for part in sorted.iter().flat_map(|(k, v)| [k, v]) {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part.as_bytes());
    }
    adadim_load::fetch::sha256_hex(&bytes)
}

/// A packed checkpoint opened for reading (the file is read into memory once; every accessor
/// checks what it returns against the declared layout).
pub struct PackedFile {
    path: PathBuf,
    /// Names the file if it is truncated while mapped (declared before the map: dropped first).
    _mapped: adadim_load::mapped::Mapped,
    /// The file, mapped: tensors are copied out as they are asked for and their pages handed
    /// back ([`PackedFile::release`]), so loading a model holds about the model, not the model
    /// and the file (read whole into memory, SmolLM2 w4g128's 170 MB stayed resident beside
    /// the model for as long as `generate` ran).
    bytes: memmap2::Mmap,
    /// Every tensor's dtype, shape and byte range in `bytes` (the header parsed once).
    tensors: HashMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
    linears: BTreeMap<String, LinearMeta>,
    quantization: serde_json::Value,
    /// The file's format version (1 or 2).
    version: u32,
}

/// Tensors at least this large hand their mapped pages back once read.
const RELEASE_BYTES: usize = 1 << 20;

impl PackedFile {
    pub fn open(path: &Path) -> Result<Self> {
        if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err(PackError::Write(adadim_load::LoadError::IsADirectory { path: path.to_path_buf() }));
        }
        let file = std::fs::File::open(path).map_err(|source| PackError::Io { path: path.to_path_buf(), source })?;
        // SAFETY: the file is opened read-only; a concurrent writer is treated as corrupt input,
        // as every mmap-based loader (safetensors, candle, adadim-load's checkpoints) does.
        let bytes = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|source| PackError::Io { path: path.to_path_buf(), source })?;
        let file_err = |msg: String| PackError::File { path: path.to_path_buf(), msg };
        let (n, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| file_err(format!("corrupt or truncated safetensors file: {e}")))?;
        // Offsets, overlaps and the data length are the safetensors crate's checks.
        SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(format!("corrupt or truncated safetensors file: {e}")))?;
        let m = meta.metadata().clone().unwrap_or_default();
        if m.get("adadim.format").map(String::as_str) != Some("packed") {
            return Err(file_err("not an adadim packed checkpoint (no adadim.format = packed in its metadata)".into()));
        }
        if let Some(want) = m.get(METADATA_DIGEST) {
            if *want != metadata_digest(m.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
                return Err(file_err(format!("its metadata was changed after it was written ({METADATA_DIGEST} does not match); re-quantize, or restore the file")));
            }
        }
        let version = m.get("adadim.format_version").cloned().unwrap_or_default();
        let version = match version.as_str() {
            "1" => 1,
            "2" => 2,
            "3" => 3,
            _ => {
                return Err(file_err(format!(
                "packed format version '{version}' is not supported (this build reads versions 1 to {FORMAT_VERSION_MIN})"
            )))
            }
        };
        let linears = serde_json::from_str(m.get("adadim.linears").map(String::as_str).unwrap_or(""))
            .map_err(|e| file_err(format!("adadim.linears metadata: {e}")))?;
        let quantization =
            m.get("adadim.quantization").and_then(|q| serde_json::from_str(q).ok()).unwrap_or(serde_json::Value::Null);
        // Offsets were validated against the data length by `deserialize` above.
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(name, t)| (name, (t.dtype, t.shape.clone(), 8 + n + t.data_offsets.0..8 + n + t.data_offsets.1)))
            .collect();
        let _mapped = adadim_load::mapped::Mapped::register(&bytes, path);
        Ok(PackedFile { path: path.to_path_buf(), bytes, _mapped, tensors, linears, quantization, version })
    }

    /// The linears the metadata declares.
    pub fn linear_names(&self) -> impl Iterator<Item = &str> {
        self.linears.keys().map(String::as_str)
    }

    pub fn quantization(&self) -> &serde_json::Value {
        &self.quantization
    }

    fn err(&self, tensor: &str, msg: String) -> PackError {
        PackError::Tensor { path: self.path.clone(), tensor: tensor.to_string(), msg }
    }

    /// Tensor `name`'s bytes, after checking its dtype and shape.
    fn tensor(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<&[u8]> {
        let (d, s, range) = self.tensors.get(name).ok_or_else(|| self.err(name, "missing".into()))?;
        if *d != dtype || s != shape {
            return Err(self.err(name, format!("is {d:?} {s:?}, but the declared layout needs {dtype:?} {shape:?}")));
        }
        Ok(&self.bytes[range.clone()])
    }

    /// Hands the mapped pages of tensor `name` back to the kernel once its values have been
    /// copied out (they stay in the page cache; reading the tensor again faults them back in
    /// with the same contents). Small tensors are left alone.
    fn release(&self, name: &str) {
        if let Some((_, _, range)) = self.tensors.get(name).filter(|t| t.2.len() >= RELEASE_BYTES) {
            // SAFETY: the mapping is read-only and file-backed; nothing borrows this range any
            // more (callers release after their owned copies are made).
            let _ = unsafe {
                self.bytes.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
            };
        }
    }

    /// Bytes per value of dense tensor `name` as stored (None if it is not a float tensor here).
    pub fn dense_value_bytes(&self, name: &str) -> Option<usize> {
        match self.tensors.get(name)?.0 {
            Dtype::F32 => Some(4),
            Dtype::F16 | Dtype::BF16 => Some(2),
            _ => None,
        }
    }

    /// A dense tensor (stored as F32, F16 or BF16) as f32 values, and its shape.
    pub fn dense(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (d, shape, range) = self.tensors.get(name).ok_or_else(|| self.err(name, "missing".into()))?;
        if !matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(self.err(name, format!("is {d:?}, expected F32, F16 or BF16")));
        }
        let values =
            bytes_to_f32(&self.bytes[range.clone()], *d).ok_or_else(|| self.err(name, format!("cannot read {d:?}")))?;
        self.release(name);
        Ok((shape.clone(), values))
    }

    /// The packed linear `name`, every part checked against its declared layout.
    pub fn linear(&self, name: &str) -> Result<PackedLinear> {
        let m = self.linears.get(name).ok_or_else(|| self.err(name, "not among the file's packed linears".into()))?;
        let bad = |msg: String| self.err(name, format!("metadata: {msg}"));
        if !matches!(m.bits, 2 | 3 | 4 | 8) {
            return Err(bad(format!("bits {} (2, 3, 4 or 8)", m.bits)));
        }
        let axis = match m.axis.as_str() {
            "oc" => Axis::Oc,
            "ic" => Axis::Ic,
            a => return Err(bad(format!("axis '{a}' (oc or ic)"))),
        };
        // Sizes from the metadata are compared with the tensors' real sizes before anything is
        // allocated from them; these checked products keep a lying header from overflowing.
        if m.rows.checked_mul(m.cols).and_then(|n| n.checked_mul(8)).is_none() {
            return Err(bad(format!("shape [{}, {}] overflows", m.rows, m.cols)));
        }
        let along = if axis == Axis::Oc { m.cols } else { m.rows };
        if m.rows == 0 || m.cols == 0 || m.group == 0 || m.group > along {
            return Err(bad(format!("shape [{}, {}] with group {}", m.rows, m.cols, m.group)));
        }
        if m.permuted && axis == Axis::Ic {
            return Err(bad("a column permutation only goes with per-OC groups".into()));
        }
        if m.min && self.version < FORMAT_VERSION_MIN {
            return Err(bad(format!("float minima in a version {} file", self.version)));
        }
        let layout = Layout { bits: m.bits, group: m.group, axis, min: m.min };
        let (pr, pc) = layout.param_shape(m.rows, m.cols);
        let rb = bits::row_bytes(m.cols, m.bits);
        let codes = self.tensor(&format!("{name}.qcodes"), Dtype::U8, &[m.rows, rb])?;
        let scales = self.tensor(&format!("{name}.scales"), Dtype::F16, &[pr, pc])?;
        let f16s =
            |b: &[u8]| -> Vec<f32> { b.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect() };
        let scales = f16s(scales);
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(self.err(&format!("{name}.scales"), format!("non-finite scale {} at index {i}", scales[i])));
        }
        let zeros: Vec<f32> = if m.min {
            let mins = f16s(self.tensor(&format!("{name}.mins"), Dtype::F16, &[pr, pc])?);
            if let Some(i) = mins.iter().position(|m| !m.is_finite()) {
                return Err(self.err(&format!("{name}.mins"), format!("non-finite minimum {} at index {i}", mins[i])));
            }
            if let Some(i) = scales.iter().position(|&s| s <= 0.0) {
                return Err(
                    self.err(&format!("{name}.scales"), format!("scale {} at index {i} is not positive", scales[i]))
                );
            }
            scales.iter().zip(&mins).map(|(&s, &m)| GroupParams::from_min(s, m).zero).collect()
        } else {
            let zb = bits::row_bytes(pc, m.bits);
            let mut zpad = self.tensor(&format!("{name}.qzeros"), Dtype::U8, &[pr, zb])?.to_vec();
            zpad.extend_from_slice(&[0; bits::PAD]);
            bits::unpack(&zpad, pr, pc, m.bits).into_iter().map(f32::from).collect()
        };
        let perm = if m.permuted {
            let t = self.tensor(&format!("{name}.perm"), Dtype::I32, &[m.cols])?;
            let perm: Vec<i32> =
                t.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
            let mut seen = vec![false; m.cols];
            for (p, &c) in perm.iter().enumerate() {
                if c < 0 || c as usize >= m.cols || std::mem::replace(&mut seen[c as usize], true) {
                    return Err(self.err(
                        &format!("{name}.perm"),
                        format!("not a permutation of 0..{}: entry {p} is {c}", m.cols),
                    ));
                }
            }
            Some(perm.into_iter().map(|c| c as u32).collect())
        } else {
            None
        };
        let mut packed = codes.to_vec();
        packed.extend_from_slice(&[0; bits::PAD]);
        for part in ["qcodes", "scales", "qzeros", "mins", "perm"] {
            self.release(&format!("{name}.{part}"));
        }
        if self.version == 1 && m.bits == 3 {
            // Version 1's 3-bit rows were one bit stream: lay them out as this version does.
            packed = bits::pack_codes(&bits::unpack(&packed, m.rows, m.cols, 3), m.rows, m.cols, 3);
        }
        Ok(PackedLinear { rows: m.rows, cols: m.cols, layout, codes: packed, scales, zeros, perm })
    }
}
