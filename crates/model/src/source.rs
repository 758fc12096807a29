//! Where a model's weights come from: a Hugging Face checkpoint (dense f32 / f16 / bf16) or an
//! adadim packed checkpoint (quantized linears kept packed, multiplied by the packed kernels).
//! [`open`] tells them apart by the `adadim.format` metadata of `model.safetensors`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use adadim_load::{Checkpoint, LlamaConfig};
use adadim_pack::{PackedFile, PackedLinear};
use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::linear::Weight;

/// Tensors of a model, by their checkpoint names.
pub trait WeightSource {
    fn config(&self) -> &LlamaConfig;
    /// A dense tensor (embeddings, norms, biases, head), as f32.
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// The weight of linear `name` (`model.layers.0.self_attn.q_proj`), dense or packed.
    fn linear(&self, name: &str) -> Result<Weight>;
}

impl WeightSource for Checkpoint {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn tensor(&self, name: &str) -> Result<Tensor> {
        Ok(Checkpoint::tensor(self, name)?)
    }
    fn linear(&self, name: &str) -> Result<Weight> {
        Ok(Weight::Dense(Checkpoint::tensor(self, &format!("{name}.weight"))?))
    }
}

/// An adadim packed checkpoint directory: `config.json` + a packed `model.safetensors`.
pub struct PackedModel {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    file: PackedFile,
}

impl PackedModel {
    pub fn open(dir: &Path) -> Result<Self> {
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let file = PackedFile::open(&dir.join("model.safetensors"))?;
        let m = PackedModel { dir: dir.to_path_buf(), config, file };
        m.check_all_used()?;
        Ok(m)
    }

    /// Every linear the file declares is one `config.json` describes: a config edited to fewer
    /// layers would otherwise run a silently truncated model.
    fn check_all_used(&self) -> Result<()> {
        let expected: std::collections::HashSet<String> =
            self.config.expected_tensors().into_iter().map(|(n, _)| n).collect();
        let extra: Vec<&str> =
            self.file.linear_names().filter(|n| !expected.contains(&format!("{n}.weight"))).collect();
        if let Some(first) = extra.first() {
            let why = if first.starts_with("model.layers.") {
                format!(
                    "a layer beyond the {} that config.json's num_hidden_layers declares",
                    self.config.num_hidden_layers
                )
            } else {
                "no part of the model config.json describes".into()
            };
            return Err(ModelError::Load(adadim_load::LoadError::Tensor {
                path: self.dir.join("model.safetensors"),
                tensor: adadim_load::printable(first).into_owned(),
                msg: format!(
                    "not used: {why} ({} such linears); the config does not match the checkpoint",
                    extra.len()
                ),
            }));
        }
        Ok(())
    }

    pub fn file(&self) -> &PackedFile {
        &self.file
    }

    fn shape_err(&self, name: &str, want: &[usize], got: &[usize]) -> ModelError {
        ModelError::Load(adadim_load::LoadError::ShapeMismatch {
            path: self.dir.join("model.safetensors"),
            tensor: name.to_string(),
            expected: want.to_vec(),
            found: got.to_vec(),
        })
    }

    /// The shape `config.json` implies for `name`.
    fn expected(&self, name: &str) -> Option<Vec<usize>> {
        self.config.expected_tensors().into_iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }
}

impl WeightSource for PackedModel {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let (shape, values) = self.file.dense(name)?;
        if let Some(want) = self.expected(name) {
            if want != shape {
                return Err(self.shape_err(name, &want, &shape));
            }
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            let count = values.iter().filter(|v| !v.is_finite()).count();
            return Err(adadim_load::LoadError::NonFinite {
                path: self.dir.join("model.safetensors"),
                tensor: name.into(),
                count,
                first: i,
            }
            .into());
        }
        Tensor::from_vec(values, shape, &Device::Cpu)
            .map_err(|e| ModelError::Tensor { context: name.into(), source: e })
    }
    fn linear(&self, name: &str) -> Result<Weight> {
        let p: PackedLinear = self.file.linear(name)?;
        let weight = format!("{name}.weight");
        if let Some(want) = self.expected(&weight) {
            if want != [p.rows(), p.cols()] {
                return Err(self.shape_err(&weight, &want, &[p.rows(), p.cols()]));
            }
        }
        Ok(Weight::Packed(Arc::new(p)))
    }
}

/// Whether `dir/model.safetensors` is an adadim packed checkpoint (reads only its header).
pub fn is_packed(dir: &Path) -> bool {
    let Ok(mut f) = std::fs::File::open(dir.join("model.safetensors")) else { return false };
    use std::io::Read;
    let mut n = [0u8; 8];
    if f.read_exact(&mut n).is_err() {
        return false;
    }
    let n = u64::from_le_bytes(n).min(100 << 20) as usize;
    let mut header = vec![0u8; n];
    if f.read_exact(&mut header).is_err() {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&header)
        .ok()
        .and_then(|h| h["__metadata__"]["adadim.format"].as_str().map(|s| s == "packed"))
        .unwrap_or(false)
}

/// Open a model directory, packed or dense.
pub fn open(dir: &Path) -> Result<Box<dyn WeightSource>> {
    if is_packed(dir) {
        Ok(Box::new(PackedModel::open(dir)?))
    } else {
        Ok(Box::new(Checkpoint::open(dir)?))
    }
}
