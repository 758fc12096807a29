//! `adadim compare` reuses a finished run only when it was made with the same settings and
//! calibration: other settings over an explicit --work are an error naming the run.

use std::path::Path;
use std::process::Command;

fn adadim(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_adadim"))
        .args(args)
        .env("ADADIM_HOME", std::env::temp_dir().join("adadim-test-home"))
        .output()
        .unwrap();
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!se.contains("panicked"), "panic: {se}");
    (out.status.code().unwrap_or(-1), so, se)
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

#[test]
fn runs_are_reused_only_with_their_own_settings() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m");
    let (code, _, se) = adadim(&["synth", "--shape", "tiny", "--dtype", "f32", "--out", &s(&m)]);
    assert_eq!(code, 0, "{se}");
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer by this sun of York. ".repeat(60))
        .unwrap();
    let work = d.path().join("work");
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
