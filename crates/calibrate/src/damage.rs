//! `--bpw`: every layout a linear may take (bits x group x axis), what it costs on disk and
//! what its RTN output error is, measured in one pass of the float model over calibration
//! data ([`measure`]); then one layout per linear under the size budget ([`plan`], a
//! knapsack over the predicted damage, [`adadim_quantize::allocate`]).

use std::collections::BTreeMap;
use std::time::Instant;

use adadim_load::Checkpoint;
use adadim_model::{Block, LinearKind, Rope, Weight};
use adadim_pack::Layout;
use adadim_quantize::allocate::{allocate, Point};
use adadim_quantize::{
    output_error_from_hessian, rtn_fitted, Axis, Fitter, Hessian, HessianSum, QuantSpec, ScaleSearch, Zero,
};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::driver::{axis_name, embed_samples, tensor_err, to_vec, CandidateReport, Chosen, LinearReport};
use crate::error::{CalibError, Result};

/// Calibration samples (the first ones) the damage table is measured on.
pub const DAMAGE_SAMPLES: usize = 32;

/// How a layout's damage to the model is predicted from its RTN output error `e` (the mean
/// square of `Q(W) X - W X` over outputs and tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DamageModel {
    /// The output error summed over the linear's outputs, `rows e`.
    Output,
    /// Relative to the linear's output, `e / mean((W X)^2)`.
    Relative,
    /// Relative to the residual stream it reads, `rows e / mean_t |x_t|^2` (the stream
    /// entering the linear's sublayer).
    Stream,
    /// The model's measured response: `s rows e`, with `s` the KL divergence of the next-token
    /// distributions per unit of output error energy, measured once per linear by a random
    /// perturbation of its weight ([`LinearDamage::sensitivity`]).
    #[default]
    Kl,
}

impl DamageModel {
    /// `output` / `relative` / `stream`.
    pub fn name(self) -> &'static str {
        match self {
            DamageModel::Output => "output",
            DamageModel::Relative => "relative",
            DamageModel::Stream => "stream",
            DamageModel::Kl => "kl",
        }
    }

    /// Predicted damage of candidate `c` of linear `l`.
    pub fn damage(self, l: &LinearDamage, c: &Candidate) -> f64 {
        let tiny = f64::MIN_POSITIVE;
        match self {
            DamageModel::Output => c.error * l.rows as f64,
            DamageModel::Relative => c.error / l.output_energy.max(tiny),
            DamageModel::Stream => c.error * l.rows as f64 / l.stream_energy.max(tiny),
            DamageModel::Kl => l.sensitivity * c.error * l.rows as f64,
        }
    }
}

/// `--bpw` and what it may choose from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Bits per weight of all block linears together, as the packed file stores them.
    pub bpw: f64,
    pub damage: DamageModel,
    /// Bit widths, group sizes (0: a whole channel) and axes a linear may take.
    pub bits: Vec<u8>,
    pub groups: Vec<usize>,
    pub axes: Vec<Axis>,
    /// Whether each layout may also take float minima ([`Zero::Float`]) beside the run's zero.
    #[serde(default)]
    pub float_min: bool,
}

impl Budget {
    /// Every `(bits, group, axis, zero)` a linear may take: `zero`, and with
    /// [`Budget::float_min`] also [`Zero::Float`].
    pub fn specs(&self, zero: Zero) -> Vec<QuantSpec> {
        let mut zeros = vec![zero];
        if self.float_min && zero != Zero::Float {
            zeros.push(Zero::Float);
        }
        let mut out = Vec::new();
        for &zero in &zeros {
            for &bits in &self.bits {
                for &g in &self.groups {
                    for &axis in &self.axes {
                        out.push(QuantSpec { bits, group: (g > 0).then_some(g), axis, zero });
                    }
                }
            }
        }
        out
    }

    /// Checks the settings themselves (the reachable range is checked against a model).
    pub fn validate(&self) -> Result<()> {
        if !(self.bpw.is_finite() && self.bpw > 0.0 && self.bpw <= 8.0) {
            return Err(CalibError::Invalid(format!(
                "--bpw {}: must be above 0 and at most 8 bits per weight (the widest layout is 8-bit codes)",
                self.bpw
            )));
        }
        if self.bits.is_empty() || self.groups.is_empty() || self.axes.is_empty() {
            return Err(CalibError::Invalid("--bpw: no layout to choose from".into()));
        }
        for spec in self.specs(Zero::Awq) {
            spec.validate().map_err(|source| CalibError::Quantize {
                layer: 0,
                module: "(--bpw layouts)".into(),
                source,
            })?;
        }
        Ok(())
    }
}

