//! Quality per bit: our quantized models (a `bench/results.sh` run directory) beside
//! llama.cpp's `llama-quantize` types of the same model, with and without an importance
//! matrix from the same calibration text, every one evaluated by *our* evaluator with the same
//! protocol as the results (`import-gguf` reads llama.cpp's files), perplexity against bits per
//! weight of the decoder-block linears.
//!
//! Bits per weight count what each format stores for the seven linears of every block
//! (codes, scales, zeros, permutations; llama.cpp: its block types' exact sizes, mixed types
//! of the `_S`/`_M` recipes included). Embedding and head are left out on both sides: ours stay
//! float, and llama.cpp's token embedding is written as f32 (`--token-embedding-type f32`) so
//! that both are evaluated with the same float head.

use std::path::{Path, PathBuf};

use super::llamacpp::{evaluate_gguf, gguf_bits, LlamaSide};
use crate::args::BenchQualityArgs;
use crate::resolve::resolve_dataset;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One model of the comparison.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// `w3g128-gptq-ada`, `Q3_K_M-imatrix`, ...
    pub name: String,
    /// `adadim` or `llama.cpp`.
    pub tool: String,
    /// Bits per weight of the decoder-block linears.
    pub bpw: f64,
    pub ppl: f64,
}

/// Stored bits and weights of the block linears of an adadim packed model directory.
pub fn packed_bits(dir: &Path) -> Result<(u64, u64)> {
    let file = adadim_pack::PackedFile::open(&dir.join("model.safetensors"))?;
    let (mut bits, mut weights) = (0u64, 0u64);
    for name in file.linear_names().map(str::to_string).collect::<Vec<_>>() {
        let p = file.linear(&name)?;
        bits += 8 * p.stored_bytes() as u64;
        weights += (p.rows() * p.cols()) as u64;
    }
    anyhow::ensure!(weights > 0, "{}: no packed linears in this model", dir.display());
    Ok((bits, weights))
}

/// Stored bits and weights of the block linears of a quantized model directory: read from
/// the packed file, or (a model exported dequantized, `--format f32`) from the layout its
/// `report.json` records for every linear, the bytes the packed file would hold.
pub fn model_bits(dir: &Path) -> Result<(u64, u64)> {
    if adadim_model::is_packed(dir) {
        return packed_bits(dir);
    }
    let path = dir.join(adadim_calibrate::Report::FILE);
    let r = adadim_calibrate::Report::read(dir)?;
    let s = &r.summary.settings;
    let (bits, group) = (s.spec.bits, s.spec.group);
    // Per-OC GPTQ with act-order and dynamic groups stores its column order.
    let dynamic = adadim_calibrate::damage::permuted(s);
    let (mut total, mut weights) = (0u64, 0u64);
    for l in &r.linears {
        let (rows, cols, axis) = (l.rows, l.cols, l.axis);
        let whole = if axis == adadim_quantize::Axis::Oc { cols } else { rows };
        let min = s.spec.zero == adadim_quantize::Zero::Float;
        let layout = adadim_pack::Layout { bits, group: group.unwrap_or(whole), axis, min };
        total += 8 * layout.bytes(rows, cols, dynamic && axis == adadim_quantize::Axis::Oc) as u64;
        weights += (rows * cols) as u64;
    }
    anyhow::ensure!(weights > 0, "{}: no linears", path.display());
    Ok((total, weights))
}

/// The points, sorted by bits per weight, as a markdown table (`fp`: the float perplexity).
pub fn table(points: &[Point], fp: f64) -> String {
    let mut s = String::from(
        "| model | tool | bits per weight (block linears) | WikiText-2 ppl | vs FP |\n|---|---|---|---|---|\n",
    );
    for p in points {
        s += &format!(
            "| {} | {} | {:.3} | {:.3} | {:+.1}% |\n",
            p.name,
            p.tool,
            p.bpw,
            p.ppl,
            100.0 * (p.ppl / fp - 1.0)
        );
    }
    s
}

