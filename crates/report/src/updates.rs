//! Figure (c), after the paper's Fig. 7: how much GPTQ moves each input channel's weights of
//! one linear, quantized per-OC and per-IC.
//!
//! A run keeps one axis per linear and no Hessians, so this re-runs GPTQ on that one linear:
//! the calibration samples (rebuilt by the caller from the run's recorded settings) go through
//! the run's own quantized blocks `0..layer`, and through block `layer` up to the linear, so the
//! linear sees the inputs the true-sequential driver gave it; GPTQ then quantizes the original
//! weight (from the source model) along both axes. Packed weights are dequantized to dense f32
//! first, which is what the driver ran the blocks with; re-running along the run's own axis
//! therefore reproduces the run's weights, a check the page reports.
//!
//! The magnitude shown is GPTQ's own update (`GptqOutput::update`): per input channel, the
//! mean over output channels of how far error compensation moved each weight before its
//! rounding, `|w_compensated - w|`.

use std::path::Path;

use adadim_load::Checkpoint;
use adadim_model::{Block, DecodeSettings, Flow, LinearKind, Rope, Weight, WeightSource};
use adadim_quantize::{gptq, output_error_from_hessian, Axis, GptqOptions, Hessian};
use candle_core::{Device, Tensor};

use crate::error::{ReportError, Result};
use crate::plot::{Figure, Panel, Series, Style, IC_COLOR, OC_COLOR, PALETTE};
use crate::run::Run;

/// GPTQ's weight change along one axis.
#[derive(Debug, Clone)]
pub struct AxisUpdate {
    /// Mean over output channels of GPTQ's update `|w_compensated - w|`, per input channel.
    pub per_input: Vec<f64>,
    /// Output error `mean((ΔW x)^2)` of `W'` on the calibration inputs.
    pub error: f64,
}

#[derive(Debug, Clone)]
pub struct LayerUpdates {
    pub layer: usize,
    pub module: &'static str,
    pub rows: usize,
    pub cols: usize,
    /// Calibration tokens in the Hessian.
    pub tokens: usize,
    pub oc: AxisUpdate,
    pub ic: AxisUpdate,
    /// Each input channel's RMS over the calibration tokens, `sqrt(H[i,i] / 2)`.
    pub input_rms: Vec<f32>,
    /// The axis the run kept for this linear.
    pub run_axis: Axis,
    /// For a GPTQ run, `max |W'_rerun - W'_run|` along the run's axis (0: reproduced exactly).
    pub reproduced_max_diff: Option<f64>,
    /// The run's `--qep` alpha: it quantized corrected weights, which the re-run leaves out.
    pub qep: Option<f64>,
}

impl AxisUpdate {
    /// The share of the total update that the top `fraction` of input channels hold.
    pub fn top_share(&self, fraction: f64) -> f64 {
        let mut v = self.per_input.clone();
        v.sort_by(|a, b| b.total_cmp(a));
        let n = ((v.len() as f64 * fraction).ceil() as usize).clamp(1, v.len().max(1));
        let total: f64 = v.iter().sum();
        if total > 0.0 {
            v[..n].iter().sum::<f64>() / total
        } else {
            0.0
        }
    }
}

impl LayerUpdates {
    /// The input channels whose RMS is among the top `fraction` (at least one).
    pub fn outlier_channels(&self, fraction: f64) -> Vec<usize> {
        let n = ((self.cols as f64 * fraction).ceil() as usize).clamp(1, self.cols.max(1));
        crate::inputs::top_channels(&self.input_rms, n).into_iter().map(|(c, _)| c).collect()
    }

    /// Mean change at `channels` over the mean change at the other input channels, along one
    /// axis: above 1, the update concentrates on those channels (the paper's claim for per-IC
    /// at the activation outliers).
    pub fn concentration(a: &AxisUpdate, channels: &[usize]) -> f64 {
        let mean = |v: &mut dyn Iterator<Item = f64>| {
            let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
            s / n.max(1) as f64
        };
        let at = mean(&mut channels.iter().map(|&c| a.per_input[c]));
        let rest = mean(&mut a.per_input.iter().enumerate().filter(|(i, _)| !channels.contains(i)).map(|(_, v)| *v));
        at / rest
    }
}

fn tensor_err(context: String) -> impl Fn(candle_core::Error) -> ReportError {
    move |source| adadim_model::ModelError::Tensor { context: context.clone(), source }.into()
}