/// One layout of one linear: its cost on disk and its RTN output error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub bits: u8,
    /// Weights per group along `axis` (the whole channel when that is shorter).
    pub group: usize,
    #[serde(with = "axis_name")]
    pub axis: Axis,
    /// Float minima ([`Zero::Float`]) in place of the run's zero points.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub min: bool,
    /// Codes, scales, zeros (and permutation) in the packed file.
    pub bytes: u64,
    /// `mean((Q(W) X - W X)^2)` with `Q` RTN on this layout.
    pub error: f64,
}

/// Every candidate of one linear, with what the damage models divide by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearDamage {
    pub layer: usize,
    /// `q`, `k`, ... `down`.
    pub module: String,
    pub rows: usize,
    pub cols: usize,
    /// `mean((W X)^2)`.
    pub output_energy: f64,
    /// `mean_t |x_t|^2` of the residual stream entering the linear's sublayer.
    pub stream_energy: f64,
    /// `mean_t |x_t|^2` of the linear's own input.
    pub input_energy: f64,
    /// KL divergence (nats per token) of the model's next-token distributions per unit of this
    /// linear's output error energy per token, `|ΔW x|^2` ([`sensitivities`]).
    pub sensitivity: f64,
    pub candidates: Vec<Candidate>,
}

/// The damage table of a model: one entry per block linear, in block order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DamageTable {
    /// Calibration samples it was measured on.
    pub samples: usize,
    /// Wall seconds the measurement took.
    pub seconds: f64,
    pub linears: Vec<LinearDamage>,
}

impl DamageTable {
    /// Whether the table covers every block linear of a model shaped `c` with `per` candidates
    /// each, every number finite: a table read back from a file is used only then.
    pub fn covers(&self, c: &adadim_load::LlamaConfig, per: usize) -> bool {
        let want: Vec<(usize, &str)> =
            (0..c.num_hidden_layers).flat_map(|l| LinearKind::ALL.iter().map(move |k| (l, k.short()))).collect();
        self.linears.len() == want.len()
            && self.linears.iter().zip(&want).all(|(l, (layer, module))| {
                l.layer == *layer
                    && l.module == *module
                    && l.candidates.len() == per
                    && [l.output_energy, l.stream_energy, l.input_energy, l.sensitivity].iter().all(|v| v.is_finite())
                    && l.candidates.iter().all(|c| c.error.is_finite() && c.error >= 0.0)
            })
    }
}

/// The chosen layouts, by `(layer, module short name)`, and what the choice predicts.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub specs: BTreeMap<(usize, &'static str), QuantSpec>,
    /// Bits per weight of the chosen layouts over all block linears.
    pub bpw: f64,
    /// Summed predicted damage.
    pub damage: f64,
}

/// What `report.json`'s summary says of a `--bpw` run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AllocationSummary {
    /// Bits per weight of the chosen layouts over all block linears.
    pub bpw: f64,
    /// Summed predicted damage of the choice.
    pub damage: f64,
    /// Samples the damage table was measured on, and its wall seconds.
    pub table_samples: usize,
    pub table_s: f64,
}

