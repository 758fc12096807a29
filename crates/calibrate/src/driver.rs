//! The layer-by-layer driver, written once for every method.
//!
//! ```text
//! embed calibration samples -> X (one [seqlen, d] per sample)
//! for each decoder block (loaded alone from the checkpoint):
//!     for each step of [q,k,v] -> [o] -> [gate,up] -> [down]        (true-sequential)
//!         run the block on X, accumulate the Hessian of the step's input
//!         quantize each linear of the step (axis: fixed, forced or chosen), put W' in the block
//!     X <- quantized block(X)        (later blocks calibrate on the quantized model's outputs)
//!     stream the block's tensors into the output
//! ```
//! Only one block's weights and the calibration activations are held at a time.

use crate::error::{CalibError, Result};
use adadim_load::safetensors_out::F32Writer;
use adadim_load::Checkpoint;
use adadim_model::{Block, Flow, LinearKind, Rope};
use adadim_quantize::{choose_axis, gptq, output_error_from_hessian, rtn, Axis, Calibration, GptqOptions, Hessian, QuantSpec, QuantizedMatrix};
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Gptq,
}

/// Which channel dimension the groups run along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dim {
    Oc,
    Ic,
    /// AdaDim: per linear, the axis with the lower output error on calibration data (Eq. 3).
    Ada,
}

/// What `Dim::Ada` compares: RTN's error in both axes (the paper), or GPTQ's itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    Rtn,
    Gptq,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuantizeConfig {
    pub method: Method,
    pub dim: Dim,
    pub select: Select,
    /// Bits, group size and zero style; its axis is decided per linear.
    pub spec: QuantSpec,
    #[serde(skip)]
    pub gptq: GptqOptions,
    pub act_order: bool,
    pub static_groups: bool,
    /// Paper Table 1 heuristic: these modules per-IC, the rest per-OC (overrides `dim`).
    pub ic_modules: Vec<String>,
}

/// What happened to one linear.
#[derive(Debug, Clone, Serialize)]
pub struct LinearReport {
    pub layer: usize,
    pub module: &'static str,
    pub rows: usize,
    pub cols: usize,
    pub axis: &'static str,
    /// RTN output errors `mean((Q(W)X - WX)^2)` per axis (when calibration data was used).
    pub oc_error: Option<f64>,
    pub ic_error: Option<f64>,
    /// Output error of the weights kept.
    pub final_error: Option<f64>,
    pub gptq_loss: Option<f64>,
    pub percdamp: Option<f64>,
    pub dead_inputs: usize,
    pub seconds: f64,
}

const STEPS: [&[LinearKind]; 4] =
    [&[LinearKind::Q, LinearKind::K, LinearKind::V], &[LinearKind::O], &[LinearKind::Gate, LinearKind::Up], &[LinearKind::Down]];

fn axis_name(a: Axis) -> &'static str {
    match a {
        Axis::Oc => "oc",
        Axis::Ic => "ic",
    }
}

impl QuantizeConfig {
    fn needs_calibration(&self) -> bool {
        self.method == Method::Gptq || (self.dim == Dim::Ada && self.ic_modules.is_empty())
    }

