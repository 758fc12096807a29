//! Quantizing an encoder (BERT, sentence-transformers' layout) layer by layer: each of the six
//! linears goes through the same per-linear quantizer as the decoder's
//! ([`QuantizeConfig::quantize_linear`]: RTN / GPTQ, oc / ic / ada, the scale search, the refit),
//! on the Hessian of its inputs in the model quantized so far (true-sequential:
//! query/key/value -> attention output -> intermediate -> output), over batches of calibration
//! samples with padding left out. The linears take the decoder's names for `--ic-modules`:
//! q, k, v, o (attention output), up (intermediate), down (output). `--qep` runs the float
//! model's stream beside it and corrects each linear for the drift of its inputs; `--bpw`
//! chooses each linear's layout from the float encoder's damage table
//! ([`crate::encoder_damage`]).

use std::path::Path;
use std::time::Instant;

use adadim_load::safetensors_out::DenseDtype;
use adadim_model::{Bert, LinearKind, Padded, Weight};
use adadim_quantize::{Correction, Drift, Hessian, QuantizedMatrix};
use candle_core::Tensor;

use crate::damage::AllocationSummary;
use crate::driver::{tensor_err, to_vec, AdaError, LinearReport, QuantizeConfig, Select, Timings};
use crate::error::{CalibError, Result};
use crate::output::{Format, Output, Writer};
use crate::run_dir::{CalibrationInfo, Report, Summary};

/// The six linears of a BERT layer: name inside `encoder.layer.{i}.`, and the decoder kind
/// whose settings it takes.
pub const LINEARS: [(&str, LinearKind); 6] = [
    ("attention.self.query", LinearKind::Q),
    ("attention.self.key", LinearKind::K),
    ("attention.self.value", LinearKind::V),
    ("attention.output.dense", LinearKind::O),
    ("intermediate.dense", LinearKind::Up),
    ("output.dense", LinearKind::Down),
];

/// A quantized encoder: each linear's full name (without `.weight`) and matrix, the reports and
/// where the time went.
pub struct EncoderRun {
    pub quantized: Vec<(String, QuantizedMatrix)>,
    pub linears: Vec<LinearReport>,
    pub timings: Timings,
    /// `--bpw`: what the allocation chose overall.
    pub allocation: Option<AllocationSummary>,
}

