//! `quantize --rotate-search K`: the model quantized under K rotations of its residual stream
//! (seeds `--rotate`, `--rotate` + 1, ...), and the one whose quantized model has the lowest
//! perplexity on the calibration text kept. A random rotation's draw moves the quantized model
//! about as much as the calibration draw does; the calibration text (never an evaluation text)
//! tells the draws apart.

use crate::args::{DimArg, MethodArg, QuantSettings};
use crate::cmd::eval::run_ppl;
use crate::cmd::quantize::{family_of, quantize_config, refuse_existing, run_quantize_resumable};
use adadim_calibrate::{Format, Report, Summary};
use adadim_eval::datasets::Dataset;
use adadim_load::fetch::adadim_home;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Windows of the calibration text each candidate is scored on.
pub const WINDOWS: usize = 8;
/// Tokens per window (fewer when the model's context is shorter).
pub const SEQLEN: usize = 2048;
/// What the kept model's directory records of the search.
pub const FILE: &str = "rotation-search.json";

/// The search's record: every candidate's score and the one kept.
#[derive(Debug, Serialize, Deserialize)]
pub struct Search {
    /// The calibration text the candidates were scored on, and how.
    pub text: String,
    pub windows: usize,
    pub seqlen: usize,
    /// `(rotation seed, perplexity on the calibration text)` of every candidate.
    pub candidates: Vec<(u64, f64)>,
    pub chosen: u64,
}

/// Quantizes the model in `dir` once per rotation seed into `.NAME.rotations` beside `out`
/// (each run resumable, each finished one kept there until the search ends), scores each, and
/// moves the best to `out`. The rotated float copies each run made are removed once it is scored.
#[allow(clippy::too_many_arguments)]
pub fn rotate_search(
    dir: &Path,
    method: MethodArg,
    dim: DimArg,
    q: &QuantSettings,
    format: Format,
    out: &Path,
    restart: bool,
    k: u32,
) -> Result<Summary> {
    refuse_existing(out)?;
    if adadim_model::is_bert(dir) {
        anyhow::bail!("--rotate-search: {} is a BERT encoder; rotation applies to LLaMA-family models", dir.display());
    }
    let name = out.file_name().with_context(|| format!("{}: not a directory name", out.display()))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let work = parent.join(format!(".{}.rotations", name.to_string_lossy()));
    if restart && work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let text = adadim_calibrate::data::calibration_file(&q.calib, &adadim_home(), dir)?;
    let dataset = Dataset { label: format!("calibration text {}", text.display()), path: text.clone() };
    let ctx = adadim_load::Checkpoint::open(dir)?.config.max_position_embeddings;
    let seqlen = ctx.map_or(SEQLEN, |c| SEQLEN.min(c));
    let first = q.rotate.unwrap_or(0);
    let mut candidates = Vec::new();
    for seed in first..first + u64::from(k) {
        let cand = work.join(format!("seed{seed}"));
        let mut qs = q.clone();
        qs.rotate = Some(seed);
        let copy = adadim_calibrate::rotate_model::rotated_path(dir, &adadim_home().join("rotated"), seed)?;
        let made_here = !copy.exists();
        if !cand.join(Report::FILE).is_file() {
            eprintln!("--rotate-search: rotation {} of {k} (seed {seed}) into {}", seed - first + 1, cand.display());
            run_quantize_resumable(dir, method, dim, &qs, format, &cand, false)?;
        } else {
            check_same_job(&cand, dir, method, dim, &qs)?;
        }
        // The float copy this run rotated is not needed once its model is made.
        if made_here {
            let _ = std::fs::remove_dir_all(&copy);
        }
        let scored = work.join(format!("seed{seed}.ppl.json"));
        let ppl = match std::fs::read_to_string(&scored).ok().and_then(|s| serde_json::from_str::<f64>(&s).ok()) {
            Some(p) => p,
            None => {
                let p = run_ppl(&cand, &dataset, seqlen, Some(WINDOWS))?.ppl;
                std::fs::write(&scored, serde_json::to_string(&p)?)
                    .with_context(|| format!("writing {}", scored.display()))?;
                p
            }
        };
        eprintln!("--rotate-search: seed {seed}: perplexity {ppl:.4} on the calibration text");
        candidates.push((seed, ppl));
    }
    let &(chosen, best) =
        candidates.iter().min_by(|a, b| a.1.total_cmp(&b.1)).context("--rotate-search: no candidate")?;
    let kept = work.join(format!("seed{chosen}"));
    let search = Search { text: text.display().to_string(), windows: WINDOWS, seqlen, candidates, chosen };
    let record = kept.join(FILE);
    std::fs::write(&record, serde_json::to_string_pretty(&search)?)
        .with_context(|| format!("writing {}", record.display()))?;
    std::fs::rename(&kept, out).with_context(|| format!("moving {} to {}", kept.display(), out.display()))?;
    if let Err(e) = std::fs::remove_dir_all(&work) {
        eprintln!(
            "warning: removing {}: {e} (the model at {} is complete; delete that directory)",
            work.display(),
            out.display()
        );
    }
    eprintln!(
        "--rotate-search: kept seed {chosen} (perplexity {best:.4} on the calibration text); record in {}",
        out.join(FILE).display()
    );
    Ok(Report::read(out)?.summary)
}

/// A finished candidate is reused only when it was made by this job: the same source model
/// (its rotated copy's name holds the source's path, files and the seed), settings and
/// calibration.
fn check_same_job(cand: &Path, dir: &Path, method: MethodArg, dim: DimArg, q: &QuantSettings) -> Result<()> {
    let s = Report::read(cand)?.summary;
    let want = serde_json::to_value(quantize_config(method, dim, &q.for_family(family_of(dir)))?)?;
    let cache = adadim_home().join("rotated");
    let rotated = adadim_calibrate::rotate_model::rotated_path(dir, &cache, q.rotate.unwrap_or(0))?;
    let c = &s.calibration;
    if serde_json::to_value(&s.settings)? != want
        || (c.nsamples, c.seqlen, c.seed) != (q.nsamples, q.calib_seqlen, q.seed)
        || Path::new(&s.model) != rotated
    {
        anyhow::bail!(
            "{}: holds a run made with other settings or calibration; --restart starts the search over",
            cand.display()
        );
    }
    Ok(())
}
