//! A streaming safetensors writer: the header is planned from names and shapes up front, then
//! tensors are written one at a time, so writing a model never holds more than one tensor.

use crate::error::{io_err, LoadError, Result};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Create `path` as a new file: an existing file or a link there is an error, never
/// truncated or followed (writers write to fresh names, then rename).
fn create_new(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            LoadError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(e.kind(), "already exists; not overwritten"),
            }
        } else {
            io_err(path)(e)
        }
    })
}

/// A safetensors header: `__metadata__` and `(name, dtype, shape, [start, end))` entries.
fn header_json(entries: &[(String, &str, Vec<usize>, usize, usize)], metadata: &[(String, String)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), m.into());
    }
    for (name, dtype, shape, start, end) in entries {
        header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}));
    }
    serde_json::to_vec(&header).expect("a JSON map always serializes")
}

/// Bytes per element of the safetensors dtypes we write.
fn dtype_size(dtype: &str) -> Option<usize> {
    match dtype {
        "U8" | "I8" => Some(1),
        "F16" | "BF16" => Some(2),
        "F32" | "I32" | "U32" => Some(4),
        _ => None,
    }
}

/// A safetensors writer for tensors whose shapes are only known as they come (a packed linear's
/// params depend on the axis chosen for it): data streams out behind a reserved header region,
/// and `finish` writes the header into it, padded with spaces (JSON whitespace, which the format
/// allows). Never holds more than the tensor being written.
pub struct StreamWriter {
    path: PathBuf,
    out: BufWriter<File>,
    reserved: usize,
    entries: Vec<(String, &'static str, Vec<usize>, usize, usize)>,
    offset: usize,
}

impl StreamWriter {
    /// Create `path`, reserving `reserved_header` bytes for the header.
    pub fn create(path: &Path, reserved_header: usize) -> Result<Self> {
        let reserved = reserved_header.next_multiple_of(8);
        let file = create_new(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(reserved as u64).to_le_bytes()).map_err(io_err(path))?;
        out.write_all(&vec![b' '; reserved]).map_err(io_err(path))?;
        Ok(StreamWriter { path: path.to_path_buf(), out, reserved, entries: Vec::new(), offset: 0 })
    }

    /// Append tensor `name` of `dtype` ("U8", "F16", "F32", "I32", ...) and `shape`, as raw
    /// little-endian `bytes`.
    pub fn write(&mut self, name: &str, dtype: &'static str, shape: &[usize], bytes: &[u8]) -> Result<()> {
        let err = |msg: String| LoadError::Tensor { path: self.path.clone(), tensor: name.into(), msg };
        let size = dtype_size(dtype).ok_or_else(|| err(format!("unsupported dtype {dtype}")))?;
        if shape.iter().product::<usize>() * size != bytes.len() {
            return Err(err(format!("{} bytes do not make a {dtype} tensor of shape {shape:?}", bytes.len())));
        }
        if self.entries.iter().any(|e| e.0 == name) {
            return Err(err("written twice".into()));
        }
        self.out.write_all(bytes).map_err(io_err(&self.path))?;
        self.entries.push((name.to_string(), dtype, shape.to_vec(), self.offset, self.offset + bytes.len()));
        self.offset += bytes.len();
        Ok(())
    }

    /// Write the header with `metadata`, flush and sync.
    pub fn finish(mut self, metadata: &[(String, String)]) -> Result<()> {
        let header = header_json(&self.entries, metadata);
        if header.len() > self.reserved {
            return Err(LoadError::Safetensors {
                path: self.path.clone(),
                msg: format!("header of {} bytes does not fit the {} reserved", header.len(), self.reserved),
            });
        }
        self.out.flush().map_err(io_err(&self.path))?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(8)).map_err(io_err(&self.path))?;
        file.write_all(&header).map_err(io_err(&self.path))?;
        file.sync_all().map_err(io_err(&self.path))?;
        Ok(())
    }
}

/// The float type a [`DenseWriter`] or a packed file's dense tensors store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseDtype {
    F32,
    /// IEEE half; a value beyond f16's range (|v| > 65504) is an error, never an infinity.
    F16,
    /// bfloat16 (f32's range; values are rounded to nearest even).
    BF16,
}