/// Each report gets its linear's candidates (with their damage) and the layout chosen
/// (`short_of`: a report's module as the table names it, `q` .. `down`).
pub fn annotate(
    reports: &mut [LinearReport],
    table: &DamageTable,
    budget: &Budget,
    layouts: &BTreeMap<(usize, &'static str), QuantSpec>,
    short_of: &dyn Fn(&str) -> Option<&'static str>,
) -> Result<()> {
    for r in reports {
        let short = short_of(r.module).unwrap_or_default();
        let l = table.linears.iter().find(|l| l.layer == r.layer && l.module == short);
        let (Some(l), Some(spec)) = (l, layouts.get(&(r.layer, short))) else {
            return Err(CalibError::Invalid(format!("layer {} {}: not in the damage table", r.layer, r.module)));
        };
        let (gr, gc) = spec.group_shape(r.rows, r.cols);
        let group = if spec.axis == Axis::Oc { gc } else { gr };
        let min = spec.zero == Zero::Float;
        let chosen = l
            .candidates
            .iter()
            .find(|c| c.bits == spec.bits && c.group == group && c.axis == spec.axis && c.min == min);
        r.layout = Some(Chosen {
            bits: spec.bits,
            group,
            min,
            bytes: chosen.map_or(0, |c| c.bytes),
            output_energy: l.output_energy,
            stream_energy: l.stream_energy,
            sensitivity: l.sensitivity,
        });
        r.candidates = l
            .candidates
            .iter()
            .map(|c| CandidateReport { candidate: c.clone(), damage: budget.damage.damage(l, c) })
            .collect();
    }
    Ok(())
}

/// Mean over tokens of `|x_t|^2`, over every sample.
fn stream_energy(xs: &[Tensor]) -> Result<f64> {
    let (mut sum, mut tokens) = (0f64, 0usize);
    for x in xs {
        sum += to_vec(x)?.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        tokens += x.dims()[0];
    }
    Ok(sum / tokens.max(1) as f64)
}

/// Measure the damage table: the float model run block by block on the first
/// [`DAMAGE_SAMPLES`] samples, each linear's input Hessian accumulated, and every layout of
/// `budget` fitted by RTN (`search`, weighted by the Hessian diagonal) and measured on it.
/// `permuted`: per-OC layouts store a column permutation (act-order GPTQ).
/// `progress(blocks_done, blocks)`.
pub fn measure(
    ckpt: &Checkpoint,
    samples: &[Vec<u32>],
    budget: &Budget,
    zero: Zero,
    search: ScaleSearch,
    permuted: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<DamageTable> {
    let t0 = Instant::now();
    let c = &ckpt.config;
    let samples = &samples[..samples.len().min(DAMAGE_SAMPLES)];
    if samples.is_empty() {
        return Err(CalibError::Invalid("--bpw needs calibration samples to measure each layout's error".into()));
    }
    let seqlen = samples.iter().map(|s| s.len()).max().unwrap_or(1);
    let rope = Rope::new(c, seqlen).map_err(|e| tensor_err("rope".into(), e))?;
    let settings = adadim_model::DecodeSettings::DEFAULT;
    let mut xs = embed_samples(&ckpt.tensor("model.embed_tokens.weight")?, samples)?;
    let specs = budget.specs(zero);
    let mut linears = Vec::new();
    for layer in 0..c.num_hidden_layers {
        let mut block = Block::load(ckpt, layer)?;
        for kind in LinearKind::ALL {
            let lin = block.linear_mut(kind);
            if let Weight::Dense(w) = &lin.weight {
                let w = w.to_dtype(candle_core::DType::F32).map_err(|e| tensor_err(format!("layer {layer}"), e))?;
                lin.weight = Weight::Dense(w);
            }
        }
        let err = |what: &str| {
            let what = format!("layer {layer}: {what}");
            move |e| tensor_err(what.clone(), e)
        };
        let hessian = |inputs: &[Tensor], kind: LinearKind| -> Result<Hessian> {
            let mut h = HessianSum::new(inputs[0].dims()[1]);
            for x in inputs {
                h.add_batch(&to_vec(x)?).map_err(|source| CalibError::Quantize {
                    layer,
                    module: format!("{} inputs", kind.module()),
                    source,
                })?;
            }
            Ok(h.finish())
        };
        let attn_stream = stream_energy(&xs)?;
        let h_in: Vec<Tensor> = xs.iter().map(|x| block.attn_input(x)).collect::<adadim_model::Result<_>>()?;
        let h_qkv = hessian(&h_in, LinearKind::Q)?;
        let attn = h_in
            .iter()
            .map(|h| block.attention(h, &rope, &settings).map_err(err("attention")))
            .collect::<Result<Vec<_>>>()?;
        drop(h_in);
        let h_o = hessian(&attn, LinearKind::O)?;
        xs = xs
            .iter()
            .zip(&attn)
            .map(|(x, a)| block.attn_residual(x, a, &settings))
            .collect::<adadim_model::Result<_>>()?;
        drop(attn);
        let mlp_stream = stream_energy(&xs)?;
        let m_in: Vec<Tensor> = xs.iter().map(|x| block.mlp_input(x)).collect::<adadim_model::Result<_>>()?;
        let h_gu = hessian(&m_in, LinearKind::Gate)?;
        let mut h_down = HessianSum::new(c.intermediate_size);
        let mut next = Vec::with_capacity(xs.len());
        for (x, m) in xs.iter().zip(&m_in) {
            let a = block.mlp_hidden(m, &settings).map_err(err("mlp"))?;
            h_down.add_batch(&to_vec(&a)?).map_err(|source| CalibError::Quantize {
                layer,
                module: format!("{} inputs", LinearKind::Down.module()),
                source,
            })?;
            next.push(block.mlp_residual(x, &a, &settings)?);
        }
        drop(m_in);
        let h_down = h_down.finish();
        for kind in LinearKind::ALL {
            let (h, stream) = match kind {
                LinearKind::Q | LinearKind::K | LinearKind::V => (&h_qkv, attn_stream),
                LinearKind::O => (&h_o, attn_stream),
                LinearKind::Gate | LinearKind::Up => (&h_gu, mlp_stream),
                LinearKind::Down => (&h_down, mlp_stream),
            };
            linears.push(candidates(ckpt, (layer, kind), h, stream, Layouts { specs: &specs, search, permuted })?);
        }
        xs = next;
        progress(layer + 1, c.num_hidden_layers);
    }
    drop(xs);
    sensitivities(ckpt, samples, &mut linears)?;
    Ok(DamageTable { samples: samples.len(), seconds: t0.elapsed().as_secs_f64(), linears })
}

/// Samples (the first ones), and tokens of each, the sensitivities are measured on.
pub const SENSITIVITY_SAMPLES: usize = 2;
pub const SENSITIVITY_TOKENS: usize = 256;
/// The random perturbation's expected output error, relative to the linear's output energy
/// (about what 3-bit groups cost).
const PERTURBATION: f64 = 0.01;

/// Each row of `[t, vocab]` logits as log-probabilities.
fn log_softmax(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let rows = logits.to_vec2::<f32>().map_err(|e| tensor_err("logits".into(), e))?;
    Ok(rows
        .into_iter()
        .map(|mut r| {
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + r.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
            r.iter_mut().for_each(|v| *v -= lse);
            r
        })
        .collect())
}

/// Mean over positions of `KL(p || q)` from log-probabilities.
fn kl(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    let sum: f64 = p
        .iter()
        .zip(q)
        .map(|(p, q)| p.iter().zip(q).map(|(&a, &b)| f64::from(a.exp()) * f64::from(a - b)).sum::<f64>())
        .sum();
    sum / p.len().max(1) as f64
}

/// Every linear's [`LinearDamage::sensitivity`]: its weight moved by seeded Gaussian noise
/// whose expected output error is [`PERTURBATION`] of its output energy, the model run from
/// that block on, and the KL divergence of its next-token distributions from the float
/// model's, over the first [`SENSITIVITY_SAMPLES`] x [`SENSITIVITY_TOKENS`] calibration tokens.
/// The float model is held in memory while it runs.
fn sensitivities(ckpt: &Checkpoint, samples: &[Vec<u32>], linears: &mut [LinearDamage]) -> Result<()> {
    let samples: Vec<&[u32]> =
        samples.iter().take(SENSITIVITY_SAMPLES).map(|s| &s[..s.len().min(SENSITIVITY_TOKENS)]).collect();
    let longest = samples.iter().map(|s| s.len()).max().unwrap_or(1);
    let mut model = adadim_model::Model::load(ckpt, longest, &mut |_, _| {})?;
    let settings = model.settings();
    let err = |what: &str| {
        let what = what.to_string();
        move |e| tensor_err(what.clone(), e)
    };
    // The float model: the stream entering every block, and its log-probabilities.
    let mut entering = Vec::new();
    let mut want = Vec::new();
    for ids in &samples {
        let mut x = model.embed(ids)?;
        let mut per = Vec::new();
        for b in &model.blocks {
            per.push(x.clone());
            x = b.forward(&x, &model.rope, &settings)?;
        }
        want.push(log_softmax(&model.logits(&x)?)?);
        entering.push(per);
    }
    for (i, l) in linears.iter_mut().enumerate() {
        let kind = LinearKind::from_short(&l.module)
            .ok_or_else(|| CalibError::Invalid(format!("damage table: unknown module '{}'", l.module)))?;
        let name = format!("model.layers.{}.{}.weight", l.layer, kind.module());
        let w = ckpt.tensor_f32(&name)?;
        let (sigma, moved_energy) = perturbation(l);
        let mut rng = adadim_load::synth::Rng::new(0x5E45_0000 + i as u64);
        let moved: Vec<f32> = w.iter().zip(rng.normals(w.len(), sigma)).map(|(w, n)| w + n).collect();
        let moved = Tensor::from_vec(moved, (l.rows, l.cols), &candle_core::Device::Cpu).map_err(err("weight"))?;
        let block = &mut model.blocks[l.layer];
        let original = std::mem::replace(&mut block.linear_mut(kind).weight, Weight::Dense(moved));
        let mut sum = 0.0;
        for (s, ids) in samples.iter().enumerate() {
            let mut x = entering[s][l.layer].clone();
            for b in &model.blocks[l.layer..] {
                x = b.forward(&x, &model.rope, &settings)?;
            }
            sum += kl(&want[s], &log_softmax(&model.logits(&x)?)?) * ids.len() as f64;
        }
        model.blocks[l.layer].linear_mut(kind).weight = original;
        let tokens: usize = samples.iter().map(|s| s.len()).sum();
        l.sensitivity = if moved_energy > 0.0 { sum / tokens.max(1) as f64 / moved_energy } else { 0.0 };
    }
    Ok(())
}

/// The layouts a table measures: each spec, fitted with `search`; per-OC ones store a column
/// permutation when `permuted` (act-order GPTQ).
#[derive(Clone, Copy)]
pub(crate) struct Layouts<'a> {
    pub specs: &'a [QuantSpec],
    pub search: ScaleSearch,
    pub permuted: bool,
}

/// Every layout of `layouts` for one linear, fitted by RTN and measured on `h`.
fn candidates(
    ckpt: &Checkpoint,
    (layer, kind): (usize, LinearKind),
    h: &Hessian,
    stream: f64,
    layouts: Layouts<'_>,
) -> Result<LinearDamage> {
    let name = format!("model.layers.{layer}.{}.weight", kind.module());
    let w = ckpt.tensor_f32(&name)?;
    let (rows, cols) = match ckpt.entry(&name)?.shape[..] {
        [r, c] if r * c == w.len() => (r, c),
        ref s => return Err(CalibError::Invalid(format!("{name}: shape {s:?} is not a matrix"))),
    };
    let at = Site { layer, kind, module: kind.module() };
    candidates_of(&w, (rows, cols), at, h, stream, layouts)
}

/// Where a linear sits: its block, the kind whose settings it takes, its name there (errors).
#[derive(Clone, Copy)]
pub(crate) struct Site<'a> {
    pub layer: usize,
    pub kind: LinearKind,
    pub module: &'a str,
}