/// What the encoder path cannot do (yet), refused before any work.
fn check(cfg: &QuantizeConfig) -> Result<()> {
    let refuse = |what: &str| Err(CalibError::Invalid(format!("{what} is not available for BERT models")));
    if cfg.awq {
        // AWQ scales a linear's inputs and folds the inverse into what produces them; a post-LN
        // BERT's LayerNorm output feeds the residual as well as query/key/value and intermediate.
        return refuse(
            "--awq (its input scales fold into what produces the inputs; in a post-LN BERT the LayerNorm before \
             query/key/value and intermediate also feeds the residual stream, so only value -> attention output could fold)",
        );
    }
    if let Some(alpha) = cfg.qep {
        if !(0.0..=1.0).contains(&alpha) {
            return Err(CalibError::Invalid(format!("--qep {alpha}: alpha must lie in [0, 1]")));
        }
    }
    if cfg.ada_error == AdaError::Block {
        return refuse("--ada-error block");
    }
    if let Some(b) = &cfg.budget {
        b.validate()?;
        if !cfg.ic_modules.is_empty() || cfg.select == Select::Gptq {
            return Err(CalibError::Invalid(
                "--bpw chooses each linear's axis from its table: it does not combine with --ic-modules or --select gptq"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Quantizes every linear of `bert` in place (each replaced by its dequantized weights as soon as
/// it is done, so later inputs come from the quantized model), calibrated on `samples` (token
/// ids with their [CLS] / [SEP]) in batches of `batch`. `progress(layers_done, layers)`.
pub fn quantize_encoder(
    bert: &mut Bert,
    samples: &[Vec<u32>],
    cfg: &QuantizeConfig,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EncoderRun> {
    check(cfg)?;
    if samples.is_empty() || batch == 0 {
        return Err(CalibError::Invalid("the encoder needs at least one calibration sample and a batch of 1".into()));
    }
    let mut times = Timings::default();
    let t0 = Instant::now();
    let mut streams: Vec<(Padded, Tensor)> =
        samples.chunks(batch).map(|b| bert.start(b)).collect::<std::result::Result<_, _>>()?;
    times.forward_s += t0.elapsed().as_secs_f64();
    // `--bpw`: the float encoder's damage table, then one layout per linear under the budget.
    let planned;
    let (cfg, table) = match &cfg.budget {
        None => (cfg, None),
        Some(budget) => {
            let how = (cfg.spec.zero, cfg.search, crate::damage::permuted(cfg));
            let table = crate::encoder_damage::measure_encoder(bert, samples, batch, budget, how)?;
            let plan = crate::damage::plan(&table, budget, cfg.spec.zero)?;
            planned = QuantizeConfig { layouts: plan.specs.clone(), ..cfg.clone() };
            (&planned, Some((table, plan, budget)))
        }
    };
    // `--qep`: the float model beside the one being quantized (a copy of its handles: quantizing
    // replaces a linear's weight tensor, never writes into it) and its stream.
    let mut float = cfg.qep.map(|alpha| FloatSide {
        alpha,
        percdamp: cfg.gptq.percdamp,
        bert: bert.clone(),
        xs: streams.iter().map(|(_, x)| x.clone()).collect(),
    });
    let mut acc = Acc { cfg, quantized: Vec::new(), reports: Vec::new(), times };
    let layers = bert.layers.len();
    for i in 0..layers {
        let attention = Sublayer {
            what: "attention",
            first: &LINEARS[..3],
            last: &LINEARS[3..4],
            inner: &|b, p, x| b.attention(i, p, x),
            residual: &|b, x, a| b.attn_residual(i, x, a),
        };
        acc.sublayer(bert, i, &attention, &mut streams, float.as_mut())?;
        let ffn = Sublayer {
            what: "feed-forward",
            first: &LINEARS[4..5],
            last: &LINEARS[5..],
            inner: &|b, _, x| b.ffn_hidden(i, x),
            residual: &|b, x, f| b.ffn_residual(i, x, f),
        };
        acc.sublayer(bert, i, &ffn, &mut streams, float.as_mut())?;
        progress(i + 1, layers);
    }
    let allocation = match table {
        Some((table, plan, budget)) => {
            let short_of = |m: &str| LINEARS.iter().find(|(n, _)| *n == m).map(|(_, k)| k.short());
            crate::damage::annotate(&mut acc.reports, &table, budget, &cfg.layouts, &short_of)?;
            Some(AllocationSummary {
                bpw: plan.bpw,
                damage: plan.damage,
                table_samples: table.samples,
                table_s: table.seconds,
            })
        }
        None => None,
    };
    Ok(EncoderRun { quantized: acc.quantized, linears: acc.reports, timings: acc.times, allocation })
}

/// `f(k)` for each of the `n` calibration batches (timed as forward passes).
fn each_batch(
    n: usize,
    times: &mut Timings,
    what: &str,
    f: &dyn Fn(usize) -> candle_core::Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let t = Instant::now();
    let out = (0..n).map(|k| f(k).map_err(|e| tensor_err(what.to_string(), e))).collect();
    times.forward_s += t.elapsed().as_secs_f64();
    out
}

/// The Hessian of `inputs` (one tensor per batch of `streams`) of layer `layer`'s linear
/// `module` (and any that share them), real tokens only.
pub(crate) fn hessian(
    streams: &[(Padded, Tensor)],
    (layer, module): (usize, &str),
    inputs: &[Tensor],
    times: &mut Timings,
) -> Result<Hessian> {
    let t = Instant::now();
    let mut h: Option<Hessian> = None;
    for ((p, _), y) in streams.iter().zip(inputs) {
        let y = p.real_rows(y).map_err(|e| tensor_err("calibration tokens".into(), e))?;
        let h = h.get_or_insert_with(|| Hessian::new(y.dims()[1]));
        h.add_batch(&to_vec(&y)?).map_err(|source| CalibError::Quantize {
            layer,
            module: format!("{module} inputs"),
            source,
        })?;
    }
    times.hessian_s += t.elapsed().as_secs_f64();
    h.ok_or_else(|| CalibError::Invalid("no calibration batches".into()))
}

/// `--qep`: the float model and its stream (one `[tokens, hidden]` per batch), moved on through
/// each layer with the float weights.
struct FloatSide {
    alpha: f64,
    percdamp: f64,
    bert: Bert,
    xs: Vec<Tensor>,
}

impl FloatSide {
    /// The correction of a linear whose inputs are `float` in the float model and `quantized`
    /// in the model quantized so far (per batch; real tokens only), against its Hessian `h`.
    fn correction(
        &self,
        streams: &[(Padded, Tensor)],
        (layer, module): (usize, &str),
        h: &Hessian,
        float: &[Tensor],
        quantized: &[Tensor],
        times: &mut Timings,
    ) -> Result<Correction> {
        let t = Instant::now();
        let err = |what: &str| {
            let module = format!("{module} {what}");
            move |source| CalibError::Quantize { layer, module, source }
        };
        let mut d = Drift::new(h.dim());
        for ((p, _), (f, q)) in streams.iter().zip(float.iter().zip(quantized)) {
            let real = |x: &Tensor| p.real_rows(x).map_err(|e| tensor_err("calibration tokens".into(), e));
            d.add_batch(&to_vec(&real(f)?)?, &to_vec(&real(q)?)?).map_err(err("inputs"))?;
        }
        let c = Correction::new(h, &d, self.alpha, self.percdamp).map_err(err("(error propagation)"));
        times.hessian_s += t.elapsed().as_secs_f64();
        c
    }
}

/// What the layers' quantization collects: the matrices, their reports and the time.
struct Acc<'a> {
    cfg: &'a QuantizeConfig,
    quantized: Vec<(String, QuantizedMatrix)>,
    reports: Vec<LinearReport>,
    times: Timings,
}

/// One sublayer of an encoder layer: `first` quantized on the stream entering it, `inner`
/// (the input of `last`) computed with them quantized, `last` quantized on it, then the
/// stream moved on by `residual(x, inner)`.
struct Sublayer<'a> {
    what: &'static str,
    first: &'a [(&'static str, LinearKind)],
    last: &'a [(&'static str, LinearKind)],
    inner: &'a dyn Fn(&Bert, &Padded, &Tensor) -> candle_core::Result<Tensor>,
    residual: &'a dyn Fn(&Bert, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
}

impl Acc<'_> {
    /// Quantizes sublayer `s` of layer `i` and moves the streams (and `--qep`'s float one,
    /// through the float weights) past it.
    fn sublayer(
        &mut self,
        bert: &mut Bert,
        i: usize,
        s: &Sublayer<'_>,
        streams: &mut [(Padded, Tensor)],
        float: Option<&mut FloatSide>,
    ) -> Result<()> {
        let (n, what) = (streams.len(), |w: &str| format!("encoder layer {i}: {w}"));
        let inputs: Vec<Tensor> = streams.iter().map(|(_, x)| x.clone()).collect();
        self.stage(bert, i, s.first, streams, &inputs, float.as_deref().map(|f| (f, &f.xs[..])))?;
        drop(inputs);
        let st = &*streams;
        let inner = each_batch(n, &mut self.times, &what(s.what), &|k| (s.inner)(bert, &st[k].0, &st[k].1))?;
        let float_inner = match &float {
            Some(f) => Some(each_batch(n, &mut self.times, &what(&format!("float {}", s.what)), &|k| {
                (s.inner)(&f.bert, &st[k].0, &f.xs[k])
            })?),
            None => None,
        };
        self.stage(bert, i, s.last, streams, &inner, float.as_deref().zip(float_inner.as_deref()))?;
        if let (Some(f), Some(fi)) = (float, &float_inner) {
            let (fb, fx) = (&f.bert, &f.xs);
            let next = each_batch(n, &mut self.times, &what(&format!("float {} residual", s.what)), &|k| {
                (s.residual)(fb, &fx[k], &fi[k])
            })?;
            f.xs = next;
        }
        let st = &*streams;
        let next = each_batch(n, &mut self.times, &what(&format!("{} residual", s.what)), &|k| {
            (s.residual)(bert, &st[k].1, &inner[k])
        })?;
        streams.iter_mut().zip(next).for_each(|((_, x), n)| *x = n);
        Ok(())
    }

    /// One stage of layer `i`: the Hessian of `inputs` (per batch of `streams`), `--qep`'s
    /// correction against the float stream's inputs of the stage, then each of `linears`.
    fn stage(
        &mut self,
        bert: &mut Bert,
        i: usize,
        linears: &[(&'static str, LinearKind)],
        streams: &[(Padded, Tensor)],
        inputs: &[Tensor],
        float: Option<(&FloatSide, &[Tensor])>,
    ) -> Result<()> {
        let h = hessian(streams, (i, linears[0].0), inputs, &mut self.times)?;
        let corr = match float {
            Some((f, fx)) => Some(f.correction(streams, (i, linears[0].0), &h, fx, inputs, &mut self.times)?),
            None => None,
        };
        for &(name, kind) in linears {
            self.quantize_one(bert, i, name, kind, &h, corr.as_ref())?;
        }
        Ok(())
    }

    /// Quantizes linear `name` of layer `i` (its float weights first corrected by `--qep`'s
    /// `correction`) and puts its dequantized weights into `bert`.
    fn quantize_one(
        &mut self,
        bert: &mut Bert,
        i: usize,
        name: &'static str,
        kind: LinearKind,
        h: &Hessian,
        correction: Option<&Correction>,
    ) -> Result<()> {
        let full = format!("encoder.layer.{i}.{name}");
        let linear = linear_mut(bert, i, name);
        let Weight::Dense(w) = &linear.weight else {
            return Err(CalibError::Invalid(format!("{full}: already quantized (quantize the float model)")));
        };
        let (rows, cols) = w.dims2().map_err(|e| tensor_err(full.clone(), e))?;
        let w = to_vec(w)?;
        let err = |source| CalibError::Quantize { layer: i, module: name.into(), source };
        let w = match correction {
            Some(c) => c.apply(&w, rows).map_err(err)?,
            None => w,
        };
        let (q, mut report) = self.cfg.quantize_linear(i, kind, &w, rows, cols, Some(h)).map_err(|e| match e {
            CalibError::Quantize { source, .. } => err(source),
            e => e,
        })?;
        report.module = name;
        self.times.add_linear(&report);
        let deq = Tensor::from_vec(q.dequantize(), (rows, cols), &candle_core::Device::Cpu)
            .map_err(|e| tensor_err(full.clone(), e))?;
        linear_mut(bert, i, name).weight = Weight::Dense(deq);
        self.quantized.push((full, q));
        self.reports.push(report);
        Ok(())
    }
}

pub(crate) fn linear_mut<'a>(bert: &'a mut Bert, i: usize, name: &str) -> &'a mut adadim_model::Linear {
    let l = &mut bert.layers[i];
    match name {
        "attention.self.query" => &mut l.query,
        "attention.self.key" => &mut l.key,
        "attention.self.value" => &mut l.value,
        "attention.output.dense" => &mut l.attn_out,
        "intermediate.dense" => &mut l.intermediate,
        _ => &mut l.output,
    }
}

