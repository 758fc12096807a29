//! `adadim quantize`: flags to a [`QuantizeConfig`], then the resumable run
//! ([`adadim_calibrate::run_dir`]).

use crate::args::{
    AdaErrorArg, DamageArg, DimArg, FormatArg, MethodArg, QuantSettings, QuantizeArgs, ScaleSearchArg, SelectArg,
    ZeroArg,
};
use crate::resolve::{calibration_samples, model_dir};
use adadim_calibrate::{CalibrationInfo, Format, Job, Report, RunDir, Summary};
use anyhow::{Context, Result};
use std::path::Path;

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let dir = model_dir(&a.job.model.model)?;
    let format = match a.format {
        FormatArg::Packed => Format::Packed,
        FormatArg::F32 => Format::F32,
        FormatArg::F16 => Format::F16,
        FormatArg::Gptq => Format::Gptq,
    };
    let summary = match a.rotate_search {
        Some(k) => crate::cmd::rotate_search::rotate_search(
            &dir,
            a.job.method,
            a.job.dim,
            &a.job.settings,
            format,
            &a.out,
            a.restart,
            k,
        )?,
        None => run_quantize_resumable(&dir, a.job.method, a.job.dim, &a.job.settings, format, &a.out, a.restart)?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&serde_json::to_value(&summary)?)?);
    } else {
        println!(
            "{}: {} of {} linears per-IC, {:.1} s; report in {}",
            a.out.display(),
            summary.per_ic,
            summary.linears,
            summary.seconds,
            a.out.join(Report::FILE).display()
        );
    }
    Ok(())
}

/// Quantize the checkpoint in `dir` into the new directory `out`; see [`run_quantize_resumable`].
pub fn run_quantize(
    dir: &Path,
    method: MethodArg,
    dim: DimArg,
    q: &QuantSettings,
    format: Format,
    out: &Path,
) -> Result<Summary> {
    run_quantize_resumable(dir, method, dim, q, format, out, false)
}