/// [`candidates`] of the `[rows, cols]` weights `w`.
pub(crate) fn candidates_of(
    w: &[f32],
    (rows, cols): (usize, usize),
    at: Site<'_>,
    h: &Hessian,
    stream: f64,
    Layouts { specs, search, permuted }: Layouts<'_>,
) -> Result<LinearDamage> {
    let qerr = |source| CalibError::Quantize { layer: at.layer, module: at.module.to_string(), source };
    let diag = h.diag();
    let fitter = Fitter::new(search, (!search.is_minmax()).then_some(diag.as_slice()));
    let zeros = vec![0f32; w.len()];
    let output_energy = output_error_from_hessian(w, &zeros, rows, cols, h).map_err(qerr)?;
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        // 8-bit steps are fine enough that the search gains nothing worth its time here.
        let fitter = if spec.bits == 8 { Fitter::MINMAX } else { fitter };
        let q = rtn_fitted(w, rows, cols, spec, &fitter).map_err(qerr)?;
        let error = output_error_from_hessian(w, &q.dequantize(), rows, cols, h).map_err(qerr)?;
        let (group, bytes) = layout_bytes(rows, cols, spec, permuted);
        out.push(Candidate { bits: spec.bits, group, axis: spec.axis, min: spec.zero == Zero::Float, bytes, error });
    }
    Ok(LinearDamage {
        layer: at.layer,
        module: at.kind.short().to_string(),
        rows,
        cols,
        output_energy,
        stream_energy: stream,
        input_energy: f64::from(diag.iter().sum::<f32>()) / 2.0,
        sensitivity: 0.0,
        candidates: out,
    })
}

