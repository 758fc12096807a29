//! `adadim quantize`: flags to a [`QuantizeConfig`], then the resumable run
//! ([`adadim_calibrate::run_dir`]).

use crate::args::{DimArg, FormatArg, MethodArg, QuantSettings, QuantizeArgs, SelectArg, ZeroArg};
use crate::resolve::{calibration_samples, model_dir};
use anyhow::{Context, Result};
use std::path::PathBuf;

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let dir = model_dir(&a.job.model.model)?;
    let format = match a.format {
        FormatArg::Packed => adadim_calibrate::Format::Packed,
        FormatArg::F32 => adadim_calibrate::Format::F32,
        FormatArg::F16 => adadim_calibrate::Format::F16,
        FormatArg::Gptq => adadim_calibrate::Format::Gptq,
    };
    let summary = run_quantize_resumable(&dir, a.job.method, a.job.dim, &a.job.settings, format, &a.out, a.restart)?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "{}: {} of {} linears per-IC, {:.1} s; report in {}",
            a.out.display(),
            summary["per_ic"],
            summary["linears"],
            summary["seconds"].as_f64().unwrap_or(0.0),
            a.out.join("report.json").display()
        );
    }
    Ok(())
}

/// Quantize the checkpoint in `dir` into the new directory `out`; see [`run_quantize_resumable`].
pub fn run_quantize(dir: &std::path::Path, method: MethodArg, dim: DimArg, q: &QuantSettings, format: adadim_calibrate::Format, out: &std::path::Path) -> Result<serde_json::Value> {
    run_quantize_resumable(dir, method, dim, q, format, out, false)
}