/// Block `layer` of `src` with every linear dense f32 (packed ones dequantized).
fn dense_block(src: &dyn WeightSource, layer: usize) -> Result<Block> {
    let mut block = Block::load(src, layer)?;
    for kind in LinearKind::ALL {
        if let Weight::Packed(p) = &block.linear(kind).weight {
            let w = Tensor::from_vec(p.dequantize(), (p.rows(), p.cols()), &Device::Cpu)
                .map_err(tensor_err(format!("layer {layer} {}", kind.module())))?;
            block.linear_mut(kind).weight = Weight::Dense(w);
        }
    }
    Ok(block)
}

/// The weights of `w` [rows, cols] as a host vector.
fn host(w: &Weight, what: &str) -> Result<Vec<f32>> {
    match w {
        Weight::Packed(p) => Ok(p.dequantize()),
        Weight::Dense(t) => t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(tensor_err(what.to_string())),
    }
}

/// Re-run GPTQ on linear `kind` of block `layer` of `run` along both axes, calibrated on
/// `samples` (the run's own: same text, count, length and seed). `progress(blocks, total)`.
pub fn compute(
    run: &Run,
    samples: &[Vec<u32>],
    layer: usize,
    kind: LinearKind,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LayerUpdates> {
    let module = kind.module();
    let report = run.linear(layer, module).ok_or_else(|| {
        ReportError::Invalid(format!(
            "{}: no linear {module} in block {layer} (the run has {} blocks)",
            run.dir.display(),
            run.layers()
        ))
    })?;
    if run.summary.format == adadim_calibrate::Format::Gptq {
        return Err(ReportError::Invalid(format!(
            "{}: a GPTQ v1 export, which this re-run cannot read; use a packed or f32 run",
            run.dir.display()
        )));
    }
    if samples.is_empty() {
        return Err(ReportError::Invalid("no calibration samples".into()));
    }
    let quantized = adadim_model::open(&run.dir)?;
    let source = Checkpoint::open(Path::new(&run.summary.model))?;
    let seqlen = samples.iter().map(|s| s.len()).max().unwrap_or(1);
    let rope = Rope::new(quantized.config(), seqlen).map_err(tensor_err("rope".into()))?;
    let mut xs = adadim_calibrate::embed_samples(&quantized.tensor("model.embed_tokens.weight")?, samples)?;
    for l in 0..layer {
        let block = dense_block(quantized.as_ref(), l)?;
        xs = xs
            .iter()
            .map(|x| block.forward(x, &rope, &DecodeSettings::DEFAULT))
            .collect::<adadim_model::Result<Vec<Tensor>>>()?;
        progress(l + 1, layer + 1);
    }
    // Block `layer` up to the linear: q/k/v share one input (tapped as Q), gate/up too (Gate).
    let tapped = match kind {
        LinearKind::Q | LinearKind::K | LinearKind::V => LinearKind::Q,
        LinearKind::Gate | LinearKind::Up => LinearKind::Gate,
        k => k,
    };
    let block = dense_block(quantized.as_ref(), layer)?;
    let (rows, cols) = (report.rows, report.cols);
    let qerr = |source| {
        ReportError::from(adadim_calibrate::CalibError::Quantize { layer, module: module.to_string(), source })
    };
    let mut h = Hessian::new(cols);
    for x in &xs {
        let mut input = None;
        block.forward_tapped(x, &rope, &DecodeSettings::DEFAULT, &mut |k, t| {
            if k != tapped {
                return Ok(Flow::Continue);
            }
            input = Some(t.clone());
            Ok(Flow::Stop)
        })?;
        let input = input.expect("the tap sees the input of every linear");
        let v = input
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(tensor_err(format!("layer {layer} {module} inputs")))?;
        h.add_batch(&v).map_err(qerr)?;
    }
    progress(layer + 1, layer + 1);

    let w = source.tensor_f32(&format!("model.layers.{layer}.{module}.weight"))?;
    if w.len() != rows * cols {
        return Err(ReportError::Invalid(format!(
            "{}: {module} of block {layer} has {} weights, the run reported [{rows}, {cols}]",
            run.summary.model,
            w.len()
        )));
    }
    let s = &run.summary.settings;
    let opts = GptqOptions {
        percdamp: report.percdamp.unwrap_or(GptqOptions::default().percdamp),
        act_order: s.act_order,
        static_groups: s.static_groups,
        group_aware: s.group_aware,
        search: s.search,
        ..GptqOptions::default()
    };
    let along = |axis: Axis| -> Result<(Vec<f32>, AxisUpdate)> {
        let out = gptq(&w, rows, cols, &h, &s.spec.with_axis(axis), &opts).map_err(qerr)?;
        let (wq, per_input) = (out.quantized.dequantize(), out.update);
        let error = output_error_from_hessian(&w, &wq, rows, cols, &h).map_err(qerr)?;
        Ok((wq, AxisUpdate { per_input, error }))
    };
    let (wq_oc, oc) = along(Axis::Oc)?;
    let (wq_ic, ic) = along(Axis::Ic)?;
    let reproduced_max_diff = if s.method == adadim_calibrate::Method::Gptq {
        let kept = host(&quantized.linear(&format!("model.layers.{layer}.{module}"))?, module)?;
        let rerun = if report.axis == Axis::Ic { &wq_ic } else { &wq_oc };
        Some(kept.iter().zip(rerun).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max))
    } else {
        None
    };
    let input_rms = adadim_calibrate::input_rms::from_hessian(&h);
    Ok(LayerUpdates {
        layer,
        module,
        rows,
        cols,
        tokens: h.tokens(),
        oc,
        ic,
        input_rms,
        run_axis: report.axis,
        reproduced_max_diff,
        qep: s.qep,
    })
}

