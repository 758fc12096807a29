//! `adadim quantize` end to end on a seeded random model: a usable model directory and report,
//! or one clear error and nothing left behind.

mod common;
use common::adadim;

use adadim_load::synth::{tiny_config, write_random_checkpoint};
use std::path::Path;

fn only_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn quantize_then_evaluate() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    write_random_checkpoint(&m, &tiny_config(), 2).unwrap();
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer. ".repeat(30)).unwrap();
    let out = d.path().join("q");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = [
        "quantize",
        "--model",
        &s(&m),
        "--method",
        "gptq",
        "--dim",
        "ada",
        "--bits",
        "4",
        "--group",
        "16",
        "--calib",
        &s(&text),
        "--nsamples",
        "4",
        "--calib-seqlen",
        "32",
        "--out",
        &s(&out),
        "--json",
    ];
    let (code, so, se) = adadim(&args);
    assert_eq!(code, 0, "{se}");
    let summary: serde_json::Value = serde_json::from_str(&so).unwrap();
    assert_eq!(summary["linears"], 14);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let l0 = &report["linears"][0];
    assert!(l0["oc_error"].as_f64().unwrap() > 0.0 && l0["gptq_loss"].as_f64().is_some(), "{l0}");
    let (code, so, se) =
        adadim(&["eval", "ppl", "--model", &s(&out), "--dataset", &s(&text), "--seqlen", "32", "--json"]);
    assert_eq!(code, 0, "{se}");
    let v: serde_json::Value = serde_json::from_str(&so).unwrap();
    assert!(v["ppl"].as_f64().unwrap().is_finite());

    // The packed model generates (KV cache, matvec kernels); nonsense settings are refused.
    let (code, so, se) =
        adadim(&["generate", "--model", &s(&out), "--prompt", "Now is the winter", "--max-tokens", "6"]);
    assert_eq!(code, 0, "{se}");
    assert!(se.contains("6 generated at") && !so.is_empty(), "{so} / {se}");
    assert!(se.contains("MB f16"), "the default KV cache is f16: {se}");
    let (code, _, se) = adadim(&["generate", "--model", &s(&out), "--prompt", "x", "--temperature=-1"]);
    assert_eq!(code, 1);
    assert!(se.contains("--temperature"), "{se}");
    let (code, so, se) = adadim(&[
        "generate",
        "--model",
        &s(&out),
        "--prompt",
        "Now is the winter",
        "--max-tokens",
        "6",
        "--act-bits",
        "8",
        "--kv-cache",
        "f32",
    ]);
    assert_eq!(code, 0, "{se}");
    assert!(se.contains("6 generated at") && se.contains("MB f32") && !so.is_empty(), "{so} / {se}");
    let (code, _, se) = adadim(&["generate", "--model", &s(&out), "--prompt", "x", "--kv-cache", "f8"]);
    assert_ne!(code, 0);
    assert!(se.contains("--kv-cache") && se.contains("f16"), "{se}");
    let (code, _, se) = adadim(&["generate", "--model", &s(&out), "--prompt", "x", "--act-bits", "4"]);
    assert_eq!(code, 1);
    assert!(se.contains("--act-bits 4"), "{se}");

    // bench decode: every model, precision and depth once per round, its rows written into the file.
    let md = d.path().join("BENCH.md");
    let (code, _, se) = adadim(&[
        "bench",
        "decode",
        "--models",
        &s(&out),
        "--tokens",
        "4",
        "--depth",
        "0,9",
        "--reps",
        "2",
        "--batch",
        "1,3",
        "--batch-depth",
        "5",
        "--write",
        &s(&md),
    ]);
    assert_eq!(code, 0, "{se}");
    assert_eq!(se.matches("round 2/2: q packed").count(), 4, "int16 and int8 at both depths measured in round 2: {se}");
    assert_eq!(se.matches("round 2/2: batch of ").count(), 4, "both precisions at batches of 1 and 3: {se}");
    let page = std::fs::read_to_string(&md).unwrap();
    let rows: Vec<&str> =
        page.lines().take_while(|l| !l.starts_with("### ")).filter(|l| l.starts_with("| adadim: q packed")).collect();
    assert_eq!(rows.len(), 4, "{page}");
    for (i, row) in rows.iter().enumerate() {
        let cell = |k: usize| row.split('|').nth(k).unwrap().trim();
        assert_eq!(cell(2), ["0", "9"][i % 2], "{row}");
        let (mb, tps): (f64, f64) = (cell(3).parse().unwrap(), cell(4).parse().unwrap());
        assert!(tps > 0.0 && mb > 0.0, "{row}");
    }
    // The deepest context's prefill, as prompt processing: one row per precision.
    assert!(page.contains("### Prompt processing: 9 tokens"), "{page}");
    let section = |title: &str| -> Vec<String> {
        let lines = page.lines().skip_while(|l| !l.starts_with(title)).skip(1);
        lines
            .take_while(|l| !l.starts_with("### "))
            .filter(|l| l.starts_with("| adadim: q packed"))
            .map(String::from)
            .collect()
    };
    let pp: Vec<f64> =
        section("### Prompt processing").iter().map(|l| l.split('|').nth(2).unwrap().trim().parse().unwrap()).collect();
    assert!(pp.len() == 2 && pp.iter().all(|&t| t > 0.0), "{page}");
    // Batched decode: one row per precision, each batch's aggregate tokens/s and x one sequence.
    let batched = section("### Batched decode");
    assert_eq!(batched.len(), 2, "{page}");
    for row in &batched {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cells[2].ends_with("(1.00x)") && cells[3].ends_with("x)"), "{row}");
        assert!(cells[2..4].iter().all(|c| c.split(' ').next().unwrap().parse::<f64>().unwrap() > 0.0), "{row}");
    }
    std::fs::remove_file(&md).unwrap();

    // bench kernels: every kernel on a small shape, triad measured around them, the rows written.
    let (code, _, se) = adadim(&[
        "bench",
        "kernels",
        "--shapes",
        "64x256",
        "--working-set",
        "4000000",
        "--llamacpp",
        &s(&d.path().join("no-llama")),
        "--write",
        &s(&md),
    ]);
    assert_eq!(code, 0, "{se}");
    let page = std::fs::read_to_string(&md).unwrap();
    let rows: Vec<&str> = page.lines().filter(|l| l.starts_with("| 64 x 256 |")).collect();
    assert_eq!(rows.len(), 8, "4 kernels x 2 axes: {page}");
    assert!(page.contains("5 measurements from") && page.contains("llama.cpp comparison skipped"), "{page}");
    for r in rows {
        let gbs: f64 = r.split('|').nth(6).unwrap().trim().parse().unwrap();
        assert!(gbs.is_finite() && gbs > 0.0, "{r}");
    }
    std::fs::remove_file(&md).unwrap();

    // The default output is packed; --format f32 writes the same model dequantized, and both
    // evaluate to the same perplexity (packed kernels vs dense GEMMs).
    let f32_out = d.path().join("q-f32");
    let mut a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
    let o = a.iter().position(|x| x == "--out").unwrap();
    a[o + 1] = s(&f32_out);
    a.extend(["--format".to_string(), "f32".to_string()]);
    let (code, _, se) = adadim(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{se}");
    let size = |p: &Path| std::fs::metadata(p.join("model.safetensors")).unwrap().len();
    assert!(size(&out) < size(&f32_out), "packed {} >= f32 {}", size(&out), size(&f32_out));
    let (code, so, se) =
        adadim(&["eval", "ppl", "--model", &s(&f32_out), "--dataset", &s(&text), "--seqlen", "32", "--json"]);
    assert_eq!(code, 0, "{se}");
    let w: serde_json::Value = serde_json::from_str(&so).unwrap();
    let (p, f) = (v["ppl"].as_f64().unwrap(), w["ppl"].as_f64().unwrap());
    assert!(((p - f) / f).abs() < 1e-4, "packed ppl {p} vs dequantized {f}");
    assert_eq!(v["activations"], "f32");
    // As generate runs it: integer products on rounded activations, a little off the exact
    // perplexity; refused with --stream, a note for a float model.
    for bits in ["16", "8"] {
        let (code, so, se) = adadim(&[
            "eval",
            "ppl",
            "--model",
            &s(&out),
            "--dataset",
            &s(&text),
            "--seqlen",
            "32",
            "--json",
            "--act-bits",
            bits,
        ]);
        assert_eq!(code, 0, "{se}");
        let r: serde_json::Value = serde_json::from_str(&so).unwrap();
        let q = r["ppl"].as_f64().unwrap();
        assert!(((q - p) / p).abs() < if bits == "16" { 1e-3 } else { 5e-2 }, "int{bits} ppl {q} vs exact {p}");
        assert_eq!(r["activations"], format!("int{bits}"));
    }
    let (code, _, se) = adadim(&[
        "eval",
        "ppl",
        "--model",
        &s(&out),
        "--dataset",
        &s(&text),
        "--seqlen",
        "32",
        "--act-bits",
        "8",
        "--stream",
    ]);
    assert_eq!(code, 1);
    assert!(se.contains("--act-bits") && se.contains("--stream"), "{se}");
    let (code, so, se) = adadim(&[
        "eval",
        "ppl",
        "--model",
        &s(&f32_out),
        "--dataset",
        &s(&text),
        "--seqlen",
        "32",
        "--json",
        "--act-bits",
        "8",
    ]);
    assert_eq!(code, 0, "{se}");
    assert!(se.contains("not packed"), "{se}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&so).unwrap()["ppl"], w["ppl"]);
    std::fs::remove_dir_all(&f32_out).unwrap();

    // GPTQ export: per-OC only, refused up front otherwise; with --dim oc, the GPTQ tensors and
    // quantize_config.json.
    let g = d.path().join("q-gptq");
    let gptq_args = |dim: &'static str| -> Vec<String> {
        let mut a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
        let o = a.iter().position(|x| x == "--out").unwrap();
        a[o + 1] = s(&g);
        let i = a.iter().position(|x| x == "--dim").unwrap();
        a[i + 1] = dim.to_string();
        a.extend(["--format".to_string(), "gptq".to_string(), "--zero".to_string(), "gptq".to_string()]);
        a
    };
    let (code, _, se) = adadim(&gptq_args("ada").iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 1);
    assert!(se.contains("--dim oc"), "{se}");
    assert!(!g.exists());
    let (code, _, se) = adadim(&gptq_args("oc").iter().map(|x| x.as_str()).collect::<Vec<_>>());
    assert_eq!(code, 0, "{se}");
    let qc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(g.join("quantize_config.json")).unwrap()).unwrap();
    assert_eq!(
        (qc["bits"].as_u64(), qc["group_size"].as_i64(), qc["quant_method"].as_str()),
        (Some(4), Some(16), Some("gptq"))
    );
    let bytes = std::fs::read(g.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let qw = st.tensor("model.layers.0.mlp.down_proj.qweight").unwrap();
    let down = tiny_config();
    assert_eq!(qw.shape(), &[down.intermediate_size * 4 / 32, down.hidden_size]);
    std::fs::remove_dir_all(&g).unwrap();

    // Quantizing the packed output again is refused with a reason.
    let again = d.path().join("q3");
    let (code, _, se) = adadim(&["quantize", "--model", &s(&out), "--out", &s(&again), "--calib", &s(&text)]);
    assert_eq!(code, 1);
    assert!(se.contains("already quantized"), "{se}");
    assert!(!again.exists());

    // The same command again: refused, the existing output untouched.
    let (code, _, se) = adadim(&args);
    assert_eq!(code, 1);
    assert!(se.contains("already exists"), "{se}");

    // Nonsense settings and too little calibration text: one clear line, no partial output.
    let out2 = d.path().join("q2");
    for (flag, value, needle) in [("--bits", "5", "bits"), ("--calib-seqlen", "100000", "too short")] {
        let mut a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
        let o = a.iter().position(|x| x == "--out").unwrap();
        a[o + 1] = s(&out2);
        let f = a.iter().position(|x| x == flag).unwrap();
        a[f + 1] = value.to_string();
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        let (code, _, se) = adadim(&a);
        assert_eq!(code, 1, "{flag} {value}: {se}");
        assert!(se.contains(needle) && se.trim().lines().count() == 1, "{flag} {value}: {se}");
    }
    assert_eq!(only_entries(d.path()), ["calib.txt", "model", "q"]);

    // Generating past the trained context (config's max_position_embeddings) is refused up
    // front, naming the flag: the RoPE tables and cache are sized by it.
    let cfg = m.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["max_position_embeddings"] = serde_json::json!(8);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let (code, _, se) =
        adadim(&["generate", "--model", &s(&m), "--prompt", "Now is the winter", "--raw", "--max-tokens", "12"]);
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("--max-tokens 12") && se.contains("trained context of 8"), "{se}");
    let (code, _, se) = adadim(&["generate", "--model", &s(&m), "--prompt", "Now", "--raw", "--max-tokens", "2"]);
    assert_eq!(code, 0, "{se}");
    assert!(!se.contains("trained context"), "{se}");
}

