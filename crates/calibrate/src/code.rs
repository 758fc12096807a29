//! `--calib code`: the Python standard library's own source, as code calibration text.
//!
//! The `.py` files under `sysconfig.get_paths()["stdlib"]` of the local `python3`, in sorted
//! order of their relative paths, each after a `# file: <path>` line. Left out: test suites
//! (any `test` / `tests` / `idle_test` directory), installed packages (`site-packages`,
//! `dist-packages`) and generated tables (`encodings`, `pydoc_data`). The same interpreter
//! gives the same text byte for byte. HumanEval's problems are not in it: they were written
//! by hand for the benchmark and are not part of any Python release.

use crate::error::{CalibError, Result};
use std::path::{Path, PathBuf};

/// Directory names whose contents are left out.
const SKIP_DIRS: [&str; 7] =
    ["test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "pydoc_data"];

/// The standard library directory of `$ADADIM_PYTHON` / `python3`.
pub fn stdlib_dir() -> Result<PathBuf> {
    let python = std::env::var("ADADIM_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .args(["-I", "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .output()
        .map_err(|e| CalibError::Invalid(format!("--calib code: could not run {python}: {e}")))?;
    if !out.status.success() {
        return Err(CalibError::Invalid(format!(
            "--calib code: {python} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The kept `.py` files under `root`, as paths relative to it, sorted.
pub fn source_files(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = root.join(&rel);
        let entries =
            std::fs::read_dir(&dir).map_err(|e| CalibError::Data { path: dir.clone(), msg: e.to_string() })?;
        for e in entries {
            let e = e.map_err(|e| CalibError::Data { path: dir.clone(), msg: e.to_string() })?;
            let name = e.file_name();
            let kind = e.file_type().map_err(|err| CalibError::Data { path: e.path(), msg: err.to_string() })?;
            if kind.is_dir() && !SKIP_DIRS.iter().any(|s| name == *s) {
                dirs.push(rel.join(&name));
            } else if kind.is_file() && Path::new(&name).extension().is_some_and(|x| x == "py") {
                out.push(rel.join(&name));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The files concatenated, each after a `# file: <relative path>` line.
pub fn code_text(root: &Path, files: &[PathBuf]) -> Result<String> {
    let mut out = String::new();
    for rel in files {
        let path = root.join(rel);
        let bytes = std::fs::read(&path).map_err(|e| CalibError::Data { path: path.clone(), msg: e.to_string() })?;
        out.push_str(&format!("# file: {}\n", rel.display()));
        out.push_str(&String::from_utf8_lossy(&bytes));
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_sources_without_tests_or_packages() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "b.py",
            "a.py",
            "json/__init__.py",
            "json/tests/t.py",
            "test/x.py",
            "site-packages/p.py",
            "notes.txt",
            "z/y/deep.py",
        ] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, format!("# {f}")).unwrap();
        }
        let files = source_files(d.path()).unwrap();
        let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(names, ["a.py", "b.py", "json/__init__.py", "z/y/deep.py"]);
        let text = code_text(d.path(), &files).unwrap();
        assert!(text.starts_with("# file: a.py\n# a.py\n\n# file: b.py\n"), "{text}");
        assert_eq!(text, code_text(d.path(), &source_files(d.path()).unwrap()).unwrap());
    }
}