/// Three panels: the per-OC and per-IC updates on one scale, and the linear's input RMS.
pub fn figure(u: &LayerUpdates) -> Figure {
    let top = u.oc.per_input.iter().chain(&u.ic.per_input).fold(0.0f64, |a, b| a.max(*b));
    let panel = |name: &str, a: &AxisUpdate, color| Panel {
        title: format!(
            "block {} {}: GPTQ {name}; top 1% of input channels hold {:.0}% of it",
            u.layer,
            u.module,
            100.0 * a.top_share(0.01)
        ),
        x_desc: "input channel".into(),
        y_desc: "GPTQ update, mean over output channels".into(),
        y_range: Some((0.0, top)),
        series: vec![Series {
            name: String::new(),
            color,
            style: Style::Line,
            points: a.per_input.iter().enumerate().map(|(i, v)| (i as f64, *v)).collect(),
        }],
        ..Panel::default()
    };
    let rms = Panel {
        title: format!("block {} {}: input RMS over {} calibration tokens", u.layer, u.module, u.tokens),
        x_desc: "input channel".into(),
        y_desc: "RMS".into(),
        series: vec![Series {
            name: String::new(),
            color: PALETTE[0],
            style: Style::Line,
            points: u.input_rms.iter().enumerate().map(|(i, v)| (i as f64, f64::from(*v))).collect(),
        }],
        ..Panel::default()
    };
    Figure {
        panels: vec![panel("per-OC", &u.oc, OC_COLOR), panel("per-IC", &u.ic, IC_COLOR), rms],
        columns: 1,
        panel_size: (900, 250),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_share_is_the_fraction_held_by_the_largest_channels() {
        let a = AxisUpdate { per_input: vec![1.0, 1.0, 6.0, 2.0], error: 0.0 };
        assert_eq!(a.top_share(0.01), 0.6, "one channel of four");
        assert_eq!(a.top_share(0.5), 0.8);
        assert_eq!(AxisUpdate { per_input: vec![0.0; 3], error: 0.0 }.top_share(0.1), 0.0);
    }

    #[test]
    fn concentration_compares_the_outlier_channels_with_the_rest() {
        let a = AxisUpdate { per_input: vec![1.0, 4.0, 1.0, 3.0], error: 0.0 };
        let u = LayerUpdates {
            layer: 0,
            module: "mlp.down_proj",
            rows: 1,
            cols: 4,
            tokens: 1,
            oc: a.clone(),
            ic: a.clone(),
            input_rms: vec![0.1, 9.0, 0.2, 0.3],
            run_axis: Axis::Ic,
            reproduced_max_diff: None,
            qep: None,
        };
        let ch = u.outlier_channels(0.01);
        assert_eq!(ch, vec![1], "the largest input RMS");
        assert_eq!(LayerUpdates::concentration(&a, &ch), 4.0 / (5.0 / 3.0));
    }
}