/// Quantize the checkpoint in `dir` into the new directory `out`. Returns the report's summary.
///
/// The flags are checked and the calibration samples drawn here (sizes first:
/// [`crate::limits::check_calibration`]); the run itself is [`RunDir`]'s: finished blocks are
/// saved in `.NAME.partial` beside `out`, so a run cut short continues after its last
/// finished block when run again (`restart`: start over instead), with the same bytes.
pub fn run_quantize_resumable(
    dir: &Path,
    method: MethodArg,
    dim: DimArg,
    q: &QuantSettings,
    format: Format,
    out: &Path,
    restart: bool,
) -> Result<Summary> {
    let q = &q.for_family(family_of(dir));
    let cfg = quantize_config(method, dim, q)?;
    refuse_existing(out)?;
    if adadim_model::is_packed(dir) {
        anyhow::bail!(
            "{}: this model is already quantized (an adadim packed checkpoint); quantize the original model",
            dir.display()
        );
    }
    // Rotation refuses what it cannot rotate (a BERT encoder) itself.
    let rotated;
    let dir = match q.rotate {
        Some(seed) => {
            let cache = adadim_load::fetch::adadim_home().join("rotated");
            rotated = adadim_calibrate::rotate_model::rotated_cached(dir, &cache, seed)
                .with_context(|| format!("--rotate {seed}: rotating {}", dir.display()))?;
            rotated.as_path()
        }
        None => dir,
    };
    if adadim_model::is_bert(dir) {
        return quantize_encoder(dir, &cfg, q, format, out);
    }
    if format == Format::Gptq && q.bpw.is_some() {
        anyhow::bail!("--format gptq: the GPTQ layout holds one bit width and group size for the whole model; use the packed format for --bpw models");
    }
    if format == Format::Gptq && (!matches!(dim, DimArg::Oc) || !q.ic_modules.is_empty()) {
        anyhow::bail!("--format gptq: the GPTQ layout holds per-OC groups only; use --dim oc (without --ic-modules), or the packed format for per-IC / AdaDim models");
    }
    let started = std::time::Instant::now();
    let ckpt = adadim_load::Checkpoint::open(dir)?;
    ckpt.check_all_finite()?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    crate::limits::check_calibration(&ckpt.config, q.nsamples, q.calib_seqlen, parent)?;
    if cfg.budget.is_some() {
        // The damage table's sensitivity pass runs the whole float model in memory.
        let c = &ckpt.config;
        let weights: usize = c.expected_tensors().iter().map(|(_, shape)| shape.iter().product::<usize>()).sum();
        let t = adadim_calibrate::damage::SENSITIVITY_TOKENS;
        let need = weights as f64 * 4.0 + crate::limits::forward_bytes(c, t);
        crate::limits::check_memory("--bpw", need, "the damage table's sensitivity pass (the float model in memory)")?;
    }
    let (calib_file, samples) = calibration_samples(dir, &q.calib, q.nsamples, q.calib_seqlen, q.seed)?;
    let tool = format!("adadim {}", env!("CARGO_PKG_VERSION"));
    let calibration = CalibrationInfo {
        source: calib_file.display().to_string(),
        nsamples: q.nsamples,
        seqlen: q.calib_seqlen,
        seed: q.seed,
    };
    let table_cache = adadim_load::fetch::adadim_home().join("damage-tables");
    let job = Job {
        model: dir,
        checkpoint: &ckpt,
        config: &cfg,
        format,
        calibration,
        samples: &samples,
        tool: &tool,
        started,
        table_cache: Some(&table_cache),
    };
    let run = RunDir::open(out, &job, restart)?;
    let (work_dir, layers, resumed) = (run.path().to_path_buf(), ckpt.config.num_hidden_layers, run.done());
    if resumed >= layers {
        eprintln!(
            "{}: all {layers} blocks were finished by an interrupted run; resuming at writing the output",
            work_dir.display()
        );
    } else if resumed > 0 {
        eprintln!(
            "{}: resuming at block {} of {layers} ({resumed} finished by an interrupted run)",
            work_dir.display(),
            resumed + 1
        );
    }
    if let Some(b) = &cfg.budget {
        eprintln!(
            "--bpw {}: measuring every layout's error on the float model first (reused when these inputs were measured before)",
            b.bpw
        );
    }
    let mut bar = crate::progress::Bar::new("quantize", layers);
    bar.update(resumed, layers);
    match run.run(&job, &mut |d, t| bar.update(d, t)) {
        Ok(done) => {
            bar.finish();
            if let Some(e) = done.cleanup {
                eprintln!("warning: {e} (the model at {} is complete; delete that directory)", out.display());
            }
            Ok(done.report.summary)
        }
        Err(failed) => {
            if let Some((work_dir, blocks)) = failed.kept {
                eprintln!("{}: the {blocks} finished blocks are kept; the same command continues from there (--restart starts over)", work_dir.display());
            }
            Err((*failed.error).into())
        }
    }
}

/// Refuses an `out` that exists: nothing is ever written over (what a run stopped while
/// cleaning up left beside it is removed first, with a note).
pub fn refuse_existing(out: &Path) -> Result<()> {
    if std::fs::symlink_metadata(out).is_ok() {
        if let Some(work) = RunDir::remove_leftover(out)? {
            eprintln!(
                "note: removed {}, left by the run that wrote {} when it was stopped while cleaning up",
                work.display(),
                out.display()
            );
        }
        anyhow::bail!("{}: output directory already exists; remove it or choose another", out.display());
    }
    Ok(())
}

/// The family whose defaults apply to the model in `dir`.
pub fn family_of(dir: &Path) -> crate::args::Family {
    match adadim_model::is_bert(dir) {
        true => crate::args::Family::Bert,
        false => crate::args::Family::Llama,
    }
}