impl DenseDtype {
    /// The type a tensor read from a checkpoint in `dtype` is stored back in without loss:
    /// F16 and BF16 as they were, anything else as F32.
    pub fn of(dtype: safetensors::Dtype) -> Self {
        match dtype {
            safetensors::Dtype::F16 => DenseDtype::F16,
            safetensors::Dtype::BF16 => DenseDtype::BF16,
            _ => DenseDtype::F32,
        }
    }

    /// The safetensors dtype name.
    pub fn name(self) -> &'static str {
        match self {
            DenseDtype::F32 => "F32",
            DenseDtype::F16 => "F16",
            DenseDtype::BF16 => "BF16",
        }
    }

    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            DenseDtype::F32 => 4,
            DenseDtype::F16 | DenseDtype::BF16 => 2,
        }
    }

    /// `values` as little-endian bytes of this type (f32 without a copy). Err(index, value) for
    /// the first value beyond f16's range.
    pub fn encode(self, values: &[f32]) -> std::result::Result<std::borrow::Cow<'_, [u8]>, (usize, f32)> {
        Ok(match self {
            DenseDtype::F32 => f32_le_bytes(values),
            DenseDtype::F16 => {
                let mut buf = Vec::with_capacity(2 * values.len());
                for (i, &v) in values.iter().enumerate() {
                    let h = half::f16::from_f32(v);
                    if h.is_infinite() && v.is_finite() {
                        return Err((i, v));
                    }
                    buf.extend_from_slice(&h.to_le_bytes());
                }
                std::borrow::Cow::Owned(buf)
            }
            DenseDtype::BF16 => {
                std::borrow::Cow::Owned(values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect())
            }
        })
    }
}

/// A safetensors writer for float tensors whose names and shapes are known up front (a
/// dequantized model, an imported GGUF): header first, then tensors in plan order.
pub struct DenseWriter {
    path: PathBuf,
    out: BufWriter<File>,
    plan: Vec<(String, usize)>,
    next: usize,
    dtype: DenseDtype,
}

impl DenseWriter {
    /// Create `path` with a header for `tensors` (name, shape) of `dtype`, written in this order.
    pub fn create(
        path: &Path,
        tensors: &[(String, Vec<usize>)],
        metadata: &[(String, String)],
        dtype: DenseDtype,
    ) -> Result<Self> {
        let mut offset = 0usize;
        let mut plan = Vec::with_capacity(tensors.len());
        let mut entries = Vec::with_capacity(tensors.len());
        for (name, shape) in tensors {
            let n: usize = shape.iter().product();
            entries.push((name.clone(), dtype.name(), shape.clone(), offset, offset + dtype.size() * n));
            offset += dtype.size() * n;
            plan.push((name.clone(), n));
        }
        let mut bytes = header_json(&entries, metadata);
        while !bytes.len().is_multiple_of(8) {
            bytes.push(b' ');
        }
        let file = create_new(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(bytes.len() as u64).to_le_bytes()).map_err(io_err(path))?;
        out.write_all(&bytes).map_err(io_err(path))?;
        Ok(DenseWriter { path: path.to_path_buf(), out, plan, next: 0, dtype })
    }

    pub fn write_tensor(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let (want, n) = self.plan.get(self.next).cloned().unwrap_or_default();
        if want != name || n != values.len() {
            return Err(LoadError::Tensor {
                path: self.path.clone(),
                tensor: name.into(),
                msg: format!("written out of plan (expected '{want}' with {n} values, got {})", values.len()),
            });
        }
        let bytes = self.dtype.encode(values).map_err(|(i, v)| LoadError::Tensor {
            path: self.path.clone(),
            tensor: name.into(),
            msg: format!("value {v} at index {i} is beyond f16's range (|v| <= 65504); export as f32"),
        })?;
        self.out.write_all(&bytes).map_err(io_err(&self.path))?;
        self.next += 1;
        Ok(())
    }

