//! The page: every figure as an SVG file beside a `README.md` that shows them with the numbers
//! behind them (a folder that renders as a page on a code host, or in any Markdown viewer).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use adadim_calibrate::driver::axis_name;
use adadim_calibrate::Method;
use adadim_quantize::Axis;

use crate::error::{ReportError, Result};
use crate::plot::{render, Figure};
use crate::run::Run;
use crate::updates::LayerUpdates;
use crate::{allocation, errors, inputs, outliers, updates};

/// What to put on the page besides what the run holds.
pub struct PageOptions<'a> {
    /// The block whose input channels figure (b) shows.
    pub layer: usize,
    /// Figure (c), when it was computed.
    pub updates: Option<&'a LayerUpdates>,
    /// An encoder's activation outliers per layer (computed on the float model), for its run.
    pub outliers: Option<&'a [outliers::LayerOutliers]>,
    /// The command that makes this page, printed at its foot.
    pub command: String,
}

/// What [`write_page`] wrote.
#[derive(Debug, Clone)]
pub struct Page {
    pub index: PathBuf,
    pub images: Vec<PathBuf>,
}

/// Write the figures of `run` and `README.md` into `out` (created if needed; files of the same
/// names are replaced).
pub fn write_page(run: &Run, out: &Path, opts: &PageOptions<'_>) -> Result<Page> {
    if opts.layer >= run.layers() {
        return Err(ReportError::Invalid(format!(
            "--layer {}: the run has blocks 0..{}",
            opts.layer,
            run.layers().saturating_sub(1)
        )));
    }
    std::fs::create_dir_all(out).map_err(|source| ReportError::Io { path: out.to_path_buf(), source })?;
    let mut images = Vec::new();
    let mut draw = |name: String, fig: &Figure| -> Result<String> {
        render(fig, &out.join(&name))?;
        images.push(out.join(&name));
        Ok(name)
    };
    let mut md = String::new();
    header(&mut md, run);

    md.push_str("\n## Per-OC or per-IC, layer by layer (paper Fig. 6 / 10)\n\n");
    match errors::figure(run) {
        Some(fig) => {
            let img = draw("errors.svg".into(), &fig)?;
            errors_section(&mut md, run, &img);
        }
        None => md.push_str(if run.summary.settings.budget.is_some() {
            "A `--bpw` run chooses each linear's dimension with its bits and group (below), not by this comparison.\n"
        } else {
            "This run has no calibration errors to show (RTN with a fixed dimension does not calibrate).\n"
        }),
    }

    if let Some(fig) = allocation::figure(run) {
        md.push_str("\n## Bits, group and dimension per linear (`--bpw`)\n\n");
        let img = draw("allocation.svg".into(), &fig)?;
        let a = run.summary.allocation.as_ref();
        let _ = writeln!(
            md,
            "The budget chose each linear's layout from its measured candidates ({} bits per weight reached). \
             Dots: bits per linear and layer; color: per-OC (blue) or per-IC (orange); size: group (larger, smaller groups). \
             Mean bits per module: {}.\n\n![allocation]({img})",
            a.map_or("?".to_string(), |a| format!("{:.3}", a.bpw)),
            allocation::mean_bits(run).iter().map(|(m, b)| format!("{m} {b:.2}")).collect::<Vec<_>>().join(", ")
        );
    }

    md.push_str("\n## Activation outliers (paper Fig. 8)\n\n");
    match (opts.outliers, inputs::layer_figure(run, opts.layer), inputs::across_layers_figure(run)) {
        (Some(o), ..) => {
            let img = draw("outliers.svg".into(), &outliers::figure(o))?;
            outliers_section(&mut md, o, &img);
        }
        (None, Some(layer_fig), Some(across)) => {
            let a = draw(format!("inputs-block{}.svg", opts.layer), &layer_fig)?;
            let b = draw("inputs-across-blocks.svg".into(), &across)?;
            inputs_section(&mut md, run, opts.layer, &a, &b);
        }
        _ => md.push_str("This run recorded no input-channel magnitudes (it did not calibrate, or it was made before `quantize` wrote `input_rms.safetensors`).\n"),
    }

    md.push_str("\n## GPTQ's weight updates, per-OC vs per-IC (paper Fig. 7)\n\n");
    match opts.updates {
        Some(u) => {
            let img = draw(
                format!("updates-block{}-{}.svg", u.layer, u.module.rsplit('.').next().unwrap_or(u.module)),
                &updates::figure(u),
            )?;
            updates_section(&mut md, u, &img);
        }
        None if opts.outliers.is_some() => {
            md.push_str("Not made for an encoder run (the re-run follows a decoder's blocks).\n")
        }
        None if run.summary.settings.awq => md.push_str(
            "Not made for an AWQ run: its linears were quantized as `W diag(s)` on inputs scaled by `1/s`, so a \
             re-run of GPTQ on the checkpoint's `W` would not be the run's problem.\n",
        ),
        None => md.push_str(
            "Not made for this page (`adadim report` without `--no-updates` re-runs GPTQ on one linear to draw it).\n",
        ),
    }
    let _ = write!(md, "\n---\nMade by `{}`.\n", opts.command);
    let index = out.join("README.md");
    std::fs::write(&index, md).map_err(|source| ReportError::Io { path: index.clone(), source })?;
    Ok(Page { index, images })
}

