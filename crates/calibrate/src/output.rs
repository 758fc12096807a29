//! Where the driver writes the quantized model: the packed checkpoint (the default: codes,
//! f16 scales and zeros, read back directly by evaluation) or dequantized f32 weights (for
//! tools that only read float checkpoints), or GPTQ v1.

use std::path::Path;

use adadim_load::safetensors_out::{DenseDtype, DenseWriter, StreamWriter};
use adadim_pack::{PackedLinear, PackedWriter};
use adadim_quantize::QuantizedMatrix;
use serde::Serialize;

use crate::error::{CalibError, Result};

/// The output's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// [`adadim_pack::checkpoint`]: quantized linears packed, the rest f32.
    Packed,
    /// Every linear dequantized to f32 (`W' = scale (code - zero)`), a plain HF checkpoint.
    F32,
    /// As `F32`, every tensor stored as f16 (half the size; f16 scales make `W'` exact in f16
    /// up to one rounding of the product).
    F16,
    /// GPTQ v1 (`qweight`, `qzeros`, `scales`, `g_idx`; [`adadim_pack::export_gptq`]), for tools that
    /// load GPTQ checkpoints. Per-OC linears only.
    Gptq,
}

/// What [`crate::quantize_model`] writes.
pub struct Output<'a> {
    pub path: &'a Path,
    pub format: Format,
    /// Stored in the packed file's `adadim.quantization` metadata.
    pub metadata: serde_json::Value,
}

/// A model being written, tensor by tensor, in checkpoint order.
pub(crate) enum Writer {
    Dense(DenseWriter),
    Packed(PackedWriter, serde_json::Value),
    Gptq(StreamWriter),
}

fn pack_err(e: adadim_pack::PackError) -> CalibError {
    CalibError::Invalid(e.to_string())
}

impl Writer {
    /// `plan`: every tensor of the source model (name, shape), in the order they will come.
    pub(crate) fn create(out: &Output<'_>, plan: &[(String, Vec<usize>)]) -> Result<Self> {
        Ok(match out.format {
            Format::F32 => {
                Writer::Dense(DenseWriter::create(out.path, plan, &[("format".into(), "pt".into())], DenseDtype::F32)?)
            }
            Format::F16 => {
                Writer::Dense(DenseWriter::create(out.path, plan, &[("format".into(), "pt".into())], DenseDtype::F16)?)
            }
            Format::Packed => {
                Writer::Packed(PackedWriter::create(out.path, 4 * plan.len()).map_err(pack_err)?, out.metadata.clone())
            }
            Format::Gptq => Writer::Gptq(StreamWriter::create(out.path, 65536 + 4 * 160 * plan.len())?),
        })
    }

    /// A tensor that is not quantized, read from the source in `source` type: the packed and
    /// GPTQ files store it in that type (lossless), a dense export in the export's type.
    pub(crate) fn dense(&mut self, name: &str, shape: &[usize], values: &[f32], source: DenseDtype) -> Result<()> {
        match self {
            Writer::Dense(w) => Ok(w.write_tensor(name, values)?),
            Writer::Packed(w, _) => w.dense(name, shape, values, source).map_err(pack_err),
            Writer::Gptq(w) => {
                let bytes = source.encode(values).map_err(|(i, v)| {
                    CalibError::Invalid(format!("{name}: value {v} at index {i} is beyond {}'s range", source.name()))
                })?;
                Ok(w.write(name, source.name(), shape, &bytes)?)
            }
        }
    }

    /// Linear `name` (without `.weight`).
    pub(crate) fn linear(&mut self, name: &str, q: &QuantizedMatrix) -> Result<()> {
        match self {
            Writer::Dense(w) => Ok(w.write_tensor(&format!("{name}.weight"), &q.dequantize())?),
            Writer::Packed(w, _) => w.linear(name, &PackedLinear::from_quantized(q)).map_err(pack_err),
            Writer::Gptq(w) => adadim_pack::export_gptq::write_gptq_linear(w, name, q).map_err(pack_err),
        }
    }

    pub(crate) fn finish(self) -> Result<()> {
        match self {
            Writer::Dense(w) => Ok(w.finish()?),
            Writer::Packed(w, meta) => w.finish(&meta).map_err(pack_err),
            Writer::Gptq(w) => Ok(w.finish(&[("format".into(), "pt".into())])?),
        }
    }
}