#[test]
fn quantize_layer_reports_both_errors() {
    use adadim_load::safetensors_out::{DenseDtype, DenseWriter};
    use adadim_load::synth::Rng;
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(1);
    let (rows, cols, tokens) = (24, 32, 64);
    let w = d.path().join("w.safetensors");
    let mut f = DenseWriter::create(&w, &[("weight".into(), vec![rows, cols])], &[], DenseDtype::F32).unwrap();
    f.write_tensor("weight", &rng.normals(rows * cols, 0.2)).unwrap();
    f.finish().unwrap();
    let x = d.path().join("x.safetensors");
    let mut xs = rng.normals(tokens * cols, 1.0);
    for t in 0..tokens {
        xs[t * cols + 5] *= 30.0; // an activation-outlier channel
    }
    let mut f = DenseWriter::create(&x, &[("x".into(), vec![tokens, cols])], &[], DenseDtype::F32).unwrap();
    f.write_tensor("x", &xs).unwrap();
    f.finish().unwrap();
    let out = d.path().join("wq.safetensors");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, so, se) = adadim(&[
        "quantize-layer",
        "--weight",
        &s(&w),
        "--inputs",
        &s(&x),
        "--method",
        "gptq",
        "--dim",
        "ada",
        "--bits",
        "3",
        "--group",
        "8",
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 0, "{se}");
    let v: serde_json::Value = serde_json::from_str(&so).unwrap();
    let (oc, ic) = (v["oc_error"].as_f64().unwrap(), v["ic_error"].as_f64().unwrap());
    assert_eq!(v["axis"], if ic < oc { "ic" } else { "oc" });
    assert!(v["final_error"].as_f64().unwrap() <= oc.min(ic) * 1.0001, "GPTQ no worse than RTN: {v}");
    assert_eq!(v["tokens"], 64);
    assert!(out.exists());
    // AWQ on the same layer, per-OC RTN: its search includes alpha = 0 (plain RTN), measured by
    // the same output error, and the outlier channel makes scaling pay.
    let out_awq = d.path().join("wq-awq.safetensors");
    let (code, so, se) = adadim(&[
        "quantize-layer",
        "--weight",
        &s(&w),
        "--inputs",
        &s(&x),
        "--method",
        "rtn",
        "--dim",
        "oc",
        "--bits",
        "3",
        "--group",
        "8",
        "--awq",
        // The fit the oc_error above was measured with (auto takes min-max for RTN per-OC).
        "--scale-search",
        "mse",
        "--out",
        &s(&out_awq),
    ]);
    assert_eq!(code, 0, "{se}");
    let a: serde_json::Value = serde_json::from_str(&so).unwrap();
    assert!(a["awq_alpha"].as_f64().unwrap() > 0.0, "{a}");
    assert!(a["final_error"].as_f64().unwrap() <= oc * 1.0001, "AWQ {a} vs plain RTN per-OC {oc}");
    // The weights written are back in the layer's own space: their output error is the one reported.
    let read = |p: &Path| -> Vec<f32> {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("weight").unwrap();
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let mut h = adadim_quantize::Hessian::new(cols);
    h.add_batch(&xs).unwrap();
    let e = adadim_quantize::output_error_from_hessian(&read(&w), &read(&out_awq), rows, cols, &h).unwrap();
    let want = a["final_error"].as_f64().unwrap();
    assert!((e - want).abs() <= 1e-3 * want, "written {e} vs reported {want}");
    // Inputs whose width is not the weight's C_in.
    let bad = d.path().join("bad.safetensors");
    let mut f = DenseWriter::create(&bad, &[("x".into(), vec![4, 31])], &[], DenseDtype::F32).unwrap();
    f.write_tensor("x", &[0.0; 124]).unwrap();
    f.finish().unwrap();
    let (code, _, se) = adadim(&["quantize-layer", "--weight", &s(&w), "--inputs", &s(&bad)]);
    assert_eq!(code, 1);
    assert!(se.contains("bad.safetensors") && se.contains("C_in = 32"), "{se}");
    // --refit: the same GPTQ, its scales refitted; the error before is reported beside the one after.
    let layer = |extra: &[&str]| {
        let mut args = vec!["quantize-layer", "--weight", w.to_str().unwrap(), "--inputs", x.to_str().unwrap()];
        args.extend(["--method", "gptq", "--dim", "ada", "--bits", "3", "--group", "8"]);
        args.extend(extra);
        adadim(&args)
    };
    let (code, so, se) = layer(&["--refit"]);
    assert_eq!(code, 0, "{se}");
    let r: serde_json::Value = serde_json::from_str(&so).unwrap();
    let (before, after) = (r["unrefit_error"].as_f64().unwrap(), r["final_error"].as_f64().unwrap());
    assert!((before - v["final_error"].as_f64().unwrap()).abs() <= 1e-9 * before, "{r} vs {v}");
    assert!(after <= before, "{r}");
    // --descend: the same GPTQ, its codes moved by coordinate descent; the error before is
    // reported beside the one after, with the number of codes that moved.
    let (code, so, se) = layer(&["--descend", "3"]);
    assert_eq!(code, 0, "{se}");
    let r: serde_json::Value = serde_json::from_str(&so).unwrap();
    let (before, after) = (r["undescended_error"].as_f64().unwrap(), r["final_error"].as_f64().unwrap());
    assert!((before - v["final_error"].as_f64().unwrap()).abs() <= 1e-9 * before, "{r} vs {v}");
    assert!(after < before && r["descended_codes"].as_u64().unwrap() > 0, "{r}");
    let (code, _, se) = layer(&["--descend", "101"]);
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("--descend"), "{se}");
    // --qep needs the float model's inputs, which one layer's file does not have.
    let (code, _, se) = layer(&["--qep", "0.5"]);
    assert_eq!(code, 1);
    assert!(se.contains("--qep") && se.contains("whole model"), "{se}");
}

