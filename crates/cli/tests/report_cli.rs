//! `adadim report` end to end: a seeded random model with injected activation outliers is
//! quantized (GPTQ-ada), and the page shows every figure, as well-formed SVG holding the
//! plotted series, with the outliers where they were injected; bad input is one clear error.

mod common;
use common::adadim;

use adadim_load::synth::{outlier_channels, tiny_config, Outliers};
use std::path::{Path, PathBuf};

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A tiny model with 2 outlier channels (x30), quantized GPTQ-ada w3g16 into `DIR/q`.
fn quantized_run() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    let (code, _, se) = adadim(&["synth", "--shape", "tiny", "--outliers", "2:30", "--dtype", "f32", "--out", &s(&m)]);
    assert_eq!(code, 0, "{se}");
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer by this sun of York. ".repeat(40))
        .unwrap();
    let q = d.path().join("q");
    let args = [
        "quantize",
        "--model",
        &s(&m),
        "--method",
        "gptq",
        "--dim",
        "ada",
        "--bits",
        "3",
        "--group",
        "16",
        "--calib",
        &s(&text),
        "--nsamples",
        "4",
        "--calib-seqlen",
        "32",
        // Plain GPTQ: the page's re-run (which leaves QEP's correction out) must give back
        // the run's weights exactly.
        "--qep",
        "0",
        "--out",
        &s(&q),
    ];
    let (code, _, se) = adadim(&args);
    assert_eq!(code, 0, "{se}");
    (d, q)
}

/// Parse an SVG file; its `<text>` contents and the number of data lines (width-1 polylines)
/// per stroke colour.
fn svg(path: &Path) -> (Vec<String>, std::collections::BTreeMap<String, usize>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(text.len() > 1000, "{}: only {} bytes", path.display(), text.len());
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{}: not XML: {e}", path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "text")
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_string())
        .collect();
    let mut lines = std::collections::BTreeMap::new();
    for n in doc.descendants().filter(|n| n.tag_name().name() == "polyline" && n.attribute("stroke-width") == Some("1"))
    {
        let stroke = n.attribute("stroke").unwrap_or("").to_string();
        if stroke != "#000000" {
            *lines.entry(stroke).or_insert(0) += 1;
        }
    }
    (texts, lines)
}

const OC: &str = "#1F77B4";
const IC: &str = "#FF7F0E";