fn header(md: &mut String, run: &Run) {
    let s = &run.summary;
    let st = &s.settings;
    let name = |p: &Path| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
    let per_ic = run.linears.iter().filter(|r| r.axis == Axis::Ic).count();
    let dim = match st.dim.name() {
        "ada" if !st.ic_modules.is_empty() => {
            format!("per-IC on {} (heuristic), per-OC elsewhere", st.ic_modules.join(", "))
        }
        "ada" => {
            format!("AdaDim (each linear's dimension chosen by {}'s output error)", st.select.name().to_uppercase())
        }
        d => format!("per-{} groups", d.to_uppercase()),
    };
    let method = match st.dim.name() {
        "ada" => format!("{}-ada", st.method.name().to_uppercase()),
        d => format!("{} per-{}", st.method.name().to_uppercase(), d.to_uppercase()),
    };
    let _ = writeln!(md, "# {} {method} {}: what the quantization did\n", name(Path::new(&s.model)), run.spec_label());
    let grid = match &st.budget {
        Some(b) => format!(
            "bits, group and dimension per linear under --bpw {} ({} damage; {} reached)",
            b.bpw,
            b.damage.name(),
            s.allocation.as_ref().map_or("?".to_string(), |a| format!("{:.3}", a.bpw))
        ),
        None => format!(
            "{}-bit, group {}",
            st.spec.bits,
            st.spec.group.map_or("whole channel".to_string(), |g| g.to_string())
        ),
    };
    let dim = if st.budget.is_some() { "the dimension from the same table".to_string() } else { dim };
    let gptq = st.method == Method::Gptq;
    let _ = writeln!(
        md,
        "Model `{}`, {} {grid}, zero points {}{}; {dim}. Calibration: {} samples x {} tokens of `{}` (seed {}). {} of {} linears kept per-IC groups; quantized in {:.0} s.",
        name(Path::new(&s.model)),
        st.method.name().to_uppercase(),
        format!("{:?}", st.spec.zero).to_lowercase(),
        if gptq && st.act_order { ", act-order" } else { "" },
        s.calibration.nsamples,
        s.calibration.seqlen,
        name(Path::new(&s.calibration.source)),
        s.calibration.seed,
        per_ic,
        run.linears.len(),
        s.seconds,
    );
}

fn errors_section(md: &mut String, run: &Run, img: &str) {
    let gptq = if run.summary.settings.method == Method::Gptq {
        " Grey: the output error of the weights kept (after GPTQ)."
    } else {
        ""
    };
    let _ = writeln!(md, "Each linear's output error `mean((Q(W) x - W x)^2)` on the calibration inputs, for round-to-nearest with groups along output channels (blue) and along input channels (orange); the dots mark the dimension the run kept.{gptq} Log scale.\n");
    md.push_str(
        "| module | layers per-IC | which | largest per-OC / per-IC error ratio (layer) |\n|---|---|---|---|\n",
    );
    for m in errors::module_errors(run) {
        let ic = m.ic_layers();
        let which = if ic.is_empty() { "-".to_string() } else { ranges(&ic) };
        let best = m.best_saving().map_or("-".to_string(), |(l, r)| format!("{r:.2}x ({l})"));
        let _ = writeln!(md, "| {} | {} / {} | {which} | {best} |", m.module, ic.len(), m.rows.len());
    }
    let _ = writeln!(md, "\n![Per-layer RTN output error per-OC vs per-IC, and the dimension kept]({img})");
}

/// Sorted layer numbers as runs: `0-7, 9, 11-13`.
fn ranges(layers: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &l in layers {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == l => *end = l,
            _ => runs.push((l, l)),
        }
    }
    runs.iter().map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect::<Vec<_>>().join(", ")
}

fn outliers_section(md: &mut String, layers: &[outliers::LayerOutliers], img: &str) {
    let _ = writeln!(
        md,
        "The float encoder on the run's first calibration samples (each one [CLS] ... [SEP] crop): per layer, the \
         largest |x| of each hidden dimension of the residual sum after the FFN (`x + FFN(x)`, before the \
         LayerNorm), the {} dimensions that stand out most, that dimension's mean |x| on [SEP], [CLS], punctuation \
         and word tokens, and the tokens most frequent among its {} largest |x|.\n\n![outliers]({img})\n",
        outliers::TOP_DIMS,
        outliers::TOP_TOKENS
    );
    md.push_str("| layer | dimension | max abs x | / median dim | mean abs x: [SEP] | [CLS] | punct. | words | top tokens |\n|---|---|---|---|---|---|---|---|---|\n");
    for (i, l) in layers.iter().enumerate() {
        for t in &l.top {
            let tokens: Vec<String> = t.tokens.iter().map(|(s, n)| format!("`{s}` {n}")).collect();
            let k: Vec<String> =
                t.by_kind.iter().map(|v| if v.is_nan() { "-".into() } else { format!("{v:.2}") }).collect();
            let _ = writeln!(
                md,
                "| {i} | {} | {:.2} | {:.1} | {} | {} |",
                t.dim,
                t.peak,
                t.ratio,
                k.join(" | "),
                tokens.join(", ")
            );
        }
    }
}

