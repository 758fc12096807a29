//! A streaming safetensors writer: the header is planned from names and shapes up front, then
//! tensors are written one at a time, so writing a model never holds more than one tensor.

use crate::error::{io_err, LoadError, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct F32Writer {
    path: PathBuf,
    out: BufWriter<File>,
    plan: Vec<(String, usize)>,
    next: usize,
}

impl F32Writer {
    /// Create `path` with a header for `tensors` (name, shape), written in this order.
    pub fn create(path: &Path, tensors: &[(String, Vec<usize>)], metadata: &[(String, String)]) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            let m: serde_json::Map<String, serde_json::Value> =
                metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
            header.insert("__metadata__".into(), m.into());
        }
        let mut offset = 0usize;
        let mut plan = Vec::with_capacity(tensors.len());
        for (name, shape) in tensors {
            let n: usize = shape.iter().product();
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * n]}),
            );
            offset += 4 * n;
            plan.push((name.clone(), n));
        }
        let mut bytes = serde_json::to_vec(&header).expect("a JSON map always serializes");
        while bytes.len() % 8 != 0 {
            bytes.push(b' ');
        }
        let file = File::create(path).map_err(io_err(path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(bytes.len() as u64).to_le_bytes()).map_err(io_err(path))?;
        out.write_all(&bytes).map_err(io_err(path))?;
        Ok(F32Writer { path: path.to_path_buf(), out, plan, next: 0 })
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
        let mut buf = Vec::with_capacity(values.len() * 4);
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        self.out.write_all(&buf).map_err(io_err(&self.path))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let plan = vec![("x".to_string(), vec![2, 3]), ("y".to_string(), vec![5])];
        let mut w = F32Writer::create(&p, &plan, &[("format".into(), "pt".into())]).unwrap();
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
    fn unfinished_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let w = F32Writer::create(&p, &[("x".to_string(), vec![2])], &[]).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("never written"));
    }
}