/// The quantizer's settings (`--scale-search`, default mse; `--awq`; `--ada-error block`) reach
/// the quantizer (other weights) and are recorded in the report's settings; min-max runs record
/// nothing new (their bytes stay as they were). AWQ's packed model (norms folded,
/// written in f32) loads and evaluates.
/// `eval ppl` of the model in `dir` on `text` (windows of 32 tokens, the first `limit`).
fn eval_ppl(dir: &Path, text: &Path, limit: Option<&str>) -> f64 {
    let (dir, text) = (dir.to_str().unwrap(), text.to_str().unwrap());
    let mut args = vec!["eval", "ppl", "--model", dir, "--dataset", text, "--seqlen", "32", "--json"];
    args.extend(limit.map(|l| ["--limit", l]).into_iter().flatten());
    let (code, so, se) = adadim(&args);
    assert_eq!(code, 0, "{se}");
    serde_json::from_str::<serde_json::Value>(&so).unwrap()["ppl"].as_f64().unwrap()
}

/// `eval ppl` of the model in `dir` on `text` succeeds with a finite perplexity above 1.
fn assert_evaluates(dir: &Path, text: &Path) {
    let ppl = eval_ppl(dir, text, Some("2"));
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");
}

/// A short calibration text in `dir`.
fn calib_text(dir: &Path) -> std::path::PathBuf {
    let text = dir.join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer. ".repeat(30)).unwrap();
    text
}