    /// Quantize one linear `w` [rows, cols] given its input Hessian (`kind` names it in the
    /// report and matters for `ic_modules`).
    pub fn quantize_linear(&self, layer: usize, kind: LinearKind, w: &[f32], rows: usize, cols: usize, h: Option<&Hessian>) -> Result<(QuantizedMatrix, LinearReport)> {
        let t = Instant::now();
        let qerr = |source| CalibError::Quantize { layer, module: kind.module().to_string(), source };
        let opts = GptqOptions { act_order: self.act_order, static_groups: self.static_groups, ..self.gptq.clone() };
        // Both RTN errors whenever calibration data is at hand: the report shows them.
        let choice = match h {
            Some(h) if h.tokens() > 0 => Some(choose_axis(w, rows, cols, &self.spec, Calibration::Hessian(h)).map_err(qerr)?),
            _ => None,
        };
        let forced = if self.ic_modules.is_empty() {
            None
        } else {
            Some(if self.ic_modules.iter().any(|m| m == kind.short()) { Axis::Ic } else { Axis::Oc })
        };
        let run_gptq = |axis: Axis| gptq(w, rows, cols, h.expect("gptq has calibration"), &self.spec.with_axis(axis), &opts).map_err(qerr);
        let (q, loss, damp, dead) = match (self.method, forced.or(match self.dim {
            Dim::Oc => Some(Axis::Oc),
            Dim::Ic => Some(Axis::Ic),
            Dim::Ada => None,
        })) {
            (Method::Rtn, Some(axis)) => (rtn(w, rows, cols, &self.spec.with_axis(axis)).map_err(qerr)?, None, None, 0),
            (Method::Rtn, None) => (choice.clone().expect("ada has calibration").quantized, None, None, 0),
            (Method::Gptq, Some(axis)) => {
                let o = run_gptq(axis)?;
                (o.quantized, Some(o.loss), Some(o.percdamp), o.dead.len())
            }
            (Method::Gptq, None) if self.select == Select::Rtn => {
                let o = run_gptq(choice.as_ref().expect("ada has calibration").axis)?;
                (o.quantized, Some(o.loss), Some(o.percdamp), o.dead.len())
            }
            (Method::Gptq, None) => {
                // Choose by the GPTQ result itself: run both, keep the lower output error.
                let h = h.expect("gptq has calibration");
                let (a, b) = (run_gptq(Axis::Oc)?, run_gptq(Axis::Ic)?);
                let ea = output_error_from_hessian(w, &a.quantized.dequantize(), rows, cols, h).map_err(qerr)?;
                let eb = output_error_from_hessian(w, &b.quantized.dequantize(), rows, cols, h).map_err(qerr)?;
                let o = if eb < ea { b } else { a };
                (o.quantized, Some(o.loss), Some(o.percdamp), o.dead.len())
            }
        };
        let final_error = match h {
            Some(h) if h.tokens() > 0 => Some(output_error_from_hessian(w, &q.dequantize(), rows, cols, h).map_err(qerr)?),
            _ => None,
        };
        let report = LinearReport {
            layer,
            module: kind.module(),
            rows,
            cols,
            axis: axis_name(q.spec().axis),
            oc_error: choice.as_ref().map(|c| c.oc_error),
            ic_error: choice.as_ref().map(|c| c.ic_error),
            final_error,
            gptq_loss: loss,
            percdamp: damp,
            dead_inputs: dead,
            seconds: t.elapsed().as_secs_f64(),
        };
        Ok((q, report))
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| adadim_model::ModelError::Tensor { context: "tensor to host".into(), source: e })?)
}

fn tensor(v: Vec<f32>, shape: (usize, usize)) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu).map_err(|e| adadim_model::ModelError::Tensor { context: "tensor from host".into(), source: e })?)
}