/// Writes the quantized encoder as `out.path` (one safetensors file in `out.format`): every
/// tensor of the source `model.safetensors` in `src_dir` in its order, the quantized linears
/// from `quantized` (named with the source's `bert.` prefix where it has one).
pub fn write_encoder(src_dir: &Path, quantized: &[(String, QuantizedMatrix)], out: &Output<'_>) -> Result<()> {
    let st = src_dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu)
        .map_err(|e| CalibError::Data { path: st.clone(), msg: e.to_string() })?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let prefix = if tensors.contains_key("embeddings.word_embeddings.weight") { "" } else { "bert." };
    let plan: Vec<(String, Vec<usize>)> = names.iter().map(|n| ((*n).clone(), tensors[*n].dims().to_vec())).collect();
    let mut writer = Writer::create(out, &plan)?;
    for (name, shape) in &plan {
        let linear = name.strip_suffix(".weight").and_then(|l| {
            let l = l.strip_prefix(prefix)?;
            quantized.iter().find(|(n, _)| n == l)
        });
        match linear {
            Some((_, q)) => writer.linear(name.strip_suffix(".weight").unwrap_or(name), q)?,
            None => {
                let t = tensors[name].to_dtype(candle_core::DType::F32).map_err(|e| tensor_err(name.clone(), e))?;
                let dtype = match tensors[name].dtype() {
                    candle_core::DType::F16 => DenseDtype::F16,
                    candle_core::DType::BF16 => DenseDtype::BF16,
                    _ => DenseDtype::F32,
                };
                writer.dense(name, shape, &to_vec(&t)?, dtype)?
            }
        }
    }
    writer.finish()
}

