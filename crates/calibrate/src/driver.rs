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
//!         (resumable: save the block and X in a work directory instead, [`crate::resume`];
//!          the output is written from the saved blocks once all are done)
//! ```
//! Only one block's weights and the calibration activations are held at a time.

use crate::awq_fold::{awq_scales, folded_norm, o_input_sources, scales_of, tensor_1d, Fold};
use crate::damage::{AllocationSummary, Budget, Candidate};
use crate::error::{CalibError, Result};
use crate::output::{Output, Writer};
use crate::resume::WorkDir;
use adadim_load::safetensors_out::DenseDtype;
use adadim_load::Checkpoint;
use adadim_model::{Block, DecodeSettings, LinearKind, Rope, Weight};
use adadim_quantize::{
    awq, choose_axis_fitted, descend_codes, gptq, output_error_from_hessian, refit_scales, rtn_candidates, rtn_fitted,
    Axis, Calibration, Candidates, Correction, Drift, Fitter, GptqOptions, GptqOutput, Hessian, HessianSum, QuantSpec,
    QuantizedMatrix, ScaleSearch,
};
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Rtn,
    Gptq,
}

/// Which channel dimension the groups run along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dim {
    Oc,
    Ic,
    /// AdaDim: per linear, the axis with the lower output error on calibration data (Eq. 3).
    Ada,
}

impl Method {
    /// `rtn` / `gptq`, as the report writes it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Rtn => "rtn",
            Method::Gptq => "gptq",
        }
    }
}

impl Dim {
    /// `oc` / `ic` / `ada`, as the report writes it.
    pub fn name(self) -> &'static str {
        match self {
            Dim::Oc => "oc",
            Dim::Ic => "ic",
            Dim::Ada => "ada",
        }
    }
}

impl Select {
    /// `rtn` / `gptq`, as the report writes it.
    pub fn name(self) -> &'static str {
        match self {
            Select::Rtn => "rtn",
            Select::Gptq => "gptq",
        }
    }
}

/// Where AdaDim measures a candidate's error (`--ada-error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdaError {
    /// The linear's own output, `W' X` against `W X` (the paper's Eq. 3).
    #[default]
    Linear,
    /// The sublayer's output: q/k/v on `o(attention)`, gate/up on `down(silu(gate) * up)`,
    /// with the other linears of the sublayer in float (o and down are their own sublayer
    /// output, so their choice is the same either way).
    Block,
}

impl AdaError {
    /// Whether this is the per-linear error (serialized settings leave it out).
    pub fn is_linear(&self) -> bool {
        *self == AdaError::Linear
    }
}

/// Calibration samples the block-level error is measured on (the first ones): each candidate
/// costs a forward of its sublayer on them.
pub const BLOCK_ERROR_SAMPLES: usize = 16;

/// What `Dim::Ada` compares: RTN's error in both axes (the paper), or GPTQ's itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    Rtn,
    Gptq,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct QuantizeConfig {
    pub method: Method,
    pub dim: Dim,
    pub select: Select,
    /// Bits, group size and zero style; its axis is decided per linear.
    pub spec: QuantSpec,
    /// How groups are fitted, by every method and by the dimension choice.
    #[serde(default, skip_serializing_if = "ScaleSearch::is_minmax")]
    pub search: ScaleSearch,
    /// GPTQ's options: its damping is recorded (as `percdamp`; 0.01 for a record without it,
    /// the default then), the rest mirrors the fields below.
    #[serde(rename = "percdamp", with = "percdamp_only", default)]
    pub gptq: GptqOptions,
    pub act_order: bool,
    pub static_groups: bool,
    /// Per-OC act-order by whole groups, each fitted when reached ([`GptqOptions::group_aware`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_aware: bool,
    /// AWQ: scale each linear's input channels by a searched power of their RMS before
    /// quantizing, folded into the RMSNorm or the linear that produces them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awq: bool,
    /// What `Dim::Ada` compares: each linear's own output error, or q/k/v's on the attention
    /// output and gate/up's on the MLP output (the rest of the block in float).
    #[serde(default, skip_serializing_if = "AdaError::is_linear")]
    pub ada_error: AdaError,
    /// Refit every group's scale by least squares on the linear's output error (full Hessian,
    /// codes and zero points held) after RTN or GPTQ ([`adadim_quantize::refit_scales`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refit: bool,
    /// Passes of coordinate descent over the codes after RTN or GPTQ (0: none): each weight
    /// moves to the grid point that lowers the linear's output error most, params held
    /// ([`adadim_quantize::descend_codes`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub descend: usize,
    /// Error propagation (QEP): quantize `W + alpha W D H~^-1` so that the linear's output on
    /// the partly quantized model's inputs approaches the float model's output
    /// ([`adadim_quantize::Correction`]); `alpha` in `[0, 1]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qep: Option<f64>,
    /// Paper Table 1 heuristic: these modules per-IC, the rest per-OC (overrides `dim`).
    pub ic_modules: Vec<String>,
    /// `--bpw`: bits, group and axis chosen per linear under a size budget ([`crate::damage`]);
    /// `spec`'s bits and group are then unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// The layouts the budget chose, by `(layer, module short name)`: filled in by the run.
    #[serde(skip)]
    pub layouts: BTreeMap<(usize, &'static str), QuantSpec>,
    /// Largest total of down_proj inputs (all samples, f32 bytes) kept between its Hessian and
    /// the block's output; above it gate/up are recomputed (their FLOPs again, not the memory).
    #[serde(skip, default = "act_cache_bytes")]
    pub act_cache_bytes: usize,
}

/// [`QuantizeConfig::gptq`] in a record: the damping alone.
mod percdamp_only {
    use adadim_quantize::GptqOptions;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(g: &GptqOptions, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_f64(g.percdamp)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<GptqOptions, D::Error> {
        Ok(GptqOptions { percdamp: f64::deserialize(d)?, ..GptqOptions::default() })
    }
}

/// The least [`QuantizeConfig::act_cache_bytes`]: 256 MiB (the CLI raises it to a share of
/// the memory available). The cache lives through down_proj's GPTQ, the peak of a block.
pub const ACT_CACHE_BYTES: usize = 256 << 20;

fn act_cache_bytes() -> usize {
    ACT_CACHE_BYTES
}

/// What happened to one linear.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LinearReport {
    pub layer: usize,
    #[serde(deserialize_with = "static_name")]
    pub module: StaticName,
    pub rows: usize,
    pub cols: usize,
    /// The axis kept, written `oc` / `ic`.
    #[serde(with = "axis_name")]
    pub axis: Axis,
    /// RTN output errors `mean((Q(W)X - WX)^2)` per axis (when calibration data was used).
    pub oc_error: Option<f64>,
    pub ic_error: Option<f64>,
    /// Output error of the weights kept.
    pub final_error: Option<f64>,
    pub gptq_loss: Option<f64>,
    pub percdamp: Option<f64>,
    pub dead_inputs: usize,
    /// Wall time for this linear, and the part of it GPTQ spent inverting H / sweeping.
    pub seconds: f64,
    pub cholesky_s: Option<f64>,
    pub sweep_s: Option<f64>,
    /// GPTQ runs (2 when `--select gptq` tries both axes).
    #[serde(skip)]
    pub gptq_runs: usize,
    /// RMS over the calibration tokens of each input channel, `sqrt(H[i,i] / 2)` (empty without
    /// calibration). Kept out of the JSON: `quantize` writes it to `input_rms.safetensors`.
    #[serde(skip)]
    pub input_rms: Vec<f32>,
    /// AWQ's exponent, when its scales were applied to this linear's input channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awq_alpha: Option<f32>,
    /// AWQ's scale per input channel (the weights quantized were `W diag(s)`); empty without.
    /// Kept out of the JSON; saved with resumable blocks (the writer folds them into norms).
    #[serde(skip)]
    pub awq_scales: Vec<f32>,
    /// `--ada-error block`: the RTN candidates' errors on the attention / MLP output (mean
    /// square), which chose the axis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_oc_error: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_ic_error: Option<f64>,
    /// `--refit`: the output error before the scales were refitted (`final_error` is after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrefit_error: Option<f64>,
    /// `--descend`: the output error before the codes descended, and how many codes moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undescended_error: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descended_codes: Option<usize>,
    /// `--bpw`: the bits and group chosen (the axis is `axis`), and bytes in the packed file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Chosen>,
    /// `--bpw`: every layout the linear could take, with its RTN error and predicted damage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<CandidateReport>,
}

/// The layout `--bpw` chose for one linear.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Chosen {
    pub bits: u8,
    pub group: usize,
    /// Float minima ([`adadim_quantize::Zero::Float`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub min: bool,
    pub bytes: u64,
    /// What the damage models divide the candidates' errors by ([`crate::damage::LinearDamage`]).
    pub output_energy: f64,
    pub stream_energy: f64,
    pub sensitivity: f64,
}