fn inputs_section(md: &mut String, run: &Run, layer: usize, layer_img: &str, across_img: &str) {
    let _ = writeln!(md, "The RMS of each input channel over the calibration tokens, `sqrt(H[i,i] / 2)` from each linear's Hessian, for block {layer} (q/k/v share one input, gate/up another):\n");
    md.push_str("| input of | channels | largest channels (RMS) | largest / median |\n|---|---|---|---|\n");
    for (name, module) in inputs::INPUTS {
        if let Some(rms) = run.rms(layer, module) {
            let top = inputs::top_channels(rms, 5)
                .iter()
                .map(|(c, v)| format!("{c} ({v:.2})"))
                .collect::<Vec<_>>()
                .join(", ");
            let ratio = inputs::peak_to_median(rms).map_or("-".to_string(), |r| format!("{r:.1}"));
            let _ = writeln!(md, "| {name} | {} | {top} | {ratio} |", rms.len());
        }
    }
    let _ = writeln!(md, "\n![Input-channel RMS of block {layer}]({layer_img})\n");
    let _ = writeln!(md, "Across blocks, how far the largest input channel stands above the median one (log scale):\n\n![Peak / median input RMS per block]({across_img})");
}

fn updates_section(md: &mut String, u: &LayerUpdates, img: &str) {
    let _ = writeln!(
        md,
        "GPTQ re-run on block {} `{}` ([{}, {}]) along both dimensions, on the inputs the run's own quantized blocks give it ({} calibration tokens). Shown: GPTQ's update, how far error compensation moved each weight before its rounding (`|w_compensated - w|`), averaged over output channels, per input channel, on one scale for both.\n",
        u.layer, u.module, u.rows, u.cols, u.tokens
    );
    md.push_str("| | per-OC GPTQ | per-IC GPTQ |\n|---|---|---|\n");
    let _ = writeln!(md, "| output error `mean((ΔW x)^2)` | {:.4e} | {:.4e} |", u.oc.error, u.ic.error);
    for f in [0.01, 0.1] {
        let _ = writeln!(
            md,
            "| share of the total change held by the top {:.0}% of input channels | {:.1}% | {:.1}% |",
            100.0 * f,
            100.0 * u.oc.top_share(f),
            100.0 * u.ic.top_share(f)
        );
    }
    let outliers = u.outlier_channels(0.01);
    let _ = writeln!(
        md,
        "| mean change at the 1% of input channels with the largest RMS ({}), over the mean at the rest | {:.2}x | {:.2}x |",
        outliers.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", "),
        LayerUpdates::concentration(&u.oc, &outliers),
        LayerUpdates::concentration(&u.ic, &outliers)
    );
    let peak = |v: &[f64]| {
        v.iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or("-".to_string(), |(i, m)| format!("{m:.4} (channel {i})"))
    };
    let _ = writeln!(md, "| largest per-channel mean | {} | {} |\n", peak(&u.oc.per_input), peak(&u.ic.per_input));
    match u.reproduced_max_diff {
        Some(0.0) => {
            let _ = writeln!(md, "The run kept per-{} for this linear; re-running GPTQ along it reproduced the run's weights exactly (max difference 0).\n", axis_name::name(u.run_axis).to_uppercase());
        }
        Some(d) if u.qep.is_some() => {
            let _ = writeln!(md, "The run kept per-{} for this linear; it quantized the weights corrected towards the float model's outputs (--qep {}), which this re-run of plain GPTQ leaves out: they differ by up to {d:.3e}.\n", axis_name::name(u.run_axis).to_uppercase(), u.qep.unwrap_or(0.0));
        }
        Some(d) => {
            let _ = writeln!(md, "The run kept per-{} for this linear; re-running GPTQ along it gives weights that differ from the run's by up to {d:.3e} (the re-run's calibration inputs are not bit-identical to the run's).\n", axis_name::name(u.run_axis).to_uppercase());
        }
        None => {
            let _ = writeln!(
                md,
                "The run itself used round-to-nearest (per-{} here); these GPTQ runs show what GPTQ would do.\n",
                axis_name::name(u.run_axis).to_uppercase()
            );
        }
    }
    let _ = writeln!(md, "![GPTQ weight change per input channel, per-OC vs per-IC]({img})");
}

#[cfg(test)]
mod tests {
    #[test]
    fn layer_lists_are_written_as_runs() {
        assert_eq!(super::ranges(&[0, 1, 2, 3, 5, 7, 8]), "0-3, 5, 7-8");
        assert_eq!(super::ranges(&[4]), "4");
    }
}