/// The standard deviation of the seeded noise that moves linear `l`'s output by
/// [`PERTURBATION`] of its energy, and that noise's expected output error energy per token.
pub(crate) fn perturbation(l: &LinearDamage) -> (f32, f64) {
    let sigma = (PERTURBATION * l.output_energy / l.input_energy.max(f64::MIN_POSITIVE)).sqrt() as f32;
    (sigma, PERTURBATION * l.output_energy * l.rows as f64)
}

/// Whether per-OC layouts store a column permutation under `cfg` (dynamic act-order GPTQ).
pub fn permuted(cfg: &crate::driver::QuantizeConfig) -> bool {
    cfg.method == crate::driver::Method::Gptq && cfg.act_order && !cfg.static_groups && !cfg.group_aware
}

/// Write `table` to `file` whole or not at all (a temporary file beside it, then renamed).
pub fn write_cache(file: &std::path::Path, table: &DamageTable) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = adadim_load::fetch::partial_path(file);
    std::fs::write(&tmp, serde_json::to_vec(table).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, file).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Weights per group along the axis, and bytes in the packed file, of `spec` on `[rows, cols]`.
fn layout_bytes(rows: usize, cols: usize, spec: &QuantSpec, permuted: bool) -> (usize, u64) {
    let (gr, gc) = spec.group_shape(rows, cols);
    let group = if spec.axis == Axis::Oc { gc } else { gr };
    let layout = Layout { bits: spec.bits, group, axis: spec.axis, min: spec.zero == Zero::Float };
    (group, layout.bytes(rows, cols, permuted && spec.axis == Axis::Oc) as u64)
}

