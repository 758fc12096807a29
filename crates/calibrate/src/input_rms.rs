//! `input_rms.safetensors`, written by `quantize` beside `report.json`: for every linear that
//! saw calibration data, the RMS of each of its input channels over the calibration tokens
//! ([`LinearReport::input_rms`], `sqrt(H[i,i] / 2)`), one f32 tensor `[cols]` named
//! `model.layers.{layer}.{module}` (`model.layers.3.mlp.down_proj`). It shows where the
//! activation outliers are (paper Fig. 8) without keeping any activations.

use std::path::Path;

use adadim_load::safetensors_out::{DenseDtype, DenseWriter};

use crate::driver::LinearReport;
use crate::error::{CalibError, Result};

/// The file's name inside a quantized model directory.
pub const FILE: &str = "input_rms.safetensors";

/// One linear's input-channel RMS.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRms {
    pub layer: usize,
    /// `mlp.down_proj`, as in [`LinearReport::module`].
    pub module: String,
    pub rms: Vec<f32>,
}

/// Each input channel's RMS over the calibration tokens: `H = (2/n) sum x x^T`, so
/// `H[i,i] / 2` is the mean of `x_i^2` (paper Fig. 8 plots this magnitude).
pub fn from_hessian(h: &adadim_quantize::Hessian) -> Vec<f32> {
    let (d, m) = (h.dim(), h.matrix());
    (0..d).map(|i| (m[i * d + i] / 2.0).max(0.0).sqrt()).collect()
}

fn tensor_name(layer: usize, module: &str) -> String {
    format!("model.layers.{layer}.{module}")
}

/// Write the input RMS of `reports` (those that have one) to `path`; `false` when none has one
/// (a run without calibration), and then nothing is written.
pub fn write(path: &Path, reports: &[LinearReport]) -> Result<bool> {
    let with: Vec<&LinearReport> = reports.iter().filter(|r| !r.input_rms.is_empty()).collect();
    if with.is_empty() {
        return Ok(false);
    }
    let plan: Vec<(String, Vec<usize>)> =
        with.iter().map(|r| (tensor_name(r.layer, r.module), vec![r.input_rms.len()])).collect();
    let meta = [(
        "content".to_string(),
        "RMS over the calibration tokens of each input channel of each linear: sqrt(H[i,i] / 2)".to_string(),
    )];
    let mut w = DenseWriter::create(path, &plan, &meta, DenseDtype::F32)?;
    for (r, (name, _)) in with.iter().zip(&plan) {
        w.write_tensor(name, &r.input_rms)?;
    }
    w.finish()?;
    Ok(true)
}

/// Read a file written by [`write`], in layer order then module order as written.
pub fn read(path: &Path) -> Result<Vec<InputRms>> {
    let bytes = std::fs::read(path).map_err(|source| CalibError::Io { path: path.to_path_buf(), source })?;
    let bad = |msg: String| CalibError::Data { path: path.to_path_buf(), msg };
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {}", adadim_load::safetensors_fault::explain(&bytes, &e))))?;
    let mut out = Vec::new();
    for (name, t) in st.tensors() {
        let shown = adadim_load::printable(&name);
        let parsed = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, m)| Some((l.parse::<usize>().ok()?, m)));
        let Some((layer, module)) = parsed else {
            return Err(bad(format!("tensor '{shown}': expected model.layers.LAYER.MODULE")));
        };
        if t.dtype() != safetensors::Dtype::F32 || t.shape().len() != 1 {
            return Err(bad(format!(
                "tensor '{shown}': expected a 1-D F32 vector, got {:?} {:?}",
                t.dtype(),
                t.shape()
            )));
        }
        let rms: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if let Some(i) = rms.iter().position(|v| !v.is_finite() || *v < 0.0) {
            return Err(bad(format!("tensor '{shown}': value {} at channel {i} is not an RMS", rms[i])));
        }
        out.push(InputRms { layer, module: module.to_string(), rms });
    }
    out.sort_by(|a, b| (a.layer, &a.module).cmp(&(b.layer, &b.module)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(layer: usize, module: &'static str, rms: Vec<f32>) -> LinearReport {
        LinearReport {
            layer,
            module,
            rows: 2,
            cols: rms.len(),
            axis: adadim_quantize::Axis::Oc,
            oc_error: None,
            ic_error: None,
            final_error: None,
            gptq_loss: None,
            percdamp: None,
            dead_inputs: 0,
            seconds: 0.0,
            cholesky_s: None,
            sweep_s: None,
            gptq_runs: 0,
            input_rms: rms,
            awq_alpha: None,
            awq_scales: Vec::new(),
            block_oc_error: None,
            block_ic_error: None,
            unrefit_error: None,
            undescended_error: None,
            descended_codes: None,
            layout: None,
            candidates: Vec::new(),
        }
    }

    #[test]
    fn round_trips_and_skips_linears_without_calibration() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        let reports = [
            report(1, "mlp.down_proj", vec![0.5, 3.0, 0.0]),
            report(0, "self_attn.q_proj", vec![]),
            report(0, "self_attn.o_proj", vec![1.25]),
        ];
        assert!(write(&p, &reports).unwrap());
        let got = read(&p).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], InputRms { layer: 0, module: "self_attn.o_proj".into(), rms: vec![1.25] });
        assert_eq!(got[1], InputRms { layer: 1, module: "mlp.down_proj".into(), rms: vec![0.5, 3.0, 0.0] });
        let none = d.path().join("none.safetensors");
        assert!(!write(&none, &reports[1..2]).unwrap());
        assert!(!none.exists());
    }

    #[test]
    fn a_file_of_something_else_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(FILE);
        std::fs::write(&p, b"not safetensors").unwrap();
        assert!(read(&p).unwrap_err().to_string().contains(FILE));
        std::fs::remove_file(&p).unwrap();
        let mut w = DenseWriter::create(&p, &[("lm_head.weight".into(), vec![2])], &[], DenseDtype::F32).unwrap();
        w.write_tensor("lm_head.weight", &[1.0, 2.0]).unwrap();
        w.finish().unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("lm_head.weight") && e.contains("model.layers.LAYER.MODULE"), "{e}");
    }
}