    /// Flush and sync; fails if a planned tensor was not written.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            return Err(LoadError::Tensor {
                path: self.path.clone(),
                tensor: self.plan[self.next].0.clone(),
                msg: "never written".into(),
            });
        }
        self.out.flush().map_err(io_err(&self.path))?;
        self.out.get_ref().sync_all().map_err(io_err(&self.path))?;
        Ok(())
    }
}

/// `values` as little-endian bytes: the values' own memory on a little-endian machine (no
/// copy: a 7B embedding is 0.5 GB), a converted copy elsewhere.
pub fn f32_le_bytes(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let plan = vec![("x".to_string(), vec![2, 3]), ("y".to_string(), vec![5])];
        let mut w = DenseWriter::create(&p, &plan, &[("format".into(), "pt".into())], DenseDtype::F32).unwrap();
        w.write_tensor("x", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert!(w.write_tensor("x", &[0.0; 5]).is_err(), "out-of-plan write must fail");
        w.write_tensor("y", &[-1.0, 0.5, 0.25, 7.0, 1e-3]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let y = st.tensor("y").unwrap();
        assert_eq!(y.shape(), &[5]);
        let vals = crate::checkpoint::bytes_to_f32(y.data(), y.dtype()).unwrap();
        assert_eq!(vals, vec![-1.0, 0.5, 0.25, 7.0, 1e-3]);
    }

    #[test]
    fn stream_writer_reserves_the_header_and_fills_it_last() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        let mut w = StreamWriter::create(&p, 1000).unwrap();
        w.write("codes", "U8", &[2, 3], &[1, 2, 3, 4, 5, 6]).unwrap();
        assert!(w.write("codes", "U8", &[1], &[0]).is_err(), "a name twice");
        assert!(w.write("bad", "F16", &[3], &[0; 4]).is_err(), "bytes that do not fit the shape");
        w.write("scales", "F16", &[2], &[0, 60, 0, 188]).unwrap();
        w.finish(&[("k".into(), "v".into())]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("codes").unwrap().data(), &[1, 2, 3, 4, 5, 6]);
        assert_eq!(st.tensor("scales").unwrap().dtype(), safetensors::Dtype::F16);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["k"], "v");
        // A header larger than reserved is an error, not a corrupt file.
        std::fs::remove_file(&p).unwrap();
        let mut w = StreamWriter::create(&p, 8).unwrap();
        w.write("x", "U8", &[1], &[0]).unwrap();
        assert!(w.finish(&[]).unwrap_err().to_string().contains("does not fit"));
    }

    #[test]
    fn f16_tensors_round_trip_and_out_of_range_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.safetensors");
        let mut w =
            DenseWriter::create(&p, &[("x".to_string(), vec![3]), ("y".to_string(), vec![1])], &[], DenseDtype::F16)
                .unwrap();
        w.write_tensor("x", &[1.0, -0.5, 65504.0]).unwrap();
        let e = w.write_tensor("y", &[70000.0]).unwrap_err().to_string();
        assert!(e.contains("'y'") || e.contains("y") && e.contains("f16"), "{e}");
        drop(w);
        assert!(
            DenseWriter::create(&p, &[("x".to_string(), vec![3])], &[], DenseDtype::F16)
                .err()
                .unwrap()
                .to_string()
                .contains("already exists"),
            "never overwritten"
        );
        std::fs::remove_file(&p).unwrap();
        let mut w = DenseWriter::create(&p, &[("x".to_string(), vec![3])], &[], DenseDtype::F16).unwrap();
        w.write_tensor("x", &[1.0, -0.5, 3.0e-3]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let x = st.tensor("x").unwrap();
        assert_eq!(x.dtype(), safetensors::Dtype::F16);
        let v = crate::checkpoint::bytes_to_f32(x.data(), x.dtype()).unwrap();
        assert_eq!(v, vec![1.0, -0.5, half::f16::from_f32(3.0e-3).to_f32()]);
    }

    #[test]
    fn unfinished_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let w = DenseWriter::create(&p, &[("x".to_string(), vec![2])], &[], DenseDtype::F32).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("never written"));
    }
}