/// The error for a budget outside what the layouts can reach (bits per weight).
fn out_of_reach(budget: &Budget, lo: f64, hi: f64) -> CalibError {
    CalibError::Invalid(format!(
        "--bpw {}: below the cheapest layouts allowed ({lo:.3} bits per weight); reachable: {lo:.3} to {hi:.3}",
        budget.bpw
    ))
}

/// Checks, from the model's shapes alone (before anything is measured), that the budget is
/// not below the cheapest layouts.
pub fn check_reachable(c: &adadim_load::LlamaConfig, budget: &Budget, zero: Zero, permuted: bool) -> Result<()> {
    let specs = budget.specs(zero);
    let (mut lo, mut hi, mut weights) = (0u64, 0u64, 0u64);
    for (name, shape) in c.expected_tensors() {
        let [rows, cols] = shape[..] else { continue };
        if !(name.starts_with("model.layers.") && name.ends_with("_proj.weight")) {
            continue;
        }
        let bytes = specs.iter().map(|s| layout_bytes(rows, cols, s, permuted).1);
        lo += bytes.clone().min().unwrap_or(0);
        hi += bytes.max().unwrap_or(0);
        weights += (rows * cols) as u64;
    }
    let bpw = |b: u64| 8.0 * b as f64 / weights.max(1) as f64;
    if budget.bpw < bpw(lo) {
        return Err(out_of_reach(budget, bpw(lo), bpw(hi)));
    }
    Ok(())
}

/// One layout per linear of `table`: the least summed damage (`budget.damage`) whose bytes
/// stay within `budget.bpw` bits per weight. A budget below the cheapest layouts is an error
/// naming the reachable range.
pub fn plan(table: &DamageTable, budget: &Budget, zero: Zero) -> Result<Plan> {
    let weights: u64 = table.linears.iter().map(|l| (l.rows * l.cols) as u64).sum();
    let points: Vec<Vec<Point>> = table
        .linears
        .iter()
        .map(|l| l.candidates.iter().map(|c| Point { bytes: c.bytes, damage: budget.damage.damage(l, c) }).collect())
        .collect();
    let bytes = (budget.bpw * weights as f64 / 8.0).floor() as u64;
    let bpw = |b: u64| 8.0 * b as f64 / weights.max(1) as f64;
    let a = allocate(&points, bytes).map_err(|e| match e {
        adadim_quantize::Error::Budget { cheapest, dearest, .. } => out_of_reach(budget, bpw(cheapest), bpw(dearest)),
        source => CalibError::Quantize { layer: 0, module: "(--bpw allocation)".into(), source },
    })?;
    let mut specs = BTreeMap::new();
    for (l, &k) in table.linears.iter().zip(&a.choice) {
        let kind = LinearKind::from_short(&l.module)
            .ok_or_else(|| CalibError::Invalid(format!("damage table: unknown module '{}'", l.module)))?;
        let c = &l.candidates[k];
        let spec = QuantSpec {
            bits: c.bits,
            group: Some(c.group),
            axis: c.axis,
            zero: if c.min { Zero::Float } else { zero },
        };
        specs.insert((l.layer, kind.short()), spec);
    }
    Ok(Plan { specs, bpw: bpw(a.bytes), damage: a.damage })
}