/// One candidate layout of a linear, as the report shows it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct CandidateReport {
    #[serde(flatten)]
    pub candidate: Candidate,
    /// Its damage under the run's damage model.
    pub damage: f64,
}

/// `&'static str`, named so that serde's derive does not try to borrow it from the input
/// (it reads it with [`static_name`]).
pub type StaticName = &'static str;

/// A module name read back (reports saved by an interrupted run) as the name it is.
fn static_name<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<&'static str, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    LinearKind::from_module(&s)
        .map(|k| k.module())
        .or_else(|| crate::encoder::LINEARS.iter().find(|(n, _)| *n == s).map(|(n, _)| *n))
        .ok_or_else(|| serde::de::Error::custom(format!("unknown module '{s}'")))
}

/// [`Axis`] in reports as `oc` / `ic` (`QuantSpec` keeps serde's `Oc` / `Ic`).
pub mod axis_name {
    use adadim_quantize::Axis;

    pub fn name(a: Axis) -> &'static str {
        match a {
            Axis::Oc => "oc",
            Axis::Ic => "ic",
        }
    }

    pub fn serialize<S: serde::Serializer>(a: &Axis, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(name(*a))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Axis, D::Error> {
        match <String as serde::Deserialize>::deserialize(d)?.as_str() {
            "oc" => Ok(Axis::Oc),
            "ic" => Ok(Axis::Ic),
            s => Err(serde::de::Error::custom(format!("unknown axis '{s}' (oc, ic)"))),
        }
    }
}

const STEPS: [&[LinearKind]; 4] = [
    &[LinearKind::Q, LinearKind::K, LinearKind::V],
    &[LinearKind::O],
    &[LinearKind::Gate, LinearKind::Up],
    &[LinearKind::Down],
];

impl QuantizeConfig {
    fn needs_calibration(&self) -> bool {
        self.method == Method::Gptq
            || self.awq
            || self.refit
            || self.descend > 0
            || self.qep.is_some()
            || self.budget.is_some()
            || (self.dim == Dim::Ada && self.ic_modules.is_empty())
    }

    /// The grid of linear `kind` of block `layer`: the budget's choice, or `spec`.
    fn spec_of(&self, layer: usize, kind: LinearKind) -> (QuantSpec, Option<Axis>) {
        match self.layouts.get(&(layer, kind.short())) {
            Some(s) => (*s, Some(s.axis)),
            None => (self.spec, None),
        }
    }

    /// Quantize one linear `w` [rows, cols] given its input Hessian (`kind` names it in the
    /// report and matters for `ic_modules`).
    pub fn quantize_linear(
        &self,
        layer: usize,
        kind: LinearKind,
        w: &[f32],
        rows: usize,
        cols: usize,
        h: Option<&Hessian>,
    ) -> Result<(QuantizedMatrix, LinearReport)> {
        self.quantize_judged(layer, kind, w, rows, cols, h, None)
    }

    /// As [`QuantizeConfig::quantize_linear`]; with `judged`, AdaDim's two RTN candidates and
    /// the errors they were judged by downstream (`--ada-error block`), which pick the axis.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn quantize_judged(
        &self,
        layer: usize,
        kind: LinearKind,
        w: &[f32],
        rows: usize,
        cols: usize,
        h: Option<&Hessian>,
        judged: Option<(Candidates, f64, f64)>,
    ) -> Result<(QuantizedMatrix, LinearReport)> {
        let t = Instant::now();
        let qerr = |source| CalibError::Quantize { layer, module: kind.module().to_string(), source };
        let (spec, planned) = self.spec_of(layer, kind);
        let opts = GptqOptions {
            act_order: self.act_order,
            static_groups: self.static_groups,
            group_aware: self.group_aware,
            search: self.search,
            ..self.gptq
        };
        // Both RTN errors whenever calibration data is at hand: the report shows them.
        let block_errors = judged.as_ref().map(|j| (j.1, j.2));
        let choice = match (judged, h) {
            (Some((c, oc, ic)), _) => Some(c.choose_by(oc, ic)),
            // A budgeted layout fixes the axis; its table already holds the RTN errors.
            (None, Some(h)) if h.tokens() > 0 && planned.is_none() => {
                Some(choose_axis_fitted(w, rows, cols, &spec, Calibration::Hessian(h), self.search).map_err(qerr)?)
            }
            _ => None,
        };
        let forced = if let Some(axis) = planned {
            Some(axis)
        } else if self.ic_modules.is_empty() {
            None
        } else {
            Some(if self.ic_modules.iter().any(|m| m == kind.short()) { Axis::Ic } else { Axis::Oc })
        };
        let mut runs: Vec<(f64, f64)> = Vec::new();
        let mut run_gptq = |axis: Axis| -> Result<GptqOutput> {
            let o =
                gptq(w, rows, cols, h.expect("gptq has calibration"), &spec.with_axis(axis), &opts).map_err(qerr)?;
            runs.push((o.inverse_seconds, o.sweep_seconds));
            Ok(o)
        };
        let axis = forced.or(match self.dim {
            Dim::Oc => Some(Axis::Oc),
            Dim::Ic => Some(Axis::Ic),
            Dim::Ada => None,
        });
        let gptq_out = match (self.method, axis) {
            (Method::Rtn, _) => None,
            (Method::Gptq, Some(axis)) => Some(run_gptq(axis)?),
            (Method::Gptq, None) if self.select == Select::Rtn => {
                Some(run_gptq(choice.as_ref().expect("ada has calibration").axis)?)
            }
            (Method::Gptq, None) => {
                // Choose by the GPTQ result itself: run both, keep the lower output error.
                let h = h.expect("gptq has calibration");
                let (a, b) = (run_gptq(Axis::Oc)?, run_gptq(Axis::Ic)?);
                let ea = output_error_from_hessian(w, &a.quantized.dequantize(), rows, cols, h).map_err(qerr)?;
                let eb = output_error_from_hessian(w, &b.quantized.dequantize(), rows, cols, h).map_err(qerr)?;
                Some(if eb < ea { b } else { a })
            }
        };
        let (q, loss, damp, dead) = match (gptq_out, axis) {
            (Some(o), _) => (o.quantized, Some(o.loss), Some(o.percdamp), o.dead.len()),
            (None, Some(axis)) => {
                let h_diag = h.filter(|_| !self.search.is_minmax()).map(Hessian::diag);
                (
                    rtn_fitted(w, rows, cols, &spec.with_axis(axis), &Fitter::new(self.search, h_diag.as_deref()))
                        .map_err(qerr)?,
                    None,
                    None,
                    0,
                )
            }
            (None, None) => (choice.clone().expect("ada has calibration").quantized, None, None, 0),
        };
        let (q, descent) = match h.filter(|h| self.descend > 0 && h.tokens() > 0) {
            Some(h) => {
                let d = descend_codes(&q, w, h, self.descend).map_err(qerr)?;
                (d.quantized, Some((d.before, d.after, d.moved)))
            }
            None => (q, None),
        };
        let (q, refit) = match h.filter(|h| self.refit && h.tokens() > 0) {
            Some(h) => {
                let r = refit_scales(&q, w, h).map_err(qerr)?;
                (r.quantized, Some((r.before, r.after)))
            }
            None => (q, None),
        };
        let final_error = match (h, &choice) {
            _ if refit.is_some() => refit.map(|r| r.1),
            _ if descent.is_some() => descent.map(|d| d.1),
            // RTN along either axis is exactly what the choice measured: no need to redo it.
            (_, Some(c)) if loss.is_none() => Some(if q.spec().axis == Axis::Ic { c.ic_error } else { c.oc_error }),
            (Some(h), _) if h.tokens() > 0 => {
                Some(output_error_from_hessian(w, &q.dequantize(), rows, cols, h).map_err(qerr)?)
            }
            _ => None,
        };
        let report = LinearReport {
            layer,
            module: kind.module(),
            rows,
            cols,
            axis: q.spec().axis,
            oc_error: choice.as_ref().map(|c| c.oc_error),
            ic_error: choice.as_ref().map(|c| c.ic_error),
            final_error,
            gptq_loss: loss,
            percdamp: damp,
            dead_inputs: dead,
            seconds: t.elapsed().as_secs_f64(),
            cholesky_s: (!runs.is_empty()).then(|| runs.iter().map(|r| r.0).sum()),
            sweep_s: (!runs.is_empty()).then(|| runs.iter().map(|r| r.1).sum()),
            gptq_runs: runs.len(),
            input_rms: h.filter(|h| h.tokens() > 0).map_or_else(Vec::new, crate::input_rms::from_hessian),
            awq_alpha: None,
            awq_scales: Vec::new(),
            block_oc_error: block_errors.map(|e| e.0),
            block_ic_error: block_errors.map(|e| e.1),
            unrefit_error: refit.map(|r| r.0),
            undescended_error: descent.map(|d| d.0),
            descended_codes: descent.map(|d| d.2),
            layout: None,
            candidates: Vec::new(),
        };
        Ok((q, report))
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| adadim_model::ModelError::Tensor { context: "tensor to host".into(), source: e })?)
}