#[test]
fn the_page_shows_every_figure_with_its_data() {
    let (_d, q) = quantized_run();
    assert!(q.join("input_rms.safetensors").exists(), "quantize records the input-channel RMS");
    let page = q.join("page");
    let (code, so, se) = adadim(&["report", &s(&q), "--out", &s(&page), "--layer", "1", "--module", "v"]);
    assert_eq!(code, 0, "{se}");
    assert!(so.contains("README.md") && so.contains("4 figures"), "{so}");
    let md = std::fs::read_to_string(page.join("README.md")).unwrap();
    let images = ["errors.svg", "inputs-block1.svg", "inputs-across-blocks.svg", "updates-block1-v_proj.svg"];
    for img in images {
        assert!(md.contains(&format!("]({img})")), "the page shows {img}:\n{md}");
    }

    // (a) one panel per module type, each with its per-OC and per-IC error lines.
    let (texts, lines) = svg(&page.join("errors.svg"));
    for module in ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] {
        assert!(
            texts.iter().any(|t| t.starts_with(&format!("{module}: ")) && t.ends_with("of 2 layers per-IC")),
            "no panel for {module}: {texts:?}"
        );
    }
    assert_eq!((lines.get(OC), lines.get(IC)), (Some(&7), Some(&7)), "{lines:?}");
    assert!(texts.iter().any(|t| t == "per-IC RTN") && texts.iter().any(|t| t == "kept per-IC"), "legend: {texts:?}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("report.json")).unwrap()).unwrap();
    let per_ic = report["summary"]["per_ic"].as_u64().unwrap();
    assert!(md.contains(&format!("{per_ic} of 14 linears kept per-IC")), "{md}");

    // (b) the injected outlier channels are the largest inputs of q/k/v, on the page and in the
    // figure's title; four inputs drawn, one line each.
    let ch = outlier_channels(&tiny_config(), &Outliers { channels: 2, scale: 30.0 }, 0);
    let row = md.lines().find(|l| l.starts_with("| q/k/v | 48 |")).unwrap_or_else(|| panic!("no q/k/v row:\n{md}"));
    let top2: Vec<usize> = row
        .split('|')
        .nth(3)
        .unwrap()
        .split(',')
        .take(2)
        .map(|c| c.trim().split(' ').next().unwrap().parse().unwrap())
        .collect();
    let mut sorted = top2.clone();
    sorted.sort();
    assert_eq!(sorted, ch, "{row}");
    let (texts, lines) = svg(&page.join("inputs-block1.svg"));
    assert!(
        texts.iter().any(|t| t.starts_with(&format!("block 1: input of q/k/v (48 channels; largest {} at", top2[0]))),
        "{texts:?}"
    );
    assert_eq!(lines.values().sum::<usize>(), 4, "{lines:?}");
    let (_, lines) = svg(&page.join("inputs-across-blocks.svg"));
    assert_eq!(lines.values().sum::<usize>(), 4, "{lines:?}");

    // (c) the per-OC and per-IC updates and the input RMS; re-running along the run's own axis
    // gives back the run's weights exactly.
    let (texts, lines) = svg(&page.join("updates-block1-v_proj.svg"));
    assert_eq!((lines.get(OC), lines.get(IC)), (Some(&1), Some(&1)), "{lines:?}");
    assert!(texts.iter().any(|t| t.starts_with("block 1 self_attn.v_proj: GPTQ per-IC")), "{texts:?}");
    assert!(md.contains("reproduced the run's weights exactly (max difference 0)"), "{md}");
    assert!(md.contains("Made by `adadim report"), "{md}");

    // Defaults: the page in RUN_DIR/report, the last block; --no-updates leaves (c) out.
    let (code, _, se) = adadim(&["report", &s(&q), "--no-updates"]);
    assert_eq!(code, 0, "{se}");
    let md = std::fs::read_to_string(q.join("report").join("README.md")).unwrap();
    assert!(md.contains("](inputs-block1.svg)") && md.contains("Not made for this page"), "{md}");
    assert!(!q.join("report").join("updates-block1-down_proj.svg").exists());
}

#[test]
fn what_is_not_a_run_is_a_clear_error() {
    let (d, q) = quantized_run();
    let expect = |args: &[&str], needles: &[&str]| {
        let (code, _, se) = adadim(args);
        assert_eq!(code, 1, "{args:?}: {se}");
        for n in needles {
            assert!(se.contains(n), "{args:?}: '{n}' not in: {se}");
        }
    };
    let nowhere = d.path().join("nowhere");
    expect(&["report", &s(&nowhere)], &[&s(&nowhere), "not a quantization run", "no such directory"]);
    let model = d.path().join("m");
    expect(&["report", &s(&model)], &[&s(&model), "no report.json"]);
    expect(&["report", &s(&q), "--layer", "7"], &["--layer 7", "0..=1"]);
    expect(&["report", &s(&q), "--module", "mlp"], &["--module mlp"]);

    // A damaged input_rms.safetensors, then a damaged report.json: each named.
    let rms = q.join("input_rms.safetensors");
    std::fs::write(&rms, b"\x08\0\0\0\0\0\0\0{}garbage").unwrap();
    expect(&["report", &s(&q), "--no-updates"], &[&s(&rms)]);
    std::fs::remove_file(&rms).unwrap();
    let (code, _, se) = adadim(&["report", &s(&q), "--no-updates"]);
    assert_eq!(code, 0, "a run without input_rms.safetensors still reports: {se}");
    let json = q.join("report.json");
    std::fs::write(&json, "{\"summary\": 3}").unwrap();
    expect(&["report", &s(&q)], &[&s(&json), "not a report written by `adadim quantize`"]);

    // The update figure needs the source model: gone, it says so and how to do without.
    let (d2, q2) = quantized_run();
    std::fs::remove_dir_all(d2.path().join("m")).unwrap();
    expect(&["report", &s(&q2)], &["--no-updates", &s(&d2.path().join("m"))]);
}

