//! `adadim bench scale`: quantize checkpoints of growing shapes (synthetic ones from `adadim
//! synth`) and report the peak resident memory and the time per decoder block, to show that
//! memory follows one block, not the model. Each model runs in its own `adadim quantize`
//! process, so each peak is that run's alone.

use crate::args::BenchScaleArgs;
use anyhow::{Context, Result};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct ScaleRow {
    pub name: String,
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub checkpoint_bytes: u64,
    /// f32 bytes of one block's linears (what the driver holds per block at least).
    pub block_f32_bytes: usize,
    pub seconds: f64,
    pub peak_rss_mb: f64,
}

/// Bytes of the `*.safetensors` files in `dir`.
pub fn checkpoint_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            total += std::fs::metadata(&p)?.len();
        }
    }
    Ok(total)
}

/// Quantize `model` with `quant_args` in a child process (output in `scratch`, removed after)
/// and read its summary.
pub fn run_one(model: &Path, quant_args: &[String], scratch: &Path) -> Result<ScaleRow> {
    let cfg = adadim_load::LlamaConfig::from_file(&model.join("config.json"))?;
    let out = scratch.join(format!("scale-{}", model.file_name().unwrap_or_default().to_string_lossy()));
    if std::fs::symlink_metadata(&out).is_ok() {
        anyhow::bail!("{}: already exists; remove it (this bench writes its scratch models there)", out.display());
    }
    let exe = std::env::current_exe().context("locating the adadim binary")?;
    let child = Command::new(&exe)
        .arg("quantize")
        .arg("--model")
        .arg(model)
        .args(quant_args)
        .arg("--out")
        .arg(&out)
        .arg("--json")
        .output()
        .with_context(|| format!("running {} quantize", exe.display()))?;
    if child.status.success() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
        // written by the child
    }
    if !child.status.success() {
        anyhow::bail!(
            "quantizing {} failed ({}): {}",
            model.display(),
            child.status,
            String::from_utf8_lossy(&child.stderr)
        );
    }
    let s: serde_json::Value = serde_json::from_slice(&child.stdout)
        .with_context(|| format!("{}: quantize --json printed no JSON", model.display()))?;
    Ok(ScaleRow {
        name: model.file_name().unwrap_or_default().to_string_lossy().into(),
        layers: cfg.num_hidden_layers,
        hidden: cfg.hidden_size,
        ffn: cfg.intermediate_size,
        checkpoint_bytes: checkpoint_bytes(model)?,
        block_f32_bytes: 4 * cfg.linear_params_per_block(),
        seconds: s["seconds"].as_f64().unwrap_or(f64::NAN),
        peak_rss_mb: s["peak_rss_mb"].as_f64().unwrap_or(f64::NAN),
    })
}

pub fn table(rows: &[ScaleRow], settings: &str, md: &mut String) -> Result<()> {
    writeln!(md, "{settings}. Peak RSS is the quantize process's own (`VmHWM`: mapped checkpoint pages it still holds included).\n")?;
    writeln!(md, "| checkpoint | blocks | d / ffn | checkpoint GB | one block's linears in f32, MB | seconds / block | peak RSS MB | peak RSS / checkpoint |")?;
    writeln!(md, "|---|---|---|---|---|---|---|---|")?;
    for r in rows {
        writeln!(
            md,
            "| {} | {} | {} / {} | {:.2} | {:.0} | {:.1} | {:.0} | {:.2} |",
            r.name,
            r.layers,
            r.hidden,
            r.ffn,
            r.checkpoint_bytes as f64 / 1e9,
            r.block_f32_bytes as f64 / 1e6,
            r.seconds / r.layers as f64,
            r.peak_rss_mb,
            r.peak_rss_mb * 1e6 / r.checkpoint_bytes as f64
        )?;
    }
    Ok(())
}

/// The models to run: each given directory.
pub fn models(list: &[PathBuf]) -> Result<Vec<PathBuf>> {
    list.iter()
        .map(|d| {
            if d.join("config.json").exists() {
                Ok(d.clone())
            } else {
                anyhow::bail!("{}: not a model directory (make one with `adadim synth`)", d.display())
            }
        })
        .collect()
}

pub fn bench_scale(a: BenchScaleArgs) -> Result<()> {
    use std::fmt::Write;
    let models = models(&a.models)?;
    let scratch = a
        .scratch
        .clone()
        .unwrap_or_else(|| models[0].parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")));
    let args: Vec<String> = [
        "--method",
        "gptq",
        "--dim",
        "ada",
        "--bits",
        "3",
        "--group",
        "128",
        "--nsamples",
        &a.nsamples.to_string(),
        "--calib-seqlen",
        &a.calib_seqlen.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut rows = Vec::new();
    for m in &models {
        eprintln!("quantizing {} ...", m.display());
        let r = run_one(m, &args, &scratch)?;
        eprintln!("  {:.1} s, peak RSS {:.0} MB", r.seconds, r.peak_rss_mb);
        rows.push(r);
    }
    let mut md = String::new();
    writeln!(md, "## Memory and time by model size (`adadim bench scale`)\n")?;
    writeln!(md, "Machine: {}.\n", super::machine())?;
    let settings = format!("GPTQ-ada w3g128, calibration {} x {} Shakespeare tokens, packed output; random-weight f16 checkpoints from `adadim synth` (real shapes; `--layers` keeps fewer blocks of the same shape)", a.nsamples, a.calib_seqlen);
    table(&rows, &settings, &mut md)?;
    super::publish(&a.write, "scale", &md)
}