/// For each tool, the points no other point of the same tool beats in both bits and ppl.
pub fn frontier(points: &[Point], tool: &str) -> Vec<Point> {
    let mine: Vec<&Point> = points.iter().filter(|p| p.tool == tool).collect();
    let mut f: Vec<Point> = mine
        .iter()
        .filter(|p| !mine.iter().any(|q| q.bpw <= p.bpw && q.ppl <= p.ppl && (q.bpw < p.bpw || q.ppl < p.ppl)))
        .map(|p| (*p).clone())
        .collect();
    f.sort_by(|a, b| a.bpw.total_cmp(&b.bpw));
    f
}

/// Models more than this many times FP's perplexity are left out of the plot (broken ones
/// would squash the rest into a line); the table keeps them.
pub const PLOT_MAX_RATIO: f64 = 10.0;

/// Perplexity against bits per weight as an SVG (log-scaled ppl): both tools' points and
/// their frontiers, the float model as a line across.
pub fn plot(points: &[Point], fp: f64, path: &Path) -> Result<()> {
    use adadim_report::plot::{render, Figure};
    let title =
        format!("WikiText-2 perplexity vs bits per weight (block linears); ppl above {PLOT_MAX_RATIO}x FP not shown");
    render(&Figure { panels: vec![panel(title, points, fp)], columns: 1, panel_size: (900, 560) }, path)?;
    Ok(())
}

/// One panel of [`plot`]: the points within [`PLOT_MAX_RATIO`] of `fp`, each tool's frontier,
/// the float model as a line across.
pub fn panel(title: String, points: &[Point], fp: f64) -> adadim_report::plot::Panel {
    use adadim_report::plot::{Panel, Series, Style, IC_COLOR, OC_COLOR};
    let points: Vec<Point> = points.iter().filter(|p| p.ppl <= PLOT_MAX_RATIO * fp).cloned().collect();
    let points = &points[..];
    let (x0, x1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.bpw), b.max(p.bpw)));
    let mut series = vec![Series {
        name: format!("FP {fp:.2}"),
        color: plotters::style::RGBColor(90, 90, 90),
        style: Style::Line,
        points: vec![(x0, fp), (x1, fp)],
    }];
    for (tool, color) in [("adadim", OC_COLOR), ("llama.cpp", IC_COLOR)] {
        series.push(Series {
            name: tool.into(),
            color,
            style: Style::Dots(4),
            points: points.iter().filter(|p| p.tool == tool).map(|p| (p.bpw, p.ppl)).collect(),
        });
        series.push(Series {
            name: String::new(),
            color,
            style: Style::Line,
            points: frontier(points, tool).iter().map(|p| (p.bpw, p.ppl)).collect(),
        });
    }
    Panel {
        title,
        x_desc: "bits per weight".into(),
        y_desc: "perplexity (log)".into(),
        log_y: true,
        legend: true,
        series,
        ..Panel::default()
    }
}