#[test]
fn quantizer_settings_are_settings_of_the_run() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    write_random_checkpoint(&m, &tiny_config(), 2).unwrap();
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer. ".repeat(30)).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let quantize = |name: &str, dim: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let (m, text, out_s) = (s(&m), s(&text), s(&out));
        let mut args = vec!["quantize", "--model", &m, "--method", "rtn", "--dim", dim, "--bits", "3", "--group", "16"];
        args.extend(["--calib", &text, "--nsamples", "4", "--calib-seqlen", "32", "--out", &out_s]);
        args.extend(extra);
        let (code, _, se) = adadim(&args);
        (code, se, out)
    };
    let mut runs = Vec::new();
    for (name, extra, key, value) in [
        ("minmax", &["--scale-search", "minmax"][..], "search", serde_json::Value::Null),
        ("default", &[][..], "search", "mse".into()),
        ("awq", &["--awq"][..], "awq", true.into()),
        ("block", &["--ada-error", "block"][..], "ada_error", "block".into()),
    ] {
        let (code, se, out) = quantize(name, "ada", extra);
        assert_eq!(code, 0, "{name}: {se}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        let settings = &r["summary"]["settings"];
        assert_eq!(settings.get(key).cloned().unwrap_or_default(), value, "{name}: {settings}");
        if name == "minmax" {
            // The settings before the search existed: recorded as they always were.
            assert!(["search", "awq", "ada_error"].iter().all(|k| settings.get(k).is_none()), "{settings}");
        }
        runs.push((name, std::fs::read(out.join("model.safetensors")).unwrap(), out));
    }
    assert_ne!(runs[0].1, runs[1].1, "mse");
    assert_ne!(runs[1].1, runs[2].1, "awq");
    assert_evaluates(&runs[2].2, &text);
    // The default search is min-max for plain RTN per-OC (where the search measured worse) and
    // the error search otherwise; either is taken when asked for.
    for (name, extra, want) in
        [("oc-default", &[][..], serde_json::Value::Null), ("oc-mse", &["--scale-search", "mse"][..], "mse".into())]
    {
        let (code, se, out) = quantize(name, "oc", extra);
        assert_eq!(code, 0, "{name}: {se}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        assert_eq!(r["summary"]["settings"].get("search").cloned().unwrap_or_default(), want, "{name}");
    }
    // The block-level error judges AdaDim's RTN candidates: nothing to judge with a fixed axis.
    let (code, se, out) = quantize("block-oc", "oc", &["--ada-error", "block"]);
    assert_eq!(code, 1);
    assert!(se.contains("--ada-error block") && se.contains("--dim ada"), "{se}");
    assert!(!out.exists());
}

/// GPTQ per-OC with act-order three ways: static groups and group-aware order store no column
/// order, dynamic groups do (a larger file); group-aware is recorded in the run's settings and
/// gives a model that evaluates.
#[test]
fn group_aware_act_order_stores_no_permutation() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    write_random_checkpoint(&m, &tiny_config(), 3).unwrap();
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer. ".repeat(30)).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |name: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let (m, text, out_s) = (s(&m), s(&text), s(&out));
        let mut args = vec!["quantize", "--model", &m, "--method", "gptq", "--dim", "oc", "--bits", "3", "--group"];
        args.extend(["16", "--calib", &text, "--nsamples", "4", "--calib-seqlen", "32", "--out", &out_s]);
        args.extend(extra);
        let (code, _, se) = adadim(&args);
        assert_eq!(code, 0, "{name}: {se}");
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        (std::fs::read(out.join("model.safetensors")).unwrap(), r["summary"]["settings"].clone(), out)
    };
    let (aware, settings, out) = run("aware", &["--group-aware"]);
    let (fixed, fixed_settings, _) = run("static", &[]);
    let (dynamic, ..) = run("dynamic", &["--static-groups", "false"]);
    assert_eq!(settings["group_aware"], true, "{settings}");
    assert!(fixed_settings.get("group_aware").is_none(), "off: not recorded, {fixed_settings}");
    assert_ne!(aware, fixed);
    assert!(dynamic.len() > fixed.len(), "dynamic groups store their column order");
    assert_evaluates(&out, &text);
}