/// A `quantize` job on an encoder directory.
pub struct EncoderJob<'a> {
    /// The sentence-transformers directory quantized, and its model loaded from it.
    pub model: &'a Path,
    pub bert: Bert,
    pub config: &'a QuantizeConfig,
    pub format: Format,
    pub calibration: CalibrationInfo,
    /// Calibration samples, each with its [CLS] / [SEP].
    pub samples: &'a [Vec<u32>],
    /// Samples per forward pass.
    pub batch: usize,
    /// `adadim 0.1.0`, written into a packed file's metadata.
    pub tool: &'a str,
    pub started: Instant,
}

/// Weight files of other frameworks a sentence-transformers directory may hold: not copied
/// (they hold the float model).
const FOREIGN_WEIGHTS: [&str; 6] = [".bin", ".h5", ".onnx", ".msgpack", ".ot", ".safetensors"];

/// Runs `job` into the new directory `out`: the quantized `model.safetensors`, the source's
/// config, tokenizer and sentence-transformers files (pooling, normalisation) copied, and
/// `report.json`. Built in a hidden sibling directory and renamed into place when complete, so
/// a failed run leaves nothing at `out`.
pub fn run_encoder_job(job: EncoderJob<'_>, out: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<Report> {
    if job.format == Format::Gptq {
        return Err(CalibError::Invalid(
            "--format gptq writes a decoder's GPTQ checkpoint; use packed, f32 or f16 for BERT models".into(),
        ));
    }
    let name = out.file_name().map_or("out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = out.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let mut bert = job.bert;
    let result = (|| {
        let run = quantize_encoder(&mut bert, job.samples, job.config, job.batch, progress)?;
        let t = Instant::now();
        let metadata = serde_json::json!({"tool": job.tool, "settings": job.config, "architecture": "bert"});
        let output = Output { path: &tmp.join("model.safetensors"), format: job.format, metadata };
        write_encoder(job.model, &run.quantized, &output)?;
        copy_side_files(job.model, &tmp)?;
        let mut timings = run.timings;
        timings.io_s += t.elapsed().as_secs_f64();
        let per_ic = run.linears.iter().filter(|r| r.axis == adadim_quantize::Axis::Ic).count();
        let report = Report {
            summary: Summary {
                model: job.model.display().to_string(),
                settings: job.config.clone(),
                format: job.format,
                calibration: job.calibration.clone(),
                linears: run.linears.len(),
                per_ic,
                seconds: job.started.elapsed().as_secs_f64(),
                timings,
                peak_rss_mb: crate::run_dir::peak_rss_mb(),
                allocation: run.allocation,
            },
            linears: run.linears,
        };
        let path = tmp.join(Report::FILE);
        std::fs::write(&path, report.to_json()).map_err(io_err(&path))?;
        Ok(report)
    })();
    match result {
        Ok(report) => {
            std::fs::rename(&tmp, out).map_err(io_err(out))?;
            Ok(report)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Copies the files of `src` (and of its module subdirectories, such as `1_Pooling`) into
/// `dst`, except the weights.
fn copy_side_files(src: &Path, dst: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let (path, name) = (entry.path(), entry.file_name().to_string_lossy().into_owned());
        let kind = entry.file_type().map_err(io_err(&path))?;
        if kind.is_file() && !FOREIGN_WEIGHTS.iter().any(|ext| name.ends_with(ext)) {
            std::fs::copy(&path, dst.join(&name)).map_err(io_err(&path))?;
        } else if kind.is_dir() && path.join("config.json").is_file() && !name.starts_with('.') {
            std::fs::create_dir(dst.join(&name)).map_err(io_err(&dst.join(&name)))?;
            copy_side_files(&path, &dst.join(&name))?;
        }
    }
    Ok(())
}

/// An I/O error's mapping, naming `path`.
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CalibError {
    let path = path.to_path_buf();
    move |source| CalibError::Io { path, source }
}
