//! A full disk mid-write: a clear error naming the file, exit code 1, nothing half-written
//! left in the output's folder. The disk is a small tmpfs mounted in a private user and mount
//! namespace (`unshare -rm`, no privileges needed), so the test runs anywhere Linux allows
//! user namespaces.

use adadim_load::synth::{tiny_config, write_random_checkpoint};
use std::path::Path;
use std::process::Command;

/// Runs `adadim ARGS` inside a namespace where `mnt` is a fresh tmpfs of `size`.
fn adadim_on_small_disk(mnt: &Path, size: &str, args: &[String]) -> (i32, String, String) {
    let bin = env!("CARGO_BIN_EXE_adadim");
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    // List what is left on the small disk after the run, so the test can check it.
    let script = format!(
        "mount -t tmpfs -o size={size} tmpfs '{}' && '{bin}' {}; code=$?; echo LEFT:; ls -A '{}'; exit $code",
        mnt.display(),
        quoted.join(" "),
        mnt.display()
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("ADADIM_HOME", std::env::temp_dir().join("adadim-test-home"))
        .output()
        .expect("unshare (util-linux) runs");
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!se.contains("panicked"), "panic: {se}");
    assert!(!se.contains("unshare:") && !se.contains("mount:"), "could not set up the small disk: {se}");
    let left = so.rsplit("LEFT:").next().unwrap_or_default().trim().to_string();
    (out.status.code().unwrap_or(-1), left, se)
}

#[test]
fn quantize_and_synth_on_a_full_disk_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    write_random_checkpoint(&m, &tiny_config(), 3).unwrap();
    let text = d.path().join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer. ".repeat(30)).unwrap();
    let mnt = d.path().join("disk");
    std::fs::create_dir(&mnt).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let out = mnt.join("q");

    // The tiny model's packed output is ~100 kB: 48 kB of disk runs out while writing it.
    let args: Vec<String> = [
        "quantize",
        "--model",
        &s(&m),
        "--method",
        "rtn",
        "--dim",
        "ada",
        "--bits",
        "4",
        "--group",
        "16",
        "--calib",
        &s(&text),
        "--nsamples",
        "2",
        "--calib-seqlen",
        "32",
        "--out",
        &s(&out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let (code, left, se) = adadim_on_small_disk(&mnt, "48k", &args);
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("No space left on device") || se.contains("os error 28"), "{se}");
    assert!(se.contains(&s(&mnt)), "the error names the file: {se}");
    assert_eq!(left.trim(), "", "nothing left on the full disk: {left}");

    // synth: the same on a larger model.
    let args: Vec<String> = ["synth", "--shape", "smollm2", "--out", &s(&out)].iter().map(|x| x.to_string()).collect();
    let (code, left, se) = adadim_on_small_disk(&mnt, "1m", &args);
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("No space left on device") || se.contains("os error 28"), "{se}");
    assert_eq!(left.trim(), "", "nothing left on the full disk: {left}");

    // With room enough, the same quantize succeeds (the test's disk is not the problem).
    let args: Vec<String> = [
        "quantize",
        "--model",
        &s(&m),
        "--method",
        "rtn",
        "--dim",
        "ada",
        "--bits",
        "4",
        "--group",
        "16",
        "--calib",
        &s(&text),
        "--nsamples",
        "2",
        "--calib-seqlen",
        "32",
        "--out",
        &s(&out),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let (code, left, se) = adadim_on_small_disk(&mnt, "64m", &args);
    assert_eq!(code, 0, "{se}");
    assert_eq!(left.trim(), "q", "{left}");
}