/// `adadim compare` reuses a finished run only when it was made with the same settings and
/// calibration: other settings over an explicit --work are an error naming the run.
#[test]
fn runs_are_reused_only_with_their_own_settings() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    let (code, _, se) = adadim(&["synth", "--shape", "tiny", "--dtype", "f32", "--out", m.to_str().unwrap()]);
    assert_eq!(code, 0, "{se}");
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer by this sun of York. ".repeat(60))
        .unwrap();
    let work = d.path().join("work");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (m, text, work) = (s(&m), s(&text), s(&work));
    let base = [
        "compare",
        "--model",
        &m,
        "--bits",
        "3",
        "--group",
        "16",
        "--calib",
        &text,
        "--nsamples",
        "4",
        "--calib-seqlen",
        "32",
        "--dataset",
        &text,
        "--windows",
        "1",
        "--work",
        &work,
    ];
    let (code, first, se) = adadim(&base);
    assert_eq!(code, 0, "{se}");
    assert!(se.contains("quantizing: GPTQ-ada"), "{se}");
    // The same command again reuses the runs and prints the same numbers.
    let (code, again, se) = adadim(&base);
    assert_eq!(code, 0, "{se}");
    assert!(!se.contains("quantizing"), "{se}");
    assert_eq!(first, again);
    // Another setting over the same --work: an error naming the run, not its old numbers.
    let (code, _, se) = adadim(&[&base[..], &["--act-order", "false"]].concat());
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("made with other settings") && se.contains(&work), "{se}");
}