#[test]
fn a_budget_run_draws_each_linears_layout() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    let (code, _, se) = adadim(&["synth", "--shape", "tiny", "--dtype", "f32", "--out", &s(&m)]);
    assert_eq!(code, 0, "{se}");
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer by this sun of York. ".repeat(40))
        .unwrap();
    let q = d.path().join("q");
    let args = ["quantize", "--model", &s(&m), "--method", "rtn", "--bpw", "3.6", "--calib", &s(&text)];
    let (code, _, se) = adadim(&[&args[..], &["--nsamples", "4", "--calib-seqlen", "32", "--out", &s(&q)]].concat());
    assert_eq!(code, 0, "{se}");
    let (code, _, se) = adadim(&["report", &s(&q), "--no-updates"]);
    assert_eq!(code, 0, "{se}");
    let md = std::fs::read_to_string(q.join("report").join("README.md")).unwrap();
    assert!(md.contains("](allocation.svg)") && md.contains("Mean bits per module: q "), "{md}");
    let (texts, _) = svg(&q.join("report").join("allocation.svg"));
    for want in ["self_attn.q_proj", "mlp.down_proj", "per-OC g32", "per-IC g256", "bits", "layer"] {
        assert!(texts.iter().any(|t| t == want), "'{want}' not in {texts:?}");
    }
    let svg_text = std::fs::read_to_string(q.join("report").join("allocation.svg")).unwrap();
    // One dot per linear (7 modules x 2 layers) besides the legend's.
    assert!(svg_text.matches("<circle").count() >= 14, "too few dots");

    // bench decode sets the mixed model against uniform ones of fewer and more bytes per token.
    let mut models = vec![s(&q)];
    // Whole-channel 2-bit rows read fewer bytes, 8-bit rows in groups of 32 more.
    for (bits, group) in [("2", "0"), ("8", "32")] {
        let u = d.path().join(format!("w{bits}g{group}"));
        let args = ["quantize", "--model", &s(&m), "--method", "rtn", "--bits", bits, "--group", group, "--calib"];
        let rest =
            [s(&text), "--nsamples".into(), "4".into(), "--calib-seqlen".into(), "32".into(), "--out".into(), s(&u)];
        let all: Vec<&str> = args.iter().copied().chain(rest.iter().map(String::as_str)).collect();
        let (code, _, se) = adadim(&all);
        assert_eq!(code, 0, "{se}");
        models.push(s(&u));
    }
    let md = d.path().join("BENCH.md");
    let list = models.join(",");
    let bench = ["bench", "decode", "--models", &list, "--tokens", "4", "--depth", "0", "--reps", "1"];
    let more = ["--act-bits", "16", "--batch", "1", "--batch-depth", "2", "--write", &s(&md)];
    let (code, _, se) = adadim(&[&bench[..], &more[..]].concat());
    assert_eq!(code, 0, "{se}");
    let page = std::fs::read_to_string(&md).unwrap();
    let line = page.lines().find(|l| l.starts_with("- q packed (rtn-ada --bpw ")).unwrap_or_else(|| panic!("{page}"));
    assert!(
        line.contains("of its bound; uniform models around its")
            && line.contains("% (best rounds); within each round: median ")
            && line.ends_with("over 1 rounds"),
        "{line}"
    );
}