/// The driver's settings from the command line.
pub fn quantize_config(method: MethodArg, dim: DimArg, q: &QuantSettings) -> Result<adadim_calibrate::QuantizeConfig> {
    use adadim_calibrate::{Dim, Method, QuantizeConfig, Select};
    use adadim_quantize::{Axis, GptqOptions, QuantSpec, Zero};
    let spec = QuantSpec {
        bits: q.bits(),
        group: (q.group() > 0).then_some(q.group()),
        axis: Axis::Oc,
        zero: match q.zero.unwrap_or(ZeroArg::Awq) {
            ZeroArg::Awq => Zero::Awq,
            ZeroArg::Gptq => Zero::Gptq,
            ZeroArg::Sym => Zero::Sym,
            ZeroArg::Float => Zero::Float,
        },
    };
    spec.validate().context("--bits / --group")?;
    if q.float_min && q.bpw.is_none() {
        anyhow::bail!(
            "--float-min lets --bpw choose float minima per linear; without --bpw use --zero float for every linear"
        );
    }
    let cfg = QuantizeConfig {
        method: match method {
            MethodArg::Rtn => Method::Rtn,
            MethodArg::Gptq => Method::Gptq,
        },
        dim: match dim {
            DimArg::Oc => Dim::Oc,
            DimArg::Ic => Dim::Ic,
            DimArg::Ada => Dim::Ada,
        },
        select: match q.select {
            SelectArg::Rtn => Select::Rtn,
            SelectArg::Gptq => Select::Gptq,
        },
        spec,
        search: match (q.scale_search, method, dim) {
            (ScaleSearchArg::Minmax, ..) | (ScaleSearchArg::Auto, MethodArg::Rtn, DimArg::Oc) => {
                adadim_quantize::ScaleSearch::MinMax
            }
            (ScaleSearchArg::Mse | ScaleSearchArg::Auto, ..) => adadim_quantize::ScaleSearch::Mse,
        },
        gptq: GptqOptions { percdamp: q.percdamp(), ..GptqOptions::default() },
        act_order: q.act_order,
        static_groups: q.static_groups,
        group_aware: q.group_aware,
        awq: q.awq,
        refit: q.refit,
        descend: q.descend as usize,
        qep: q.qep(method),
        ada_error: match q.ada_error {
            AdaErrorArg::Linear => adadim_calibrate::AdaError::Linear,
            AdaErrorArg::Block => adadim_calibrate::AdaError::Block,
        },
        ic_modules: q.ic_modules.clone(),
        act_cache_bytes: crate::limits::act_cache_bytes(),
        budget: q.bpw.map(|bpw| adadim_calibrate::damage::Budget {
            bpw,
            damage: match q.damage {
                DamageArg::Output => adadim_calibrate::damage::DamageModel::Output,
                DamageArg::Relative => adadim_calibrate::damage::DamageModel::Relative,
                DamageArg::Stream => adadim_calibrate::damage::DamageModel::Stream,
                DamageArg::Kl => adadim_calibrate::damage::DamageModel::Kl,
            },
            bits: q.bits.map_or(vec![2, 3, 4, 8], |b| vec![b]),
            groups: q.group.map_or(vec![32, 64, 128, 256], |g| vec![g]),
            axes: match dim {
                DimArg::Oc => vec![Axis::Oc],
                DimArg::Ic => vec![Axis::Ic],
                DimArg::Ada => vec![Axis::Oc, Axis::Ic],
            },
            float_min: q.float_min,
        }),
        layouts: Default::default(),
    };
    if let Some(b) = &cfg.budget {
        b.validate()?;
    }
    cfg.gptq.validate().context("--percdamp")?;
    Ok(cfg)
}

/// `quantize` on a BERT (sentence-transformers) directory: the encoder's layer walk
/// ([`adadim_calibrate::encoder`]) with the same quantizer settings, into a new directory that
/// sentence-transformers and `adadim embed` load. Runs in seconds, so it is not resumable.
fn quantize_encoder(
    dir: &Path,
    cfg: &adadim_calibrate::QuantizeConfig,
    q: &QuantSettings,
    format: Format,
    out: &Path,
) -> Result<Summary> {
    let started = std::time::Instant::now();
    let bert = adadim_model::Bert::load(dir)?;
    let layers = bert.config.num_hidden_layers;
    let (calib_file, seqlen, samples) = crate::resolve::encoder_calibration_samples(
        dir,
        &q.calib,
        q.nsamples,
        q.calib_seqlen,
        bert.max_seq_length,
        q.seed,
    )?;
    if seqlen < q.calib_seqlen {
        eprintln!("calibration samples of {seqlen} tokens (the model's max_seq_length)");
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tool = format!("adadim {}", env!("CARGO_PKG_VERSION"));
    let job = adadim_calibrate::encoder::EncoderJob {
        model: dir,
        bert,
        config: cfg,
        format,
        calibration: CalibrationInfo {
            source: calib_file.display().to_string(),
            nsamples: q.nsamples,
            seqlen,
            seed: q.seed,
        },
        samples: &samples,
        batch: 16,
        tool: &tool,
        started,
    };
    let mut bar = crate::progress::Bar::new("quantize", layers);
    let report = adadim_calibrate::encoder::run_encoder_job(job, out, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    Ok(report.summary)
}
