//! `adadim quantize` on all-MiniLM-L6-v2: the encoder's layer walk writes a sentence-transformers
//! directory (f32, or packed for the packed kernels) that `embed` loads; 8 bits keep the float
//! embeddings (closer than 4 bits), the packed and the dequantized files embed alike, and what the encoder cannot do
//! is refused without leaving an output.

mod common;
use common::adadim;

use std::path::Path;

fn embeddings(model: &Path, input: &Path) -> Vec<Vec<f64>> {
    let (code, so, se) = adadim(&["embed", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert_eq!(code, 0, "{se}");
    let v: serde_json::Value = serde_json::from_str(&so).unwrap();
    v["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
        .collect()
}

fn min_cosine(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| p * q).sum();
            let n = |v: &[f64]| v.iter().map(|p| p * p).sum::<f64>().sqrt();
            dot / (n(x) * n(y))
        })
        .fold(1.0, f64::min)
}

#[test]
fn a_quantized_minilm_is_a_sentence_transformers_directory_that_embeds() {
    let float = adadim_load::fetch::resolve_model("minilm", &adadim_load::fetch::adadim_home(), &mut |_, _, _| {})
        .expect("fetch minilm");
    let d = tempfile::tempdir().unwrap();
    let calib = d.path().join("calib.txt");
    let line = "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun. ";
    std::fs::write(&calib, line.repeat(200)).unwrap();
    let input = d.path().join("s.txt");
    std::fs::write(&input, "A man is eating food.\nThe weather is lovely today.\nQuantization shrinks models.\n")
        .unwrap();
    let quantize = |name: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let mut args = vec!["quantize", "--model", float.to_str().unwrap(), "--calib", calib.to_str().unwrap()];
        args.extend(["--nsamples", "8", "--calib-seqlen", "48", "--out", out.to_str().unwrap()]);
        args.extend(extra);
        let (code, _, se) = adadim(&args);
        (code, se, out)
    };
    let want = embeddings(&float, &input);
    // 8 bits: the float model's embeddings, nearly exactly.
    let (code, se, w8) = quantize("w8", &["--method", "rtn", "--dim", "oc", "--bits", "8", "--format", "f32"]);
    assert_eq!(code, 0, "{se}");
    for f in ["config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json", "report.json"] {
        assert!(w8.join(f).is_file(), "{f} missing");
    }
    let c8 = min_cosine(&embeddings(&w8, &input), &want);
    assert!(c8 > 0.999, "w8: cosine {c8}");
    // GPTQ-ada at 4 bits: close, its report names every linear; packed and f32 embed alike.
    let args = ["--method", "gptq", "--dim", "ada", "--bits", "4", "--group", "64"];
    let (code, se, f32_dir) = quantize("w4-f32", &[&args[..], &["--format", "f32"]].concat());
    assert_eq!(code, 0, "{se}");
    let (code, se, packed) = quantize("w4-packed", &args);
    assert_eq!(code, 0, "{se}");
    assert!(adadim_model::is_packed(&packed));
    let (a, b) = (embeddings(&f32_dir, &input), embeddings(&packed, &input));
    let c = min_cosine(&a, &b);
    assert!(c > 0.99999, "packed vs f32: cosine {c}");
    let c = min_cosine(&a, &want);
    assert!(c > 0.9 && c < c8, "w4 vs float: cosine {c} (w8 {c8})");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(packed.join("report.json")).unwrap()).unwrap();
    let linears = report["linears"].as_array().unwrap();
    assert_eq!(linears.len(), 36);
    assert!(linears.iter().any(|l| l["module"] == "intermediate.dense"), "{}", linears[4]);
    assert!(linears.iter().all(|l| l["final_error"].as_f64().is_some()));
    // --qep: 0 is the plain run to the byte; 0.5 quantizes weights corrected for the drift of
    // their inputs (a different model, still close to the float one).
    let (code, se, qep0) = quantize("w4-qep0", &[&args[..], &["--format", "f32", "--qep", "0"]].concat());
    assert_eq!(code, 0, "{se}");
    let bytes = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(bytes(&qep0) == bytes(&f32_dir), "--qep 0 changed the weights");
    let (code, se, qep) = quantize("w4-qep", &[&args[..], &["--format", "f32", "--qep", "0.5"]].concat());
    assert_eq!(code, 0, "{se}");
    assert!(bytes(&qep) != bytes(&f32_dir), "--qep 0.5 left the weights as they were");
    let c = min_cosine(&embeddings(&qep, &input), &want);
    assert!(c > 0.9, "w4 --qep 0.5 vs float: cosine {c}");
    // --bpw: each linear's layout chosen from the float encoder's damage table, the budget kept
    // (as the packed file stores it), every linear's candidates in the report.
    let (code, se, bpw) =
        quantize("bpw", &["--method", "rtn", "--dim", "ada", "--bpw", "3.5", "--scale-search", "minmax"]);
    assert_eq!(code, 0, "{se}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bpw.join("report.json")).unwrap()).unwrap();
    let chosen = r["summary"]["allocation"]["bpw"].as_f64().unwrap();
    assert!(chosen <= 3.5 && chosen > 3.0, "allocation at {chosen} bits per weight");
    let lins = r["linears"].as_array().unwrap();
    assert!(lins
        .iter()
        .all(|l| l["layout"]["bits"].as_u64().is_some() && l["candidates"].as_array().is_some_and(|c| c.len() > 8)));
    let widths: std::collections::BTreeSet<u64> = lins.iter().map(|l| l["layout"]["bits"].as_u64().unwrap()).collect();
    assert!(widths.len() > 1, "one width for every linear: {widths:?}");
    let stored = {
        let f = adadim_pack::PackedFile::open(&bpw.join("model.safetensors")).unwrap();
        let (mut bits, mut weights) = (0u64, 0u64);
        for name in f.linear_names().map(str::to_string).collect::<Vec<_>>() {
            let p = f.linear(&name).unwrap();
            bits += 8 * p.stored_bytes() as u64;
            weights += (p.rows() * p.cols()) as u64;
        }
        bits as f64 / weights as f64
    };
    assert!((stored - chosen).abs() < 1e-9, "packed file {stored} vs allocation {chosen}");
    let c = min_cosine(&embeddings(&bpw, &input), &want);
    assert!(c > 0.8, "--bpw 3.5 vs float: cosine {c}");
    // The report reads an encoder run: its per-OC / per-IC errors and the float model's outliers.
    let (code, so, se) = adadim(&["report", packed.to_str().unwrap()]);
    assert_eq!(code, 0, "{se}");
    assert!(so.contains("(2 figures)"), "{so}");
    let page = std::fs::read_to_string(packed.join("report/README.md")).unwrap();
    assert!(page.contains("intermediate.dense") && page.contains("![outliers](outliers.svg)"), "{page}");
    assert!(page.lines().filter(|l| l.starts_with("| 5 | ")).count() == 3, "3 dimensions of layer 5: {page}");
    // Refused: what a BERT cannot take, a budget below every layout, the GPTQ export; nothing is
    // left behind.
    for (name, extra, why) in [
        ("awq", &["--awq"][..], &["--awq", "BERT"][..]),
        ("bpw-ic", &["--bpw", "4", "--ic-modules", "q"][..], &["--bpw", "--ic-modules"][..]),
        ("bpw-low", &["--bpw", "1"][..], &["--bpw 1"][..]),
        ("gptq", &["--dim", "oc", "--format", "gptq"][..], &["--format gptq", "BERT"][..]),
        ("qep-alpha", &["--qep", "2"][..], &["--qep 2: alpha must lie in [0, 1]"][..]),
    ] {
        let (code, se, out) = quantize(name, extra);
        assert_eq!(code, 1, "{name}: {se}");
        assert!(why.iter().all(|w| se.contains(w)), "{name}: {se}");
        assert!(!out.exists(), "{name}: {} left", out.display());
    }
    let left: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "partial directories left: {left:?}");
}
