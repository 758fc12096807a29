//! What the command-line tests share.

use std::process::Command;

/// Runs the adadim binary with `args` (its home a test directory, so nothing of the user's is
/// touched): exit code (-1 when killed by a signal), stdout, stderr. A panic fails the test.
pub fn adadim(args: &[&str]) -> (i32, String, String) {
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
