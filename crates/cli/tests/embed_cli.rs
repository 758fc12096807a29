//! `adadim embed` on all-MiniLM-L6-v2: the numpy reference's embeddings come out of the
//! command (JSON, batched), and a bad input file is named.

mod common;
use common::adadim;

#[test]
fn embed_writes_the_reference_embeddings_and_names_bad_lines() {
    let dir = adadim_load::fetch::resolve_model("minilm", &adadim_load::fetch::adadim_home(), &mut |_, _, _| {})
        .expect("fetch minilm");
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/reference/bert_fixture.json"))
            .unwrap(),
    )
    .unwrap();
    let cases = fx["cases"].as_array().unwrap();
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("s.txt");
    let lines: Vec<&str> = cases.iter().map(|c| c["sentence"].as_str().unwrap()).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let out = d.path().join("e.json");
    let m = dir.to_str().unwrap();
    let (code, _, err) = adadim(&[
        "embed",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let got: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(got["dim"], 384);
    let e = got["embeddings"].as_array().unwrap();
    assert_eq!(e.len(), cases.len());
    for (g, c) in e.iter().zip(cases) {
        let worst = g
            .as_array()
            .unwrap()
            .iter()
            .zip(c["embedding"].as_array().unwrap())
            .map(|(a, b)| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "{:?}: {worst:e}", c["sentence"]);
    }
    std::fs::write(&input, "one\n\nthree\n").unwrap();
    let (code, _, err) = adadim(&["embed", "--model", m, "--input", input.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("line 2 is empty") && err.contains("s.txt"), "{err}");
    let (code, _, err) = adadim(&["embed", "--model", m, "--input", "/nonexistent/s.txt"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/s.txt"), "{err}");
    // eval embed: the model against itself agrees exactly; too few sentences are named.
    let text = d.path().join("text.txt");
    let body: String =
        (0..40).map(|i| format!("Sentence number {i} talks about topic {} at some length. ", i * 7 % 13)).collect();
    std::fs::write(&text, body).unwrap();
    let t = text.to_str().unwrap();
    let (code, so, err) = adadim(&[
        "eval",
        "embed",
        "--model",
        m,
        "--reference",
        m,
        "--dataset",
        t,
        "--queries",
        "5",
        "--corpus",
        "30",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&so).unwrap();
    assert!((r["mean_cosine"].as_f64().unwrap() - 1.0).abs() < 1e-6, "{r}");
    assert_eq!((r["recall_at_1"].as_f64(), r["recall_at_10"].as_f64()), (Some(1.0), Some(1.0)), "{r}");
    let (code, _, err) =
        adadim(&["eval", "embed", "--model", m, "--reference", m, "--dataset", t, "--queries", "5", "--corpus", "300"]);
    assert_eq!(code, 1);
    assert!(err.contains("40 sentences") && err.contains("305 needed"), "{err}");
}