/// `--rotate`: the run quantizes the rotated copy of the model (made once, then reused), which
/// computes what the source does: at 8 bits it evaluates as the float model does.
#[test]
fn rotate_quantizes_a_rotated_copy_that_computes_the_same() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    write_random_checkpoint(&m, &tiny_config(), 6).unwrap();
    let text = calib_text(d.path());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let float = eval_ppl(&m, &text, None);
    let mut sources = Vec::new();
    for run in ["q1", "q2"] {
        let out = d.path().join(run);
        let args = [
            "quantize",
            "--model",
            &s(&m),
            "--rotate",
            "3",
            "--method",
            "gptq",
            "--dim",
            "ada",
            "--bits",
            "8",
            "--group",
            "16",
            "--calib",
            &s(&text),
            "--nsamples",
            "4",
            "--calib-seqlen",
            "32",
            "--out",
            &s(&out),
        ];
        let (code, _, se) = adadim(&args);
        assert_eq!(code, 0, "{se}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
        let source = report["summary"]["model"].as_str().unwrap().to_string();
        assert!(source.contains("rotated") && source.ends_with("-s3"), "{source}");
        let q = eval_ppl(&out, &text, None);
        assert!((q - float).abs() < 0.01 * float, "8-bit rotated {q} against float {float}");
        sources.push(source);
    }
    assert_eq!(sources[0], sources[1], "the rotated copy is made once and reused");
}