/// Quantize every block of `ckpt` into a safetensors file at `out_file` (dequantized f32
/// weights; embeddings, norms and head copied). `progress(layer_done, layers)`.
pub fn quantize_model(
    ckpt: &Checkpoint,
    samples: &[Vec<u32>],
    cfg: &QuantizeConfig,
    out_file: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<LinearReport>> {
    cfg.spec.validate().map_err(|source| CalibError::Quantize { layer: 0, module: "(settings)".into(), source })?;
    for m in &cfg.ic_modules {
        if !LinearKind::ALL.iter().any(|k| k.short() == m) {
            return Err(CalibError::Invalid(format!("--ic-modules: unknown module '{m}' (q, k, v, o, gate, up, down)")));
        }
    }
    let c = &ckpt.config;
    let seqlen = samples.iter().map(|s| s.len()).max().unwrap_or(1);
    let rope = Rope::new(c, seqlen).map_err(|e| adadim_model::ModelError::Tensor { context: "rope".into(), source: e })?;
    // The plan (HF names in the order the output is written), and the non-block tensors first.
    let mut plan = c.expected_tensors();
    plan.sort_by_key(|(n, _)| (n.strip_prefix("model.layers.").and_then(|r| r.split('.').next()).and_then(|l| l.parse::<usize>().ok()).map_or(0, |l| l + 1), n.clone()));
    let mut writer = F32Writer::create(out_file, &plan, &[("format".into(), "pt".into())])?;
    let mut cursor = 0;
    while cursor < plan.len() && !plan[cursor].0.starts_with("model.layers.") {
        writer.write_tensor(&plan[cursor].0, &ckpt.tensor_f32(&plan[cursor].0)?)?;
        cursor += 1;
    }
    let calibrate = cfg.needs_calibration();
    let embed = if calibrate { Some(ckpt.tensor("model.embed_tokens.weight")?) } else { None };
    let mut xs: Vec<Tensor> = Vec::new();
    if let Some(e) = &embed {
        for s in samples {
            let ids = Tensor::new(s.as_slice(), &Device::Cpu).map_err(|e| adadim_model::ModelError::Tensor { context: "ids".into(), source: e })?;
            xs.push(e.index_select(&ids, 0).map_err(|e| adadim_model::ModelError::Tensor { context: "embedding".into(), source: e })?);
        }
    }
    drop(embed);
    let mut reports = Vec::new();
    for layer in 0..c.num_hidden_layers {
        let mut block = Block::load(ckpt, layer)?;
        for step in STEPS {
            let h = if calibrate {
                let in_dim = block.linear(step[0]).weight.dims()[1];
                let mut h = Hessian::new(in_dim);
                for x in &xs {
                    block.forward_tapped(x, &rope, &mut |kind, input| {
                        if kind != step[0] {
                            return Ok(Flow::Continue);
                        }
                        {
                            let v = to_vec(input).map_err(|e| adadim_model::ModelError::Tensor { context: e.to_string(), source: candle_core::Error::Msg("tap".into()) })?;
                            h.add_batch(&v).map_err(|e| adadim_model::ModelError::Tensor { context: format!("layer {layer} {} inputs", kind.module()), source: candle_core::Error::Msg(e.to_string()) })?;
                        }
                        Ok(Flow::Stop)
                    })?;
                }
                Some(h)
            } else {
                None
            };
            for &kind in step {
                let w = &block.linear(kind).weight;
                let (rows, cols) = (w.dims()[0], w.dims()[1]);
                let (q, report) = cfg.quantize_linear(layer, kind, &to_vec(w)?, rows, cols, h.as_ref())?;
                block.linear_mut(kind).weight = tensor(q.dequantize(), (rows, cols))?;
                reports.push(report);
            }
        }
        if calibrate && layer + 1 < c.num_hidden_layers {
            for x in xs.iter_mut() {
                *x = block.forward(x, &rope)?;
            }
        }
        while cursor < plan.len() && plan[cursor].0.starts_with(&format!("model.layers.{layer}.")) {
            let name = &plan[cursor].0;
            writer.write_tensor(name, &to_vec(block_tensor(&block, name)?)?)?;
            cursor += 1;
        }
        progress(layer + 1, c.num_hidden_layers);
    }
    writer.finish()?;
    Ok(reports)
}

/// The block's tensor for a checkpoint name (`model.layers.3.mlp.up_proj.weight`).
fn block_tensor<'a>(b: &'a Block, name: &str) -> Result<&'a Tensor> {
    if name.ends_with("input_layernorm.weight") {
        return Ok(&b.attn_norm);
    }
    if name.ends_with("post_attention_layernorm.weight") {
        return Ok(&b.mlp_norm);
    }
    for kind in LinearKind::ALL {
        let lin = b.linear(kind);
        if name.ends_with(&format!("{}.weight", kind.module())) {
            return Ok(&lin.weight);
        }
        if name.ends_with(&format!("{}.bias", kind.module())) {
            if let Some(bias) = &lin.bias {
                return Ok(bias);
            }
        }
    }
    Err(CalibError::Invalid(format!("no block tensor for {name}")))
}