fn tensor(v: Vec<f32>, shape: (usize, usize)) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)
        .map_err(|e| adadim_model::ModelError::Tensor { context: "tensor from host".into(), source: e })?)
}

/// Where a quantization run spent its time, and the work it did (for `bench quantize`).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Timings {
    /// Calibration forward passes (each linear's input computed once per block).
    pub forward_s: f64,
    /// Matmul FLOPs of those passes (linears + causal attention).
    pub forward_flops: f64,
    /// Hessian accumulation `X^T X`.
    pub hessian_s: f64,
    pub hessian_flops: f64,
    /// RTN in both axes and the output errors of AdaDim's choice / the report.
    pub select_s: f64,
    /// GPTQ: damping, Cholesky factor, inverse, factor again (f64).
    pub cholesky_s: f64,
    pub cholesky_flops: f64,
    /// GPTQ: the column sweeps (f64).
    pub sweep_s: f64,
    pub sweep_flops: f64,
    /// Reading blocks and writing the output.
    pub io_s: f64,
    /// AWQ's search of the channel scales.
    #[serde(default)]
    pub awq_s: f64,
}

/// What [`quantize_model`] returns.
#[derive(Debug, Clone)]
pub struct QuantizeRun {
    pub linears: Vec<LinearReport>,
    pub timings: Timings,
    /// `--bpw`: what the allocation chose overall.
    pub allocation: Option<AllocationSummary>,
}

/// Calibration activations of every sample, and the clocks of the work done on them.
struct Activations<'a> {
    /// Residual stream entering the current stage, one `[t, d]` per sample.
    xs: Vec<Tensor>,
    times: &'a mut Timings,
}

impl Activations<'_> {
    /// `f` on sample `i`; its FLOPs (`flops(t)`) and time go to the forward clock.
    fn one<T>(&mut self, i: usize, flops: impl Fn(usize) -> f64, f: impl FnOnce(&Tensor) -> Result<T>) -> Result<T> {
        let t0 = Instant::now();
        let out = f(&self.xs[i])?;
        self.times.forward_s += t0.elapsed().as_secs_f64();
        self.times.forward_flops += flops(self.xs[i].dims()[0]);
        Ok(out)
    }

    /// `f` on every sample, as [`Activations::one`].
    fn each<T>(
        &mut self,
        flops: impl Fn(usize) -> f64,
        mut f: impl FnMut(usize, &Tensor) -> Result<T>,
    ) -> Result<Vec<T>> {
        (0..self.xs.len()).map(|i| self.one(i, &flops, |x| f(i, x))).collect()
    }

    /// Add the `[t, dim]` inputs `x` of `kind` to its Hessian `h`.
    fn accumulate(&mut self, h: &mut HessianSum, layer: usize, kind: LinearKind, x: &Tensor) -> Result<()> {
        let t0 = Instant::now();
        h.add_batch(&to_vec(x)?).map_err(|source| CalibError::Quantize {
            layer,
            module: format!("{} inputs", kind.module()),
            source,
        })?;
        let (t, dim) = (x.dims()[0] as f64, h.dim() as f64);
        self.times.hessian_flops += t * dim * (dim + 1.0); // the lower triangle of X^T X
        self.times.hessian_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// `h` mirrored into the whole `H` (timed with the Hessians).
    fn finished(&mut self, h: HessianSum) -> Hessian {
        let t0 = Instant::now();
        let h = h.finish();
        self.times.hessian_s += t0.elapsed().as_secs_f64();
        h
    }

    /// The Hessian of one stage's inputs, one `[t, dim]` per sample.
    fn hessian(&mut self, layer: usize, kind: LinearKind, inputs: &[Tensor]) -> Result<Hessian> {
        let mut h = HessianSum::new(inputs[0].dims()[1]);
        for x in inputs {
            self.accumulate(&mut h, layer, kind, x)?;
        }
        Ok(self.finished(h))
    }
}

/// Matmul FLOPs of each forward stage of one block on `t` tokens (the useful work: causal
/// attention counts the keys each query may see).
struct StageFlops {
    d: f64,
    q: f64,
    kv: f64,
    f: f64,
}

