//! `adadim report`: read a run, re-run GPTQ on one linear for the update figure (unless
//! `--no-updates`), and write the page (`adadim_report` does the work).

use anyhow::{Context, Result};

use crate::args::ReportArgs;
use crate::progress;
use crate::resolve::calibration_samples;

pub fn report(a: ReportArgs) -> Result<()> {
    let run = adadim_report::Run::open(&a.run_dir)?;
    let layers = run.layers();
    let layer = a.layer.unwrap_or(layers - 1);
    if layer >= layers {
        anyhow::bail!("--layer {layer}: {} has blocks 0..={}", a.run_dir.display(), layers - 1);
    }
    let kind = crate::resolve::module_arg(&a.module)?;
    let model = std::path::Path::new(&run.summary.model);
    let encoder = adadim_model::is_bert(model);
    let outliers = if encoder { Some(encoder_outliers(&run)?) } else { None };
    // An AWQ run quantized `W diag(s)` on scaled inputs: a re-run on the checkpoint's W is not it.
    let updates = if a.no_updates || run.summary.settings.awq || encoder {
        None
    } else {
        let s = &run.summary;
        let c = &s.calibration;
        let skip = "for the GPTQ-update figure (--no-updates skips it)";
        let (_, samples) = calibration_samples(std::path::Path::new(&s.model), &c.source, c.nsamples, c.seqlen, c.seed)
            .with_context(|| format!("rebuilding the run's calibration samples {skip}"))?;
        let mut bar = progress::Bar::new("report", layer + 1);
        let u = adadim_report::updates::compute(&run, &samples, layer, kind, &mut |d, t| bar.update(d, t))
            .with_context(|| format!("re-running GPTQ {skip}"))?;
        bar.finish();
        Some(u)
    };
    let out = a.out.clone().unwrap_or_else(|| a.run_dir.join("report"));
    let command = std::iter::once("adadim".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
    let opts =
        adadim_report::page::PageOptions { layer, updates: updates.as_ref(), outliers: outliers.as_deref(), command };
    let page = adadim_report::page::write_page(&run, &out, &opts)?;
    println!("{} ({} figures)", page.index.display(), page.images.len());
    Ok(())
}

/// Samples the float encoder's outliers are gathered on: the run's first calibration samples.
const OUTLIER_SAMPLES: usize = 16;

/// An encoder run's activation outliers, on its float source model and calibration text.
fn encoder_outliers(run: &adadim_report::Run) -> Result<Vec<adadim_report::outliers::LayerOutliers>> {
    let s = &run.summary;
    let (model, c) = (std::path::Path::new(&s.model), &s.calibration);
    let bert = adadim_model::Bert::load(model)
        .with_context(|| format!("loading the run's float model {} for the outlier figure", model.display()))?;
    let n = c.nsamples.min(OUTLIER_SAMPLES);
    let (_, _, samples) =
        crate::resolve::encoder_calibration_samples(model, &c.source, n, c.seqlen, bert.max_seq_length, c.seed)
            .context("rebuilding the run's calibration samples for the outlier figure")?;
    let tok = adadim_load::tokenizer::load(model)?;
    let name = |id: u32| tok.id_to_token(id).unwrap_or_else(|| format!("#{id}"));
    Ok(adadim_report::outliers::compute(&bert, &samples, &name)?)
}