/// `--rotate-search K`: K rotated runs, each scored on the calibration text, the lowest kept
/// (its record beside it), the others and the work directory gone; a BERT is refused.
#[test]
fn rotate_search_keeps_the_rotation_best_on_the_calibration_text() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    write_random_checkpoint(&m, &tiny_config(), 8).unwrap();
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer by this sun. ".repeat(100))
        .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (m_s, text_s) = (s(&m), s(&text));
    // `quantize --rotate 10` (3-bit GPTQ-ada) into `out`, with `extra` flags.
    let quantize = |out: &Path, extra: &[&str]| {
        let o = s(out);
        let mut args = vec!["quantize", "--model", &m_s, "--rotate", "10", "--method", "gptq", "--bits", "3"];
        args.extend(["--group", "16", "--calib", &text_s, "--nsamples", "4", "--calib-seqlen", "32", "--out", &o]);
        args.extend(extra);
        adadim(&args)
    };
    let out = d.path().join("q");
    let (code, _, se) = quantize(&out, &["--rotate-search", "3"]);
    assert_eq!(code, 0, "{se}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("rotation-search.json")).unwrap()).unwrap();
    let cands: Vec<(u64, f64)> = serde_json::from_value(record["candidates"].clone()).unwrap();
    assert_eq!(cands.iter().map(|c| c.0).collect::<Vec<_>>(), [10, 11, 12], "{record}");
    let best = cands.iter().min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
    assert_eq!(record["chosen"].as_u64(), Some(best.0), "{record}");
    // The kept model is the chosen rotation's, and scores what the search said it does.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let source = report["summary"]["model"].as_str().unwrap();
    assert!(source.ends_with(&format!("-s{}", best.0)), "{source}");
    let seqlen = record["seqlen"].as_u64().unwrap().to_string();
    let (dir, t) = (s(&out), s(&text));
    let (code, so, se) =
        adadim(&["eval", "ppl", "--model", &dir, "--dataset", &t, "--seqlen", &seqlen, "--limit", "8", "--json"]);
    assert_eq!(code, 0, "{se}");
    let ppl = serde_json::from_str::<serde_json::Value>(&so).unwrap()["ppl"].as_f64().unwrap();
    assert_eq!(ppl, best.1, "{record}");
    assert!(!d.path().join(".q.rotations").exists(), "the search's work directory is left");
    // Again into the same output: refused, nothing written over.
    let (code, _, se) = quantize(&out, &["--rotate-search", "3"]);
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("already exists"), "{se}");

    // A search cut short keeps its finished candidates: one made by the same job is reused,
    // one made with other settings is refused by name.
    let (work, r) = (d.path().join(".r.rotations"), d.path().join("r"));
    let (code, _, se) = quantize(&work.join("seed10"), &[]);
    assert_eq!(code, 0, "{se}");
    let (code, _, se) = quantize(&r, &["--rotate-search", "2"]);
    assert_eq!(code, 0, "{se}");
    assert!(!se.contains("(seed 10)") && se.contains("(seed 11)"), "seed 10 should be reused:\n{se}");
    std::fs::remove_dir_all(&r).unwrap();
    let (code, _, se) = quantize(&work.join("seed10"), &["--percdamp", "0.2"]);
    assert_eq!(code, 0, "{se}");
    let (code, _, se) = quantize(&r, &["--rotate-search", "2"]);
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("seed10") && se.contains("other settings"), "{se}");
}