/// Quantize the checkpoint in `dir` into the new directory `out`. Returns the report's summary.
///
/// The work happens in `.NAME.partial` beside `out` ([`adadim_calibrate::WorkDir`]): every
/// finished block is saved there, so a run cut short continues after its last finished block
/// when run again with the same settings and inputs (`restart`: start over instead), and gives
/// the same bytes as a run never interrupted. The finished model is assembled in
/// `.NAME.partial/model` and renamed to `out`: nothing at `out` is ever incomplete.
pub fn run_quantize_resumable(dir: &std::path::Path, method: MethodArg, dim: DimArg, q: &QuantSettings, format: adadim_calibrate::Format, out: &std::path::Path, restart: bool) -> Result<serde_json::Value> {
    let cfg = quantize_config(method, dim, q)?;
    if std::fs::symlink_metadata(out).is_ok() {
        anyhow::bail!("{}: output directory already exists; remove it or choose another", out.display());
    }
    if adadim_model::is_packed(dir) {
        anyhow::bail!("{}: this model is already quantized (an adadim packed checkpoint); quantize the original model", dir.display());
    }
    if format == adadim_calibrate::Format::Gptq && (!matches!(dim, DimArg::Oc) || !q.ic_modules.is_empty()) {
        anyhow::bail!("--format gptq: the GPTQ layout holds per-OC groups only; use --dim oc (without --ic-modules), or the packed format for per-IC / AdaDim models");
    }
    let start = std::time::Instant::now();
    let ckpt = adadim_load::Checkpoint::open(dir)?;
    ckpt.check_all_finite()?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    crate::limits::check_calibration(&ckpt.config, q.nsamples, q.calib_seqlen, parent)?;
    let (calib_file, samples) = calibration_samples(dir, &q.calib, q.nsamples, q.calib_seqlen, q.seed)?;

    // The source's identity, for the packed file's metadata and the job's.
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")).collect();
    files.sort();
    let mut source = serde_json::Map::new();
    for f in &files {
        source.insert(f.file_name().unwrap_or_default().to_string_lossy().into(), adadim_load::fetch::sha256_file(f)?.into());
    }
    let tool = format!("adadim {}", env!("CARGO_PKG_VERSION"));
    let metadata = serde_json::json!({
        "tool": &tool,
        "settings": &cfg,
        "calibration": {"source": calib_file.display().to_string(), "nsamples": q.nsamples, "seqlen": q.calib_seqlen, "seed": q.seed},
        "source_model": {"dir": dir.display().to_string(), "sha256": &source},
    });
    // What makes two runs the same job: the inputs by content (not by path), every setting.
    let tokens: Vec<u8> = samples.iter().flat_map(|s| s.iter().flat_map(|t| t.to_le_bytes()).chain(u32::MAX.to_le_bytes())).collect();
    let job = serde_json::json!({
        "tool": &tool,
        "settings": &cfg,
        "gptq": &cfg.gptq,
        "format": format,
        "calibration": {"nsamples": q.nsamples, "seqlen": q.calib_seqlen, "seed": q.seed, "tokens_sha256": adadim_load::fetch::sha256_hex(&tokens)},
        "source_model": {"sha256": &source, "config_sha256": adadim_load::fetch::sha256_file(&dir.join("config.json"))?},
    });

    let work_dir = parent.join(adadim_load::state_dir::work_name(out, ".partial"));
    let mut work = adadim_calibrate::WorkDir::open(&work_dir, job, restart)?;
    let layers = ckpt.config.num_hidden_layers;
    let resumed = work.done();
    if resumed >= layers {
        eprintln!("{}: all {layers} blocks were finished by an interrupted run; resuming at writing the output", work_dir.display());
    } else if resumed > 0 {
        eprintln!("{}: resuming at block {} of {layers} ({resumed} finished by an interrupted run)", work_dir.display(), resumed + 1);
    }
    let staging = work_dir.join("model");
    let result = (|| -> Result<serde_json::Value> {
        work.state().remove("model")?;
        std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let mut bar = crate::progress::Bar::new("quantize", layers);
        bar.update(resumed, layers);
        // Test hooks: stop (abort) or wait to be killed once N blocks are saved.
        let hook = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
        let (abort_after, pause_after) = (hook("ADADIM_TEST_ABORT_AFTER_BLOCK"), hook("ADADIM_TEST_PAUSE_AFTER_BLOCK"));
        let output = adadim_calibrate::Output { path: &staging.join("model.safetensors"), format, metadata };
        let run = adadim_calibrate::quantize_model_resumable(&ckpt, &samples, &cfg, &output, &mut work, &mut |d, t| {
            bar.update(d, t);
            if abort_after == Some(d) {
                std::process::abort();
            }
            if pause_after == Some(d) {
                std::thread::sleep(std::time::Duration::from_secs(300));
                std::process::abort();
            }
        })?;
        let reports = run.linears;
        bar.finish();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            if dir.join(f).exists() {
                std::fs::copy(dir.join(f), staging.join(f)).with_context(|| format!("copying {f}"))?;
            }
        }
        // A dequantized export declares the dtype it holds (HF loaders read torch_dtype).
        let torch_dtype = match format {
            adadim_calibrate::Format::F16 => Some("float16"),
            adadim_calibrate::Format::F32 => Some("float32"),
            _ => None,
        };
        if let Some(dt) = torch_dtype {
            let path = staging.join("config.json");
            let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{}: not JSON", path.display()))?;
            c["torch_dtype"] = dt.into();
            std::fs::write(&path, serde_json::to_string_pretty(&c)?)?;
        }
        let summary = serde_json::json!({
            "model": dir.display().to_string(),
            "settings": &cfg,
            "format": format,
            "calibration": {"source": calib_file.display().to_string(), "nsamples": q.nsamples, "seqlen": q.calib_seqlen, "seed": q.seed},
            "linears": reports.len(),
            "per_ic": reports.iter().filter(|r| r.axis == "ic").count(),
            "seconds": work.earlier_seconds() + start.elapsed().as_secs_f64(),
            "timings": run.timings,
            "peak_rss_mb": peak_rss_mb(),
        });
        if format == adadim_calibrate::Format::Gptq {
            let qc = adadim_pack::gptq::quantize_config(q.bits, (q.group > 0).then_some(q.group), q.act_order, q.static_groups, q.percdamp);
            std::fs::write(staging.join("quantize_config.json"), serde_json::to_string_pretty(&qc)?)?;
        }
        let report = serde_json::json!({"summary": summary, "linears": reports});
        std::fs::write(staging.join("report.json"), serde_json::to_string_pretty(&report)?)?;
        adadim_calibrate::input_rms::write(&staging.join(adadim_calibrate::input_rms::FILE), &reports)?;
        for e in std::fs::read_dir(&staging)? {
            std::fs::File::open(e?.path()).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", staging.display()))?;
        }
        Ok(summary)
    })();
    match result {
        Ok(summary) => {
            work.state().move_out("model", out).with_context(|| format!("moving the result to {}", out.display()))?;
            if let Err(e) = work.remove() {
                eprintln!("warning: {e} (the model at {} is complete; delete that directory)", out.display());
            }
            Ok(summary)
        }
        Err(e) if work.done() == 0 => {
            let _ = work.remove();
            Err(e)
        }
        Err(e) => {
            eprintln!("{}: the {} finished blocks are kept; the same command continues from there (--restart starts over)", work_dir.display(), work.done());
            Err(e)
        }
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The driver's settings from the command line.
pub fn quantize_config(method: MethodArg, dim: DimArg, q: &QuantSettings) -> Result<adadim_calibrate::QuantizeConfig> {
    use adadim_calibrate::{Dim, Method, QuantizeConfig, Select};
    use adadim_quantize::{Axis, GptqOptions, QuantSpec, Zero};
    let spec = QuantSpec {
        bits: q.bits,
        group: (q.group > 0).then_some(q.group),
        axis: Axis::Oc,
        zero: match q.zero {
            ZeroArg::Awq => Zero::Awq,
            ZeroArg::Gptq => Zero::Gptq,
            ZeroArg::Sym => Zero::Sym,
        },
    };
    spec.validate().context("--bits / --group")?;
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
        gptq: GptqOptions { percdamp: q.percdamp, ..GptqOptions::default() },
        act_order: q.act_order,
        static_groups: q.static_groups,
        ic_modules: q.ic_modules.clone(),
        act_cache_bytes: adadim_calibrate::ACT_CACHE_BYTES,
    };
    cfg.gptq.validate().context("--percdamp")?;
    Ok(cfg)
}