impl StageFlops {
    fn new(c: &adadim_load::LlamaConfig) -> Self {
        StageFlops {
            d: c.hidden_size as f64,
            q: c.q_dim() as f64,
            kv: c.kv_dim() as f64,
            f: c.intermediate_size as f64,
        }
    }
    /// q/k/v projections, scores and context.
    fn attention(&self, t: usize) -> f64 {
        let t = t as f64;
        2.0 * t * self.d * (self.q + 2.0 * self.kv) + 2.0 * t * (t + 1.0) * self.q
    }
    fn o(&self, t: usize) -> f64 {
        2.0 * t as f64 * self.q * self.d
    }
    /// gate and up.
    fn mlp_hidden(&self, t: usize) -> f64 {
        4.0 * t as f64 * self.d * self.f
    }
    fn down(&self, t: usize) -> f64 {
        2.0 * t as f64 * self.f * self.d
    }
}

impl Timings {
    pub(crate) fn add_linear(&mut self, r: &LinearReport) {
        let (cholesky, sweep) = (r.cholesky_s.unwrap_or(0.0), r.sweep_s.unwrap_or(0.0));
        self.select_s += r.seconds - cholesky - sweep;
        self.cholesky_s += cholesky;
        self.sweep_s += sweep;
        if r.gptq_loss.is_some() {
            let (rows, n) = (r.rows as f64, r.cols as f64);
            // Per GPTQ run: Cholesky n^3/3, inverse from the factor 2n^3/3 and the upper factor of
            // the inverse n^3/3 (faer, f64); the sweep multiplies each column's error into every
            // later column: rows n^2 / 2 multiply-adds.
            let runs = r.gptq_runs as f64;
            self.cholesky_flops += runs * 4.0 / 3.0 * n * n * n;
            self.sweep_flops += runs * rows * n * n;
        }
    }
}

/// The calibration samples' token embeddings, one `[len, d]` per sample: the inputs of the
/// first block.
pub fn embed_samples(embed: &Tensor, samples: &[Vec<u32>]) -> adadim_model::Result<Vec<Tensor>> {
    let err =
        |context: &'static str| move |source| adadim_model::ModelError::Tensor { context: context.into(), source };
    samples
        .iter()
        .map(|s| {
            Tensor::new(s.as_slice(), &Device::Cpu)
                .map_err(err("ids"))
                .and_then(|ids| embed.index_select(&ids, 0).map_err(err("embedding")))
        })
        .collect()
}

pub(crate) fn tensor_err(context: String, source: candle_core::Error) -> CalibError {
    adadim_model::ModelError::Tensor { context, source }.into()
}

/// How calibration runs the blocks: the default settings (the linears it runs are dense).
const SETTINGS: DecodeSettings = DecodeSettings::DEFAULT;

/// `silu(gate(h)) * up(h)` with `h = rms_norm(x)`: the inputs of down.
fn mlp_hidden(block: &Block, x: &Tensor) -> Result<Tensor> {
    block.mlp_hidden(&block.mlp_input(x)?, &SETTINGS).map_err(|e| tensor_err(format!("layer {}: mlp", block.layer), e))
}

/// Quantize every block of `ckpt` into the model file `out` (quantized linears in its format;
/// embeddings, norms and head copied), writing each block as soon as it is done.
/// `progress(blocks_done, blocks)`.
pub fn quantize_model(
    ckpt: &Checkpoint,
    samples: &[Vec<u32>],
    cfg: &QuantizeConfig,
    out: &Output<'_>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizeRun> {
    run(ckpt, samples, cfg, out, None, progress)
}

/// As [`quantize_model`], resumable: each finished block is saved in `work` (with the
/// calibration hidden states entering the next one), blocks it already holds are not redone,
/// and `out` is written from the saved blocks at the end, the same bytes however many runs
/// it took. `work` must belong to this job ([`WorkDir::open`] checks it).
pub fn quantize_model_resumable(
    ckpt: &Checkpoint,
    samples: &[Vec<u32>],
    cfg: &QuantizeConfig,
    out: &Output<'_>,
    work: &mut WorkDir,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizeRun> {
    run(ckpt, samples, cfg, out, Some(work), progress)
}

/// The checkpoint's tensors in the order the output is written: the non-block tensors, then
/// block by block.
fn write_plan(c: &adadim_load::LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let mut plan = c.expected_tensors();
    plan.sort_by_key(|(n, _)| {
        (
            n.strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok())
                .map_or(0, |l| l + 1),
            n.clone(),
        )
    });
    plan
}

/// Start the output and write the tensors before the first block; returns the writer and the
/// plan position of the first block tensor.
fn start_output(ckpt: &Checkpoint, out: &Output<'_>, plan: &[(String, Vec<usize>)]) -> Result<(Writer, usize)> {
    let mut writer = Writer::create(out, plan)?;
    let mut cursor = 0;
    while cursor < plan.len() && !plan[cursor].0.starts_with("model.layers.") {
        let (name, shape) = &plan[cursor];
        writer.dense(name, shape, &ckpt.tensor_f32(name)?, source_dtype(ckpt, name)?)?;
        cursor += 1;
    }
    Ok((writer, cursor))
}

/// Write block `layer`'s tensors (the next ones in `plan` from `cursor`): its quantized linears,
/// the rest (norms, biases) as in the checkpoint.
fn write_block(
    writer: &mut Writer,
    ckpt: &Checkpoint,
    plan: &[(String, Vec<usize>)],
    cursor: &mut usize,
    layer: usize,
    quantized: &[(LinearKind, QuantizedMatrix)],
    reports: &[LinearReport],
) -> Result<()> {
    let prefix = format!("model.layers.{layer}.");
    // AWQ's scales of the linears after each norm, folded into it (written in f32).
    let norms = [
        ("input_layernorm.weight", scales_of(reports, LinearKind::Q)),
        ("post_attention_layernorm.weight", scales_of(reports, LinearKind::Gate)),
    ];
    while *cursor < plan.len() && plan[*cursor].0.starts_with(&prefix) {
        let (name, shape) = &plan[*cursor];
        match quantized.iter().find(|(k, _)| name.ends_with(&format!("{}.weight", k.module()))) {
            Some((_, q)) => writer.linear(name.strip_suffix(".weight").unwrap_or(name), q)?,
            None if name.ends_with("_proj.weight") => {
                return Err(CalibError::Invalid(format!("{name}: no quantized weight for it")))
            }
            None => match norms.iter().find_map(|(n, r)| r.filter(|_| name.ends_with(n))) {
                Some(s) => writer.dense(name, shape, &folded_norm(&ckpt.tensor_f32(name)?, s), DenseDtype::F32)?,
                None => writer.dense(name, shape, &ckpt.tensor_f32(name)?, source_dtype(ckpt, name)?)?,
            },
        }
        *cursor += 1;
    }
    Ok(())
}

/// The type tensor `name` has in the checkpoint, which the output keeps for it.
fn source_dtype(ckpt: &Checkpoint, name: &str) -> Result<DenseDtype> {
    Ok(DenseDtype::of(ckpt.entry(name)?.dtype))
}

/// A block's quantized linears (in the order they were quantized) and their reports.
pub(crate) type FinishedBlock = (Vec<(LinearKind, QuantizedMatrix)>, Vec<LinearReport>);

/// Where finished blocks go.
enum Sink<'w> {
    /// Straight into the output.
    Stream { writer: Writer, cursor: usize },
    /// Into a work directory; the output is written from it once every block is done.
    Work(&'w mut WorkDir),
}