/// `adadim rotate` refuses what it cannot rotate and never writes over a directory.
#[test]
fn rotate_refuses_an_existing_output_and_a_packed_model() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    write_random_checkpoint(&m, &tiny_config(), 7).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let taken = d.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("notes.txt"), "keep").unwrap();
    let (code, _, se) = adadim(&["rotate", "--model", &s(&m), "--out", &s(&taken)]);
    assert_ne!(code, 0);
    assert!(se.contains("already exists"), "{se}");
    assert_eq!(only_entries(&taken), vec!["notes.txt".to_string()]);
    // A packed model is named as such.
    let text = calib_text(d.path());
    let q = d.path().join("q");
    let args = [
        "quantize",
        "--model",
        &s(&m),
        "--method",
        "rtn",
        "--dim",
        "oc",
        "--bits",
        "4",
        "--group",
        "16",
        "--calib",
        &s(&text),
        "--nsamples",
        "2",
        "--calib-seqlen",
        "16",
        "--out",
        &s(&q),
    ];
    let (code, _, se) = adadim(&args);
    assert_eq!(code, 0, "{se}");
    let (code, _, se) = adadim(&["rotate", "--model", &s(&q), "--out", &s(&d.path().join("r"))]);
    assert_ne!(code, 0);
    assert!(se.contains("already quantized"), "{se}");
    assert!(!d.path().join("r").exists());
    // Rotated with --heads: a float model that evaluates as the source does.
    let r = d.path().join("r2");
    let (code, so, se) = adadim(&["rotate", "--model", &s(&m), "--out", &s(&r), "--seed", "5", "--heads"]);
    assert_eq!(code, 0, "{se}");
    assert!(so.contains("\"heads\": true"), "{so}");
    let (a, b) = (eval_ppl(&m, &text, None), eval_ppl(&r, &text, None));
    assert!((a - b).abs() < 1e-4 * a, "{a} against {b}");
}