pub fn bench_quality(a: BenchQualityArgs) -> Result<()> {
    use Point;
    let read_json = |p: &std::path::Path| -> Result<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("{}: not JSON", p.display()))
    };
    let fp = read_json(&a.runs.join("fp.ppl.json"))
        .context("the run directory needs fp.ppl.json (bench/results.sh writes it)")?;
    let num = |v: &serde_json::Value, k: &str| v[k].as_f64().with_context(|| format!("fp.ppl.json: no number '{k}'"));
    let (fp_ppl, windows, seqlen) = (num(&fp, "ppl")?, num(&fp, "windows")? as usize, num(&fp, "seqlen")? as usize);
    let dataset = resolve_dataset(fp["dataset"].as_str().unwrap_or("wikitext2"))?;
    let mut points = Vec::new();
    let mut ours: Vec<PathBuf> = std::fs::read_dir(&a.runs)
        .with_context(|| format!("reading {}", a.runs.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("report.json").exists())
        .collect();
    ours.sort();
    for dir in ours {
        let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
        let ppl_file = a.runs.join(format!("{name}.ppl.json"));
        if !ppl_file.exists() {
            eprintln!("skipping {name}: no {} (bench/results.sh evaluates it)", ppl_file.display());
            continue;
        }
        let (bits, weights) = model_bits(&dir)?;
        points.push(Point {
            name,
            tool: "adadim".into(),
            bpw: bits as f64 / weights as f64,
            ppl: num(&read_json(&ppl_file)?, "ppl")?,
        });
    }
    let side = LlamaSide::new(&a.llama)?;
    let ldir = a.runs.join("llamacpp");
    std::fs::create_dir_all(&ldir)?;
    let imatrix = side.imatrix_announced(&ldir)?;
    for ty in &side.types {
        for im in side.with_and_without(&imatrix) {
            let Some(super::llamacpp::Made { name, path: file }) = side.quantize(&ldir, ty, im)? else {
                eprintln!("{ty}: llama-quantize makes it only with an importance matrix");
                continue;
            };
            let ppl = evaluate_gguf(&file, &ldir, std::slice::from_ref(&dataset), seqlen, windows)?[0];
            let (bits, weights) = gguf_bits(&file)?;
            points.push(Point { name, tool: "llama.cpp".into(), bpw: bits as f64 / weights as f64, ppl });
        }
    }
    points.sort_by(|x, y| x.bpw.total_cmp(&y.bpw));
    let mut md = String::from("## Quality per bit against llama.cpp\n\n");
    md += &format!("Regenerated by `bench/results.sh` (its last step: `adadim bench quality --runs {} --llamacpp BIN`). Every model below is evaluated by our evaluator with the protocol above ({} windows x {seqlen} tokens of {}); llama.cpp's files (`llama-quantize --allow-requantize` from the shipped Q4_1 GGUF, the only source there is; token embedding kept f32 so that both sides keep a float head) are read with `import-gguf`. `-imatrix`: with llama.cpp's importance matrix from {} x {} tokens of the same calibration text as ours ({}). Bits per weight: what each file stores for the decoder-block linears (codes, scales, zeros, permutations; llama.cpp's mixed `_S`/`_M` recipes counted tensor by tensor). k-quants pack rows in super-blocks of 256 values; a linear whose rows are not a multiple of 256 long gets the fallback type llama-quantize picks for it, so a type's name can promise fewer bits than its file holds: the bits column is what was stored.\n\n", a.runs.display(), windows, dataset.label, side.chunks, side.ctx, a.llama.calib);
    md += &table(&points, fp_ppl);
    if let Some(parent) = a.svg.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    plot(&points, fp_ppl, &a.svg)?;
    md += &format!("\nFP (dequantized Q4_1): {fp_ppl:.3}. Plot: [{}]({}).\n", a.svg.display(), a.svg.display());
    super::publish(&a.write, "quality-per-bit", &md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, tool: &str, bpw: f64, ppl: f64) -> Point {
        Point { name: name.into(), tool: tool.into(), bpw, ppl }
    }

    #[test]
    fn the_frontier_keeps_points_nothing_beats() {
        let pts = [
            p("a", "x", 3.0, 30.0),
            p("b", "x", 3.0, 25.0),
            p("c", "x", 4.0, 26.0),
            p("d", "x", 4.5, 20.0),
            p("e", "y", 2.0, 99.0),
        ];
        let f: Vec<String> = frontier(&pts, "x").into_iter().map(|p| p.name).collect();
        assert_eq!(f, ["b", "d"]);
    }

    #[test]
    fn the_plot_is_an_svg_with_every_point() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("q.svg");
        let pts = [
            p("w3g128-gptq-ada", "adadim", 3.16, 40.0),
            p("w4g128-gptq-ada", "adadim", 4.16, 25.0),
            p("Q3_K_M", "llama.cpp", 3.9, 35.0),
            p("w2g64", "adadim", 2.3, 5000.0),
        ];
        plot(&pts, 19.2, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{}", &svg[..svg.len().min(200)]);
        assert!(svg.contains("adadim") && svg.contains("llama.cpp") && svg.contains("FP 19.20"));
        // Three points and the legend's two marks; the broken w2g64 is left out.
        assert_eq!(svg.matches("<circle").count(), 3 + 2);
    }
}