fn run(
    ckpt: &Checkpoint,
    samples: &[Vec<u32>],
    cfg: &QuantizeConfig,
    out: &Output<'_>,
    work: Option<&mut WorkDir>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizeRun> {
    cfg.spec.validate().map_err(|source| CalibError::Quantize { layer: 0, module: "(settings)".into(), source })?;
    if cfg.ada_error == AdaError::Block
        && (cfg.dim != Dim::Ada || cfg.select != Select::Rtn || !cfg.ic_modules.is_empty())
    {
        return Err(CalibError::Invalid(
            "--ada-error block judges AdaDim's two RTN candidates: it needs --dim ada, --select rtn and no --ic-modules"
                .into(),
        ));
    }
    for m in &cfg.ic_modules {
        if LinearKind::from_short(m).is_none() {
            return Err(CalibError::Invalid(format!(
                "--ic-modules: unknown module '{m}' (q, k, v, o, gate, up, down)"
            )));
        }
    }
    if let Some(alpha) = cfg.qep {
        if !(0.0..=1.0).contains(&alpha) {
            return Err(CalibError::Invalid(format!("--qep {alpha}: alpha must lie in [0, 1]")));
        }
        if cfg.awq {
            return Err(CalibError::Invalid(
                "--qep corrects the float weights for the drift of their inputs; it does not combine with --awq".into(),
            ));
        }
    }
    let mut work = work;
    // `--bpw`: the damage table (measured once, saved with the blocks), then the layouts.
    let planned;
    let (cfg, table) = match &cfg.budget {
        None => (cfg, None),
        Some(budget) => {
            budget.validate()?;
            if cfg.awq || cfg.ada_error == AdaError::Block || !cfg.ic_modules.is_empty() || cfg.select == Select::Gptq {
                return Err(CalibError::Invalid(
                    "--bpw chooses each linear's axis from its table: it does not combine with --awq, --ada-error block, --ic-modules or --select gptq"
                        .into(),
                ));
            }
            let permuted = crate::damage::permuted(cfg);
            crate::damage::check_reachable(&ckpt.config, budget, cfg.spec.zero, permuted)?;
            let per = budget.specs(cfg.spec.zero).len();
            let table = match work.as_deref().map(WorkDir::damage).transpose()?.flatten() {
                Some(t) if !t.covers(&ckpt.config, per) => {
                    return Err(CalibError::Resume {
                        path: work.as_deref().map_or_else(Default::default, |w| w.path().join("damage.json")),
                        msg: "its damage table does not cover this model's linears and layouts".into(),
                    })
                }
                Some(t) => t,
                None => {
                    let t = crate::damage::measure(
                        ckpt,
                        samples,
                        budget,
                        cfg.spec.zero,
                        cfg.search,
                        permuted,
                        &mut |_, _| {},
                    )?;
                    if let Some(w) = work.as_deref_mut() {
                        w.save_damage(&t)?;
                    }
                    t
                }
            };
            let plan = crate::damage::plan(&table, budget, cfg.spec.zero)?;
            planned = QuantizeConfig { layouts: plan.specs.clone(), ..cfg.clone() };
            (&planned, Some((table, plan)))
        }
    };
    let c = &ckpt.config;
    let layers = c.num_hidden_layers;
    let first = work.as_ref().map_or(0, |w| w.done());
    if let Some(w) = work.as_ref().filter(|w| w.done() > layers) {
        return Err(CalibError::Resume {
            path: w.path().to_path_buf(),
            msg: format!("{} blocks done, but the model has {layers}", w.done()),
        });
    }
    let mut times = work.as_ref().map_or_else(Timings::default, |w| w.timings());
    let io = Instant::now();
    let seqlen = samples.iter().map(|s| s.len()).max().unwrap_or(1);
    let rope =
        Rope::new(c, seqlen).map_err(|e| adadim_model::ModelError::Tensor { context: "rope".into(), source: e })?;
    let plan = write_plan(c);
    let mut sink = match work {
        None => {
            let (writer, cursor) = start_output(ckpt, out, &plan)?;
            Sink::Stream { writer, cursor }
        }
        Some(w) => Sink::Work(w),
    };
    // The calibration activations entering the first block to do.
    let calibrate = cfg.needs_calibration();
    let mut xs: Vec<Tensor> = Vec::new();
    match &sink {
        _ if !calibrate || first == layers => {}
        Sink::Work(w) if first > 0 => {
            xs = w.load_hidden(&samples.iter().map(|s| s.len()).collect::<Vec<_>>(), c.hidden_size)?
        }
        _ => {
            xs = embed_samples(&ckpt.tensor("model.embed_tokens.weight")?, samples)?;
        }
    }
    // `--qep`: the float model's stream beside it (recomputed up to `first` on a resume).
    let mut fp = match cfg.qep {
        Some(_) if calibrate && first < layers => {
            let t0 = Instant::now();
            let mut f = embed_samples(&ckpt.tensor("model.embed_tokens.weight")?, samples)?;
            for layer in 0..first {
                let block = float_block(ckpt, layer)?;
                for x in &mut f {
                    let mid = block.attn_residual(x, &attention_of(&block, x, &rope)?, &SETTINGS)?;
                    *x = block.mlp_residual(&mid, &mlp_hidden(&block, &mid)?, &SETTINGS)?;
                }
            }
            times.forward_s += t0.elapsed().as_secs_f64();
            Some(f)
        }
        _ => None,
    };
    times.io_s += io.elapsed().as_secs_f64();
    let mut reports = Vec::new();
    for layer in first..layers {
        let (quantized, block_reports) =
            quantize_block(ckpt, cfg, layer, &rope, calibrate, (&mut xs, fp.as_mut()), &mut times)?;
        let io = Instant::now();
        match &mut sink {
            Sink::Stream { writer, cursor } => {
                write_block(writer, ckpt, &plan, cursor, layer, &quantized, &block_reports)?
            }
            Sink::Work(w) => {
                // The clocks saved include this block's write (measured up to here).
                let mut t = times.clone();
                t.io_s += io.elapsed().as_secs_f64();
                let next_xs = (calibrate && layer + 1 < layers).then_some(&xs[..]);
                w.save_block(layer, &quantized, &block_reports, next_xs, &t)?;
            }
        }
        reports.extend(block_reports);
        times.io_s += io.elapsed().as_secs_f64();
        progress(layer + 1, layers);
    }
    let io = Instant::now();
    let writer = match sink {
        Sink::Stream { writer, .. } => writer,
        Sink::Work(w) => {
            // Every block from the work directory, in order, and all their reports.
            reports.clear();
            let (mut writer, mut cursor) = start_output(ckpt, out, &plan)?;
            for layer in 0..layers {
                let (quantized, block_reports) = w.load_block(layer)?;
                write_block(&mut writer, ckpt, &plan, &mut cursor, layer, &quantized, &block_reports)?;
                reports.extend(block_reports);
            }
            writer
        }
    };
    writer.finish()?;
    times.io_s += io.elapsed().as_secs_f64();
    let allocation = match (&table, &cfg.budget) {
        (Some((table, plan)), Some(budget)) => {
            crate::damage::annotate(&mut reports, table, budget, &cfg.layouts, &|m| {
                LinearKind::from_module(m).map(|k| k.short())
            })?;
            Some(AllocationSummary {
                bpw: plan.bpw,
                damage: plan.damage,
                table_samples: table.samples,
                table_s: table.seconds,
            })
        }
        _ => None,
    };
    Ok(QuantizeRun { linears: reports, timings: times, allocation })
}

/// Quantize block `layer`; with calibration, `xs` (the residual stream entering it, one
/// `[t, d]` per sample) becomes the stream entering the next block (left as is after the last).
/// `fp`, with `--qep`, is the float model's stream, moved on the same way through the float block.
fn quantize_block(
    ckpt: &Checkpoint,
    cfg: &QuantizeConfig,
    layer: usize,
    rope: &Rope,
    calibrate: bool,
    (xs, fp): (&mut Vec<Tensor>, Option<&mut Vec<Tensor>>),
    times: &mut Timings,
) -> Result<FinishedBlock> {
    let c = &ckpt.config;
    let io = Instant::now();
    // The block's norms and biases; each linear's weight is read when it is quantized, and
    // a forward pass gets the dequantized weights of just the linears it runs
    // ([`with_dequantized`]), so a block never holds more than a few of its matrices in f32.
    let mut block = Block::load(&WithoutLinears(ckpt), layer)?;
    let mut quantized: Vec<(LinearKind, QuantizedMatrix)> = Vec::new();
    let mut reports = Vec::new();
    times.io_s += io.elapsed().as_secs_f64();
    let mut quantize_step = |quantized: &mut Vec<(LinearKind, QuantizedMatrix)>,
                             step: &[LinearKind],
                             h: Option<&Hessian>,
                             fold: Fold,
                             judge: Option<Judge<'_>>,
                             correction: Option<&Correction>,
                             times: &mut Timings|
     -> Result<Option<Vec<f32>>> {
        let mut ws = Vec::new();
        for &kind in step {
            let io = Instant::now();
            let name = format!("model.layers.{layer}.{}.weight", kind.module());
            let w = ckpt.tensor_f32(&name)?;
            let shape = &ckpt.entry(&name)?.shape;
            times.io_s += io.elapsed().as_secs_f64();
            match shape[..] {
                [rows, cols] if rows * cols == w.len() => {
                    let w = match correction {
                        Some(c) => c.apply(&w, rows).map_err(|source| CalibError::Quantize {
                            layer,
                            module: kind.module().to_string(),
                            source,
                        })?,
                        None => w,
                    };
                    ws.push((kind, w, rows, cols))
                }
                _ => return Err(CalibError::Invalid(format!("{name}: shape {shape:?} is not a matrix"))),
            }
        }
        let t = Instant::now();
        let scales = match h {
            Some(h) if cfg.awq && h.tokens() > 0 => awq_scales(layer, &ws, h, &cfg.spec, &fold, quantized)?,
            _ => None,
        };
        times.awq_s += t.elapsed().as_secs_f64();
        // Per linear, what is quantized: `W diag(s)` and `S^-1 H S^-1` under AWQ, else W and H.
        let mut prepared = Vec::new();
        for (kind, w, _, cols) in &ws {
            let qerr = |source| CalibError::Quantize { layer, module: kind.module().to_string(), source };
            prepared.push(match (&scales, h) {
                (Some(s), Some(h)) => {
                    (Cow::Owned(awq::scale_columns(w, *cols, &s.scales)), Some(h.scaled(&s.scales).map_err(qerr)?))
                }
                _ => (Cow::Borrowed(w.as_slice()), None),
            });
        }
        // `--ada-error block`: both RTN candidates of each linear, judged downstream.
        let t = Instant::now();
        let mut judged: Vec<Option<(Candidates, f64, f64)>> = ws.iter().map(|_| None).collect();
        if let (Some(judge), Some(h)) = (judge, h) {
            let mut views = Vec::new();
            let mut cands = Vec::new();
            for ((kind, _, rows, cols), (w, hs)) in ws.iter().zip(&prepared) {
                let qerr = |source| CalibError::Quantize { layer, module: kind.module().to_string(), source };
                let hh = Calibration::Hessian(hs.as_ref().unwrap_or(h));
                let c = rtn_candidates(w, *rows, *cols, &cfg.spec, hh, cfg.search).map_err(qerr)?;
                // The judge runs the original model: candidates back in its space.
                let back = |q: &QuantizedMatrix| match &scales {
                    Some(s) => {
                        q.dequantize().chunks(*cols).flat_map(|r| r.iter().zip(&s.scales).map(|(w, s)| w / s)).collect()
                    }
                    None => q.dequantize(),
                };
                views.push((*kind, [back(&c.oc), back(&c.ic)]));
                cands.push(c);
            }
            let errors = judge(&views)?;
            judged = cands.into_iter().zip(errors).map(|(c, (oc, ic))| Some((c, oc, ic))).collect();
        }
        times.select_s += t.elapsed().as_secs_f64();
        for (((kind, _, rows, cols), (w, hs)), judged) in ws.iter().zip(&prepared).zip(judged) {
            let (q, mut report) = cfg.quantize_judged(layer, *kind, w, *rows, *cols, hs.as_ref().or(h), judged)?;
            if let (Some(s), Some(h)) = (&scales, h) {
                report.input_rms = crate::input_rms::from_hessian(h);
                report.awq_alpha = Some(s.alpha);
                report.awq_scales = s.scales.clone();
            }
            times.add_linear(&report);
            quantized.push((*kind, q));
            reports.push(report);
        }
        Ok(scales.map(|s| s.source_scales))
    };
    let [qkv, o, gate_up, down] = STEPS;
    if !calibrate {
        for step in STEPS {
            quantize_step(&mut quantized, step, None, Fold::Norm, None, None, times)?;
        }
    } else {
        // True-sequential, each stage on the outputs of the linears already quantized:
        // [q,k,v] -> [o] -> [gate,up] -> [down]. Each linear's input is computed once per
        // block (no re-run of the block from its start for every stage).
        let flops = StageFlops::new(c);
        let mut acts = Activations { xs: std::mem::take(xs), times };
        // `--qep`: the float stream entering this block, and the block with its float weights.
        let mut qep = match (cfg.qep, fp) {
            (Some(alpha), Some(fx)) => {
                Some(Qep { alpha, percdamp: cfg.gptq.percdamp, block: float_block(ckpt, layer)?, xs: fx })
            }
            _ => None,
        };
        let h_in = acts.each(|_| 0.0, |_, x| Ok(block.attn_input(x)?))?;
        let h = acts.hessian(layer, qkv[0], &h_in)?;
        let corr = match &qep {
            Some(q) => Some(q.correction(acts.times, layer, qkv[0], &h, &h_in, |b, x| Ok(b.attn_input(x)?))?),
            None => None,
        };
        drop(h_in);
        let judging = cfg.ada_error == AdaError::Block && cfg.dim == Dim::Ada && cfg.ic_modules.is_empty();
        let n_judge = acts.xs.len().min(BLOCK_ERROR_SAMPLES);
        let mut judge_attention = |views: &[(LinearKind, [Vec<f32>; 2])]| {
            let sublayer = [LinearKind::Q, LinearKind::K, LinearKind::V, LinearKind::O];
            judge(&mut block, ckpt, &sublayer, views, &acts.xs[..n_judge], |b, x| {
                let a = attention_of(b, x, rope)?;
                b.o.forward(&a, &SETTINGS).map_err(|e| tensor_err(format!("layer {layer}: attention"), e))
            })
        };
        let judge_qkv = judging.then_some(&mut judge_attention as Judge<'_>);
        if let Some(s) = quantize_step(&mut quantized, qkv, Some(&h), Fold::Norm, judge_qkv, corr.as_ref(), acts.times)?
        {
            block.attn_norm = tensor_1d(folded_norm(&to_vec(&block.attn_norm)?, &s))?;
        }
        drop(h);
        let mut attn = with_dequantized(&mut block, &quantized, qkv, |block| {
            acts.each(|t| flops.attention(t), |_, x| attention_of(block, x, rope))
        })?;
        let h = acts.hessian(layer, o[0], &attn)?;
        let corr = match &mut qep {
            Some(q) => {
                let f_attn = q.each(acts.times, |t| flops.attention(t), |b, x| attention_of(b, x, rope))?;
                let corr = q.correction_of(acts.times, layer, o[0], &h, &attn, &f_attn)?;
                q.advance(acts.times, |t| flops.o(t), |b, i, x| Ok(b.attn_residual(x, &f_attn[i], &SETTINGS)?))?;
                Some(corr)
            }
            None => None,
        };
        let sources = o_input_sources(c);
        let fold = Fold::Rows { producer: LinearKind::V, tie: Some(sources.clone()) };
        if let Some(s) = quantize_step(&mut quantized, o, Some(&h), fold, None, corr.as_ref(), acts.times)? {
            // v's rows were divided by powers of two: its outputs, and so attention's, exactly so.
            let inv = tensor_1d(sources.iter().map(|&r| 1.0 / s[r]).collect())?;
            for a in &mut attn {
                *a = a.broadcast_mul(&inv).map_err(|e| tensor_err(format!("layer {layer}: awq"), e))?;
            }
        }
        drop(h);
        acts.xs = with_dequantized(&mut block, &quantized, o, |block| {
            acts.each(|t| flops.o(t), |i, x| Ok(block.attn_residual(x, &attn[i], &SETTINGS)?))
        })?;
        drop(attn);
        let mlp_in = acts.each(|_| 0.0, |_, x| Ok(block.mlp_input(x)?))?;
        let h = acts.hessian(layer, gate_up[0], &mlp_in)?;
        let corr = match &qep {
            Some(q) => Some(q.correction(acts.times, layer, gate_up[0], &h, &mlp_in, |b, x| Ok(b.mlp_input(x)?))?),
            None => None,
        };
        drop(mlp_in);
        let mut judge_mlp = |views: &[(LinearKind, [Vec<f32>; 2])]| {
            let sublayer = [LinearKind::Gate, LinearKind::Up, LinearKind::Down];
            judge(&mut block, ckpt, &sublayer, views, &acts.xs[..n_judge], |b, x| {
                let act = b.mlp_hidden(&b.mlp_input(x)?, &SETTINGS);
                act.and_then(|a| b.down.forward(&a, &SETTINGS))
                    .map_err(|e| tensor_err(format!("layer {layer}: mlp"), e))
            })
        };
        let judge_gate_up = judging.then_some(&mut judge_mlp as Judge<'_>);
        if let Some(s) =
            quantize_step(&mut quantized, gate_up, Some(&h), Fold::Norm, judge_gate_up, corr.as_ref(), acts.times)?
        {
            block.mlp_norm = tensor_1d(folded_norm(&to_vec(&block.mlp_norm)?, &s))?;
        }
        drop(h);
        // down's inputs are (t, f), f/d times the residual stream: kept for the block's
        // output when they fit in `act_cache_bytes`, else recomputed sample by sample.
        let last = layer + 1 == c.num_hidden_layers;
        let tokens: usize = acts.xs.iter().map(|x| x.dims()[0]).sum();
        let keep = !last && tokens * c.intermediate_size * 4 <= cfg.act_cache_bytes;
        let mut kept = Vec::new();
        let mut h = HessianSum::new(c.intermediate_size);
        let mut drift = qep.as_ref().map(|_| Drift::new(c.intermediate_size));
        with_dequantized(&mut block, &quantized, gate_up, |block| {
            for i in 0..acts.xs.len() {
                let act = acts.one(i, |t| flops.mlp_hidden(t), |x| mlp_hidden(block, x))?;
                acts.accumulate(&mut h, layer, down[0], &act)?;
                if let (Some(q), Some(d)) = (&mut qep, &mut drift) {
                    // The float stream's down inputs, and its block output, one sample at a time.
                    let t0 = Instant::now();
                    let f_act = mlp_hidden(&q.block, &q.xs[i])?;
                    acts.times.forward_s += t0.elapsed().as_secs_f64();
                    acts.times.forward_flops += flops.mlp_hidden(q.xs[i].dims()[0]) + flops.down(q.xs[i].dims()[0]);
                    add_drift(acts.times, d, layer, down[0], &f_act, &act)?;
                    let t0 = Instant::now();
                    q.xs[i] = q.block.mlp_residual(&q.xs[i], &f_act, &SETTINGS)?;
                    acts.times.forward_s += t0.elapsed().as_secs_f64();
                }
                if keep {
                    kept.push(act);
                }
            }
            Ok(())
        })?;
        let h = acts.finished(h);
        let corr = match (&qep, &drift) {
            (Some(q), Some(d)) => Some(q.factor(layer, down[0], &h, d)?),
            _ => None,
        };
        drop(drift);
        let fold = Fold::Rows { producer: LinearKind::Up, tie: None };
        if let Some(s) = quantize_step(&mut quantized, down, Some(&h), fold, None, corr.as_ref(), acts.times)? {
            // up's rows were divided by powers of two: silu(gate) * up exactly so.
            let inv = tensor_1d(s.iter().map(|v| 1.0 / v).collect())?;
            for a in &mut kept {
                *a = a.broadcast_mul(&inv).map_err(|e| tensor_err(format!("layer {layer}: awq"), e))?;
            }
        }
        drop(h);
        if !last {
            let mlp = [gate_up[0], gate_up[1], down[0]];
            acts.xs = with_dequantized(&mut block, &quantized, &mlp, |block| {
                acts.each(
                    |t| flops.down(t) + if keep { 0.0 } else { flops.mlp_hidden(t) },
                    |i, x| match kept.get(i) {
                        Some(act) => Ok(block.mlp_residual(x, act, &SETTINGS)?),
                        None => Ok(block.mlp_residual(x, &mlp_hidden(block, x)?, &SETTINGS)?),
                    },
                )
            })?;
        }
        *xs = acts.xs;
    }
    Ok((quantized, reports))
}

/// `--qep`: the float model's residual stream through the block being quantized, and that
/// block with its float weights.
struct Qep<'a> {
    alpha: f64,
    percdamp: f64,
    block: Block,
    /// The float stream, one `[t, d]` per sample: entering the block, then after its attention.
    xs: &'a mut Vec<Tensor>,
}

impl Qep<'_> {
    /// `f` on every sample of the float stream (timed and counted, `flops(t)`, as forward passes).
    fn each<T>(
        &self,
        times: &mut Timings,
        flops: impl Fn(usize) -> f64,
        f: impl Fn(&Block, &Tensor) -> Result<T>,
    ) -> Result<Vec<T>> {
        let t0 = Instant::now();
        let out = self.xs.iter().map(|x| f(&self.block, x)).collect();
        times.forward_s += t0.elapsed().as_secs_f64();
        times.forward_flops += self.xs.iter().map(|x| flops(x.dims()[0])).sum::<f64>();
        out
    }

    /// Moves the float stream on: sample `i` becomes `f(block, i, x_i)` (`flops(t)` each).
    fn advance(
        &mut self,
        times: &mut Timings,
        flops: impl Fn(usize) -> f64,
        f: impl Fn(&Block, usize, &Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let t0 = Instant::now();
        for i in 0..self.xs.len() {
            times.forward_flops += flops(self.xs[i].dims()[0]);
            self.xs[i] = f(&self.block, i, &self.xs[i])?;
        }
        times.forward_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The correction of a stage whose float inputs are `input(block, x)` of the float stream.
    fn correction(
        &self,
        times: &mut Timings,
        layer: usize,
        kind: LinearKind,
        h: &Hessian,
        quantized: &[Tensor],
        input: impl Fn(&Block, &Tensor) -> Result<Tensor>,
    ) -> Result<Correction> {
        let float = self.each(times, |_| 0.0, input)?;
        self.correction_of(times, layer, kind, h, quantized, &float)
    }

    /// The correction of a stage given both streams' inputs of it, sample by sample.
    fn correction_of(
        &self,
        times: &mut Timings,
        layer: usize,
        kind: LinearKind,
        h: &Hessian,
        quantized: &[Tensor],
        float: &[Tensor],
    ) -> Result<Correction> {
        let mut d = Drift::new(h.dim());
        for (f, q) in float.iter().zip(quantized) {
            add_drift(times, &mut d, layer, kind, f, q)?;
        }
        self.factor(layer, kind, h, &d)
    }

    fn factor(&self, layer: usize, kind: LinearKind, h: &Hessian, d: &Drift) -> Result<Correction> {
        Correction::new(h, d, self.alpha, self.percdamp).map_err(|source| CalibError::Quantize {
            layer,
            module: format!("{} (error propagation)", kind.module()),
            source,
        })
    }
}

/// Adds one sample's float and quantized-stream inputs of `kind` to its drift.
fn add_drift(times: &mut Timings, d: &mut Drift, layer: usize, kind: LinearKind, f: &Tensor, q: &Tensor) -> Result<()> {
    let t0 = Instant::now();
    d.add_batch(&to_vec(f)?, &to_vec(q)?).map_err(|source| CalibError::Quantize {
        layer,
        module: format!("{} inputs", kind.module()),
        source,
    })?;
    times.hessian_s += t0.elapsed().as_secs_f64();
    let (t, dim) = (q.dims()[0] as f64, d.dim() as f64);
    times.hessian_flops += 2.0 * t * dim * dim; // (x - x~)^T x~, the whole square
    Ok(())
}

/// Block `layer` with its float weights (f32), for the float stream of `--qep`.
fn float_block(ckpt: &Checkpoint, layer: usize) -> Result<Block> {
    let mut block = Block::load(&WithoutLinears(ckpt), layer)?;
    for kind in LinearKind::ALL {
        let name = format!("model.layers.{layer}.{}.weight", kind.module());
        let w = ckpt.tensor(&name)?.to_dtype(candle_core::DType::F32).map_err(|e| tensor_err(name, e))?;
        block.linear_mut(kind).weight = Weight::Dense(w);
    }
    Ok(block)
}

/// The attention of a block on the residual stream `x` (with the weights it holds): o_proj's input.
fn attention_of(block: &Block, x: &Tensor, rope: &Rope) -> Result<Tensor> {
    block
        .attention(&block.attn_input(x)?, rope, &SETTINGS)
        .map_err(|e| tensor_err(format!("layer {}: attention", block.layer), e))
}

/// Judges each candidate of [`AdaError::Block`] on its sublayer's output.
type Judge<'a> = &'a mut dyn FnMut(&[(LinearKind, [Vec<f32>; 2])]) -> Result<Vec<(f64, f64)>>;

/// For each `(kind, [oc, ic])` of `views`: the mean squared difference between `out(block, x)`
/// with that linear's candidate and with every linear of `sublayer` in float (from `ckpt`),
/// over the samples `xs`. The sublayer's linears are placeholders again afterwards.
fn judge(
    block: &mut Block,
    ckpt: &Checkpoint,
    sublayer: &[LinearKind],
    views: &[(LinearKind, [Vec<f32>; 2])],
    xs: &[Tensor],
    out: impl Fn(&Block, &Tensor) -> Result<Tensor>,
) -> Result<Vec<(f64, f64)>> {
    let layer = block.layer;
    let float = |kind: LinearKind| -> Result<Tensor> {
        let name = format!("model.layers.{layer}.{}.weight", kind.module());
        ckpt.tensor(&name)?.to_dtype(candle_core::DType::F32).map_err(|e| tensor_err(name, e))
    };
    // Read once; a candidate's linear gets its float weight back by a cheap (shared) clone.
    let floats = sublayer.iter().map(|&k| Ok((k, float(k)?))).collect::<Result<Vec<_>>>()?;
    for (kind, w) in &floats {
        block.linear_mut(*kind).weight = Weight::Dense(w.clone());
    }
    let outputs = |block: &Block| -> Result<Vec<Vec<f32>>> { xs.iter().map(|x| to_vec(&out(block, x)?)).collect() };
    let want = outputs(block)?;
    let mut errors = Vec::new();
    for (kind, cands) in views {
        let dims = block.linear(*kind).dense().map(|w| w.dims().to_vec()).unwrap_or_default();
        let [rows, cols] = dims[..] else {
            return Err(CalibError::Invalid(format!("layer {layer} {}: not a dense matrix", kind.module())));
        };
        let mut e = [0f64; 2];
        for (e, w) in e.iter_mut().zip(cands) {
            block.linear_mut(*kind).weight = Weight::Dense(tensor(w.clone(), (rows, cols))?);
            let (mut sum, mut n) = (0f64, 0usize);
            for (got, want) in outputs(block)?.iter().zip(&want) {
                sum += got.iter().zip(want).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
                n += got.len();
            }
            *e = sum / n.max(1) as f64;
        }
        let w = floats.iter().find(|(k, _)| k == kind).map(|(_, w)| w.clone());
        let w =
            w.ok_or_else(|| CalibError::Invalid(format!("layer {layer} {}: not in its sublayer", kind.module())))?;
        block.linear_mut(*kind).weight = Weight::Dense(w);
        errors.push((e[0], e[1]));
    }
    for &kind in sublayer {
        block.linear_mut(kind).weight = Weight::Dense(placeholder()?);
    }
    Ok(errors)
}

/// A checkpoint seen without its linear weights: [`Block::load`] through it reads norms and
/// biases only, each linear getting an empty placeholder (any product with it is a shape
/// error, never a silent result) until [`with_dequantized`] puts its quantized weights in.
struct WithoutLinears<'a>(&'a Checkpoint);

impl adadim_model::WeightSource for WithoutLinears<'_> {
    fn config(&self) -> &adadim_load::LlamaConfig {
        &self.0.config
    }
    fn tensor(&self, name: &str) -> adadim_model::Result<Tensor> {
        adadim_model::WeightSource::tensor(self.0, name)
    }
    fn linear(&self, _name: &str) -> adadim_model::Result<Weight> {
        Ok(Weight::Dense(placeholder()?))
    }
}

fn placeholder() -> adadim_model::Result<Tensor> {
    Tensor::zeros((0, 0), candle_core::DType::F32, &Device::Cpu)
        .map_err(|e| adadim_model::ModelError::Tensor { context: "placeholder".into(), source: e })
}

/// Run `f` with the linears `kinds` of `block` holding their dequantized weights (`Q(W)`
/// exactly as evaluated) for the length of one forward stage, then put the placeholders back.
fn with_dequantized<T>(
    block: &mut Block,
    quantized: &[(LinearKind, QuantizedMatrix)],
    kinds: &[LinearKind],
    f: impl FnOnce(&Block) -> Result<T>,
) -> Result<T> {
    for &kind in kinds {
        let (_, q) = quantized.iter().find(|(k, _)| *k == kind).ok_or_else(|| {
            CalibError::Invalid(format!("layer {} {}: used before it was quantized", block.layer, kind.module()))
        })?;
        block.linear_mut(kind).weight = Weight::Dense(tensor(q.dequantize(), (q.rows(), q.cols()))?);
    }
    let out = f(block);
    for &kind in kinds {
        block.linear_mut(kind).weight = Weight::Dense(placeholder()?);
    }
    out
}
