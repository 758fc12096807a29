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
    // An AWQ run quantized `W diag(s)` on scaled inputs: a re-run on the checkpoint's W is not it.
    let updates = if a.no_updates || run.summary.settings.awq {
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
    let opts = adadim_report::page::PageOptions { layer, updates: updates.as_ref(), command };
    let page = adadim_report::page::write_page(&run, &out, &opts)?;
    println!("{} ({} figures)", page.index.display(), page.images.len());
    Ok(())
}
