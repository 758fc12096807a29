//! The AVX-512 kernels against their definition, on an emulated CPU (this machine has no
//! AVX-512): runs `avx512_emulated.py` (see there) on the case library that `cargo test` builds
//! from `examples/avx512_cases.rs`. Needs Python 3 with `bochscpu-python==0.4.0` (the README's
//! test command installs it); without it the test fails, unless `ADADIM_SKIP_EMULATOR=1`.

use std::path::Path;
use std::process::Command;

#[test]
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn avx512_kernels_equal_their_definition_on_an_emulated_cpu() {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/
    let exe = std::env::current_exe().expect("the test's path");
    let profile = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let lib = profile.join("examples").join("libavx512_cases.so");
    assert!(lib.exists(), "{} is missing: `cargo test` builds it with the examples", lib.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("avx512_emulated.py");
    let out = Command::new("python3").arg(&script).arg(&lib).output().expect("running python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    match out.status.code() {
        Some(0) => assert!(text.contains(" cases, 0 failures"), "the script passed without its summary"),
        Some(77) if std::env::var("ADADIM_SKIP_EMULATOR").is_ok_and(|v| v == "1") => {
            eprintln!("SKIPPED: no emulator (ADADIM_SKIP_EMULATOR=1)")
        }
        code => panic!("avx512_emulated.py exited with {code:?}:\n{text}"),
    }
}
