//! Resuming an interrupted run: a work directory that holds every finished decoder block.
//!
//! ```text
//! DIR/lock                      the PID of the run using DIR (created with create_new)
//! DIR/resume.json               the job (its settings and inputs, and their SHA-256), blocks done
//! DIR/blocks/block-00007.safetensors   block 7's quantized linears (codes bit-packed, params), reports
//!                                      and the input-channel RMS of each linear
//! DIR/hidden-00008.f32          the calibration hidden states entering block 8 (only the latest)
//! ```
//!
//! After each block: the block file, then the hidden states, are written under a temporary
//! name, synced and renamed; then `resume.json` (the same way) counts the block as done; then
//! the previous hidden states are deleted. A crash at any point leaves either the old or the
//! new state whole, and a re-run of the same job continues after the last block counted.
//! What is saved is exact (codes, f32 params, f32 activations), so a resumed run writes the
//! same bytes as an uninterrupted one.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use adadim_load::safetensors_out::StreamWriter;
use adadim_load::state_dir::{read_small_regular, StateDir};
use adadim_model::LinearKind;
use adadim_quantize::{QuantSpec, QuantizedMatrix};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::driver::{FinishedBlock, LinearReport, Timings};
use crate::error::{CalibError, Result};

/// Version of the work directory's layout; another version is a different job.
const LAYOUT_VERSION: u32 = 2;

/// The `--bpw` damage table inside the directory.
const DAMAGE_FILE: &str = "damage.json";

/// `resume.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    layout_version: u32,
    /// SHA-256 of `job` as JSON.
    job_sha256: String,
    /// What identifies the job (settings, the inputs' checksums, output format, tool version).
    job: serde_json::Value,
    /// Blocks finished and saved in `blocks/`, in order.
    done: usize,
    /// SHA-256 of every saved file (block files, the hidden states), by path inside the
    /// directory: verified before a resumed run trusts them.
    #[serde(default)]
    files: BTreeMap<String, String>,
    /// The file holding the hidden states entering block `done`, when the job calibrates.
    hidden: Option<String>,
    /// Clocks of the finished blocks (the time of a block cut short is lost).
    timings: Timings,
    /// Wall seconds spent by earlier runs up to the last block saved.
    elapsed_s: f64,
}

/// The work directory of one job, locked for this process while it lives.
pub struct WorkDir {
    dir: PathBuf,
    manifest: Manifest,
    opened: Instant,
    elapsed_before: f64,
    _lock: Lock,
    state: StateDir,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CalibError + '_ {
    move |source| CalibError::Io { path: path.to_path_buf(), source }
}

fn damaged(path: &Path, msg: impl Into<String>) -> CalibError {
    CalibError::Resume { path: path.to_path_buf(), msg: msg.into() }
}

/// Write `path` whole or not at all: a fresh temporary file beside it, synced, then renamed.
/// Returns the SHA-256 of what was written.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut Hashing<BufWriter<File>>) -> std::io::Result<()>,
) -> Result<String> {
    let tmp = tmp_name(path);
    let file = OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io(&tmp))?;
    let mut out = Hashing { inner: BufWriter::with_capacity(1 << 20, file), sha: Sha256::new() };
    write(&mut out).map_err(io(&tmp))?;
    let sha = hex(out.sha.finalize().as_slice());
    let file = out.inner.into_inner().map_err(|e| CalibError::Io { path: tmp.clone(), source: e.into_error() })?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(sha)
}

/// A writer (or reader) that hashes the bytes passing through it.
struct Hashing<T> {
    inner: T,
    sha: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `resume.json` read without following a link and within a size cap: `None` when absent.
fn read_manifest(path: &Path) -> Option<std::result::Result<Manifest, String>> {
    const CAP: u64 = 64 << 20;
    if std::fs::symlink_metadata(path).is_err() {
        return None;
    }
    Some(match read_small_regular(path, CAP) {
        None => Err(format!("not a regular file of at most {CAP} bytes")),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
    })
}

fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The leaves where two JSON values differ, as `path: old -> new`.
fn differences(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                differences(&p, a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null), out);
            }
        }
        _ if old != new => out.push(format!("{path}: {old} -> {new}")),
        _ => {}
    }
}

impl WorkDir {
    /// Open (or create) the work directory `dir` for `job` and lock it.
    ///
    /// A directory holding the same job (same `job` JSON) is resumed: [`WorkDir::done`] says
    /// how many blocks it holds. One holding another job is an error naming what differs,
    /// unless `restart`, which empties it first. One locked by a running process is an error.
    /// Only a directory proven to be adadim's state is ever emptied ([`StateDir`]): a link, a
    /// directory of another user or one holding other files is refused untouched.
    pub fn open(dir: &Path, job: serde_json::Value, restart: bool) -> Result<WorkDir> {
        let state = match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateDir::create(dir)?,
            _ => StateDir::open(dir, &|d| read_manifest(&d.join("resume.json")).is_some_and(|m| m.is_ok()))?,
        };
        let lock = Lock::acquire(&state)?;
        let job_sha256 = adadim_load::fetch::sha256_hex(job.to_string().as_bytes());
        let path = dir.join("resume.json");
        let old: Option<Manifest> = match read_manifest(&state.at("resume.json")) {
            Some(Ok(m)) if !restart => Some(m),
            Some(Err(e)) if !restart => {
                return Err(damaged(&path, format!("unreadable ({e}); pass --restart to start over")))
            }
            _ => None,
        };
        let manifest = match old {
            Some(m) if m.layout_version == LAYOUT_VERSION && m.job_sha256 == job_sha256 => m,
            Some(m) => {
                let mut diffs = Vec::new();
                if m.layout_version != LAYOUT_VERSION {
                    diffs.push(format!("work directory layout: {} -> {LAYOUT_VERSION}", m.layout_version));
                }
                differences("", &m.job, &job, &mut diffs);
                if diffs.is_empty() {
                    diffs.push("the job's checksum".into());
                }
                let n = diffs.len();
                diffs.truncate(4);
                if n > 4 {
                    diffs.push(format!("and {} more", n - 4));
                }
                return Err(CalibError::OtherJob { dir: dir.to_path_buf(), differences: diffs.join("; ") });
            }
            None => {
                // A fresh start: whatever a run cut short before its first block left goes.
                state.clear(&["lock"])?;
                let m = Manifest {
                    layout_version: LAYOUT_VERSION,
                    job_sha256,
                    job,
                    done: 0,
                    hidden: None,
                    files: BTreeMap::new(),
                    timings: Timings::default(),
                    elapsed_s: 0.0,
                };
                std::fs::create_dir(state.at("blocks")).map_err(io(&dir.join("blocks")))?;
                let w = WorkDir {
                    dir: dir.to_path_buf(),
                    elapsed_before: 0.0,
                    manifest: m,
                    opened: Instant::now(),
                    _lock: lock,
                    state,
                };
                w.write_manifest()?;
                return Ok(w);
            }
        };
        // The one file outside blocks/ a manifest names is only ever the name `save_block` gives
        // it: an edited `hidden` could otherwise name a file outside the directory, read back as
        // state and then deleted as superseded.
        if let Some(h) = manifest.hidden.as_deref().filter(|&h| h != format!("hidden-{:05}.f32", manifest.done)) {
            return Err(damaged(&path, format!("names '{}' as the hidden states entering block {}, not hidden-{:05}.f32; pass --restart to start over", adadim_load::printable(h), manifest.done, manifest.done)));
        }
        // Left by a run cut short between two steps: half-written files, superseded states.
        for e in std::fs::read_dir(state.at("")).map_err(io(dir))? {
            let name = e.map_err(io(dir))?.file_name().to_string_lossy().into_owned();
            let stale =
                name.ends_with(".tmp") || (name.starts_with("hidden-") && Some(&name) != manifest.hidden.as_ref());
            if stale {
                state.remove(&name)?;
            }
        }
        for e in std::fs::read_dir(state.at("blocks")).map_err(io(&dir.join("blocks")))? {
            let name = e.map_err(io(dir))?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                state.remove(Path::new("blocks").join(&name))?;
            }
        }
        let w = WorkDir {
            dir: dir.to_path_buf(),
            elapsed_before: manifest.elapsed_s,
            manifest,
            opened: Instant::now(),
            _lock: lock,
            state,
        };
        w.verify_blocks()?;
        Ok(w)
    }

    /// Every finished block's file as it was saved (its SHA-256 in `resume.json`): a resumed
    /// run builds on saved state only once it is proven intact.
    fn verify_blocks(&self) -> Result<()> {
        for layer in 0..self.manifest.done {
            self.checked_read(&self.block_path(layer), &format!("blocks/block-{layer:05}.safetensors"))?;
        }
        Ok(())
    }

    /// The bytes of the saved file `rel`, checked against the SHA-256 recorded when it was saved.
    fn checked_read(&self, path: &Path, rel: &str) -> Result<Vec<u8>> {
        let want = self.manifest.files.get(rel).ok_or_else(|| damaged(path, "no checksum recorded for it"))?;
        let bytes = std::fs::read(self.state.at(rel)).map_err(io(path))?;
        let got = adadim_load::fetch::sha256_hex(&bytes);
        if &got != want {
            return Err(damaged(path, format!("its SHA-256 is {got}, but {want} was recorded when it was saved")));
        }
        Ok(bytes)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Blocks already finished (by earlier runs, then by this one).
    pub fn done(&self) -> usize {
        self.manifest.done
    }

    /// Wall seconds earlier runs spent on the blocks they finished.
    pub fn earlier_seconds(&self) -> f64 {
        self.elapsed_before
    }

    /// Clocks of the finished blocks.
    pub(crate) fn timings(&self) -> Timings {
        self.manifest.timings.clone()
    }

    /// The work directory, for removing and moving entries inside it safely.
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// Delete `dir` if it is what a run whose model was already moved out leaves when stopped
    /// while deleting its work directory: adadim's own state, unlocked, without `model`.
    /// Returns whether it was removed; anything else is left as it is.
    pub fn remove_leftover(dir: &Path) -> Result<bool> {
        let Ok(state) = StateDir::open(dir, &|_| false) else { return Ok(false) };
        let lock = match Lock::acquire(&state) {
            Ok(lock) => lock,
            Err(CalibError::Locked { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if std::fs::symlink_metadata(state.at("model")).is_ok() {
            return Ok(false);
        }
        drop(lock);
        state.delete()?;
        Ok(true)
    }

    /// Delete the directory (the job's output has been moved out of it).
    pub fn remove(self) -> Result<()> {
        let WorkDir { state, _lock, .. } = self;
        drop(_lock);
        Ok(state.delete()?)
    }

    fn write_manifest(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.manifest).expect("the manifest serializes");
        write_atomic(&self.dir.join("resume.json"), |w| w.write_all(&bytes))?;
        Ok(self.state.sync()?)
    }

    fn block_path(&self, layer: usize) -> PathBuf {
        self.dir.join("blocks").join(format!("block-{layer:05}.safetensors"))
    }

    /// Persist block `layer` (the next one): its quantized linears and reports, the hidden
    /// states entering the next block (`None` after the last block, or without calibration),
    /// and the clocks so far; then count it as done.
    pub(crate) fn save_block(
        &mut self,
        layer: usize,
        linears: &[(LinearKind, QuantizedMatrix)],
        reports: &[LinearReport],
        next_xs: Option<&[Tensor]>,
        timings: &Timings,
    ) -> Result<()> {
        assert_eq!(layer, self.manifest.done, "blocks are saved in order");
        let path = self.block_path(layer);
        let tmp = tmp_name(&path);
        let reserved = 4096 + 512 * linears.len() + 1024 * reports.len();
        let mut w = StreamWriter::create(&tmp, reserved)?;
        let mut meta = vec![("reports".to_string(), serde_json::to_string(reports).expect("reports serialize"))];
        for (kind, q) in linears {
            let n = kind.short();
            let bits = q.spec().bits;
            let packed = adadim_pack::bits::pack(q.codes(), q.rows(), q.cols(), bits);
            let rb = adadim_pack::bits::row_bytes(q.cols(), bits);
            w.write(&format!("{n}.codes"), "U8", &[q.rows(), rb], &packed[..q.rows() * rb])?;
            let (pr, pc) = q.param_shape();
            w.write(&format!("{n}.scales"), "F32", &[pr, pc], &f32_bytes(q.scales()))?;
            w.write(&format!("{n}.zeros"), "F32", &[pr, pc], &f32_bytes(q.zeros()))?;
            if let Some(g) = q.g_idx() {
                w.write(
                    &format!("{n}.g_idx"),
                    "U32",
                    &[g.len()],
                    &g.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
                )?;
            }
            meta.push((format!("{n}.spec"), serde_json::to_string(q.spec()).expect("specs serialize")));
            meta.push((format!("{n}.shape"), format!("[{},{}]", q.rows(), q.cols())));
        }
        // The reports' per-input-channel vectors (not in their JSON), one tensor each.
        for r in reports {
            for (what, v) in [("input_rms", &r.input_rms), ("awq_scales", &r.awq_scales)] {
                if !v.is_empty() {
                    w.write(&format!("{}.{what}", short_name(r.module)), "F32", &[v.len()], &f32_bytes(v))?;
                }
            }
        }
        w.finish(&meta)?;
        let sha = adadim_load::fetch::sha256_file(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        self.manifest.files.insert(format!("blocks/block-{layer:05}.safetensors"), sha);
        let old_hidden = self.manifest.hidden.take();
        if let Some(xs) = next_xs {
            let name = format!("hidden-{:05}.f32", layer + 1);
            let sha = write_atomic(&self.dir.join(&name), |w| {
                for x in xs {
                    let v = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(std::io::Error::other)?;
                    w.write_all(&f32_bytes(&v))?;
                }
                Ok(())
            })?;
            self.manifest.files.insert(name.clone(), sha);
            self.manifest.hidden = Some(name);
            self.state.sync()?;
        }
        File::open(self.state.at("blocks")).and_then(|d| d.sync_all()).map_err(io(&self.dir.join("blocks")))?;
        self.manifest.done = layer + 1;
        self.manifest.timings = timings.clone();
        self.manifest.elapsed_s = self.elapsed_before + self.opened.elapsed().as_secs_f64();
        self.write_manifest()?;
        if let Some(old) = old_hidden.filter(|o| Some(o) != self.manifest.hidden.as_ref()) {
            self.manifest.files.remove(&old);
            self.state.remove(&old)?;
        }
        Ok(())
    }

    /// Persist the `--bpw` damage table, so that a resumed run makes the same allocation
    /// without measuring it again.
    pub(crate) fn save_damage(&mut self, table: &crate::damage::DamageTable) -> Result<()> {
        let bytes = serde_json::to_vec(table).expect("the damage table serializes");
        let sha = write_atomic(&self.dir.join(DAMAGE_FILE), |w| w.write_all(&bytes))?;
        self.manifest.files.insert(DAMAGE_FILE.into(), sha);
        self.write_manifest()
    }

    /// The damage table an earlier run saved (checked against its SHA-256), if any.
    pub(crate) fn damage(&self) -> Result<Option<crate::damage::DamageTable>> {
        if !self.manifest.files.contains_key(DAMAGE_FILE) {
            return Ok(None);
        }
        let path = self.dir.join(DAMAGE_FILE);
        let bytes = self.checked_read(&path, DAMAGE_FILE)?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| damaged(&path, format!("not a damage table: {e}")))
    }

    /// The hidden states entering block [`WorkDir::done`], one `[len, dim]` per sample length.
    pub(crate) fn load_hidden(&self, lens: &[usize], dim: usize) -> Result<Vec<Tensor>> {
        let name = self.manifest.hidden.as_deref().ok_or_else(|| {
            damaged(
                &self.dir.join("resume.json"),
                format!("no calibration hidden states recorded after block {}", self.done()),
            )
        })?;
        let path = self.dir.join(name);
        let file = File::open(&path).map_err(io(&path))?;
        let want: u64 = lens.iter().map(|&l| (l * dim * 4) as u64).sum();
        let got = file.metadata().map_err(io(&path))?.len();
        if got != want {
            return Err(damaged(&path, format!("{got} bytes, expected {want} ({} samples x {dim} f32)", lens.len())));
        }
        let want_sha = self.manifest.files.get(name).ok_or_else(|| damaged(&path, "no checksum recorded for it"))?;
        let mut r = Hashing { inner: BufReader::with_capacity(1 << 20, file), sha: Sha256::new() };
        let xs = lens
            .iter()
            .map(|&len| {
                let mut bytes = vec![0u8; len * dim * 4];
                r.read_exact(&mut bytes).map_err(io(&path))?;
                let v: Vec<f32> =
                    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
                Tensor::from_vec(v, (len, dim), &Device::Cpu).map_err(|e| damaged(&path, e.to_string()))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let got_sha = hex(r.sha.finalize().as_slice());
        if &got_sha != want_sha {
            return Err(damaged(
                &path,
                format!("its SHA-256 is {got_sha}, but {want_sha} was recorded when it was saved"),
            ));
        }
        Ok(xs)
    }

    /// [`WorkDir::load_block`] for the fuzz target `fuzz_resume` (`fuzz/src/calibrate_targets.rs`)
    /// and its CI replay: the block reader parses saved files, yet nothing public reaches it
    /// short of a whole resumed quantization run over a model. A test seam, not an API.
    #[doc(hidden)]
    pub fn fuzz_load_block(&self, layer: usize) -> Result<FinishedBlock> {
        self.load_block(layer)
    }

    /// Block `layer`'s quantized linears (in the order saved) and reports.
    pub(crate) fn load_block(&self, layer: usize) -> Result<FinishedBlock> {
        let path = self.block_path(layer);
        let bytes = self.checked_read(&path, &format!("blocks/block-{layer:05}.safetensors"))?;
        let bad = |msg: String| damaged(&path, msg);
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| -> Result<String> {
            meta.get(k).cloned().ok_or_else(|| bad(format!("no '{k}' in the metadata")))
        };
        let mut reports: Vec<LinearReport> =
            serde_json::from_str(&get("reports")?).map_err(|e| bad(format!("reports: {e}")))?;
        for r in &mut reports {
            for what in ["input_rms", "awq_scales"] {
                let Ok(t) = st.tensor(&format!("{}.{what}", short_name(r.module))) else { continue };
                if r.cols.checked_mul(4) != Some(t.data().len()) {
                    return Err(bad(format!(
                        "{}.{what}: {} bytes for {} input channels",
                        short_name(r.module),
                        t.data().len(),
                        r.cols
                    )));
                }
                let v: Vec<f32> =
                    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
                if what == "awq_scales" && v.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                    return Err(bad(format!(
                        "{}.{what}: a scale that is not finite and positive",
                        short_name(r.module)
                    )));
                }
                match what {
                    "input_rms" => r.input_rms = v,
                    _ => r.awq_scales = v,
                }
            }
        }
        let mut linears = Vec::new();
        for kind in LinearKind::ALL {
            let n = kind.short();
            let Some(spec) = meta.get(&format!("{n}.spec")) else { continue };
            let spec: QuantSpec = serde_json::from_str(spec).map_err(|e| bad(format!("{n}.spec: {e}")))?;
            // The bit width before unpacking with it: 0 bits made every row 0 bytes (an empty
            // codes tensor passed) and the unpacker then indexed an empty row.
            spec.validate().map_err(|e| bad(format!("{n}.spec: {e}")))?;
            let (rows, cols): (usize, usize) =
                serde_json::from_str(&get(&format!("{n}.shape"))?).map_err(|e| bad(format!("{n}.shape: {e}")))?;
            let data =
                |t: &str| st.tensor(&format!("{n}.{t}")).map(|v| v.data()).map_err(|e| bad(format!("{n}.{t}: {e}")));
            let codes = data("codes")?;
            // Checked: a shape whose byte count wraps around (2^63 rows of 2 bytes is 0) passed
            // with an empty codes tensor. With bits >= 2, rows * cols is then at most 4 x the bytes.
            let want = cols.checked_mul(usize::from(spec.bits)).and_then(|b| rows.checked_mul(b.div_ceil(8)));
            if want != Some(codes.len()) {
                return Err(bad(format!(
                    "{n}.codes: {} bytes for [{rows}, {cols}] at {} bits",
                    codes.len(),
                    spec.bits
                )));
            }
            let mut padded = codes.to_vec();
            padded.resize(codes.len() + adadim_pack::bits::PAD, 0);
            let codes = adadim_pack::bits::unpack(&padded, rows, cols, spec.bits);
            let floats = |t: &str| -> Result<Vec<f32>> {
                Ok(data(t)?.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
            };
            let g_idx = match st.tensor(&format!("{n}.g_idx")) {
                Ok(t) => {
                    Some(t.data().chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
                }
                Err(_) => None,
            };
            let q = QuantizedMatrix::from_parts(rows, cols, spec, codes, floats("scales")?, floats("zeros")?, g_idx)
                .map_err(|e| bad(format!("{n}: {e}")))?;
            linears.push((kind, q));
        }
        Ok((linears, reports))
    }
}

/// `q` for `self_attn.q_proj`: the name block files give a linear's tensors.
fn short_name(module: &str) -> &'static str {
    LinearKind::from_module(module).map_or("unknown", |k| k.short())
}

use adadim_load::safetensors_out::f32_le_bytes as f32_bytes;

/// `DIR/lock`, holding the owner's PID; removed when dropped. A lock whose process is gone
/// (killed, crashed, the machine restarted) is taken over.
struct Lock(PathBuf);

impl Lock {
    fn acquire(state: &StateDir) -> Result<Lock> {
        let (dir, path) = (state.path(), state.at("lock"));
        let shown = dir.join("lock");
        for _ in 0..3 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id()).and_then(|_| f.sync_all()).map_err(io(&shown))?;
                    return Ok(Lock(path));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let pid = read_small_regular(&path, 64)
                        .and_then(|b| String::from_utf8(b).ok())
                        .and_then(|s| s.trim().parse::<u32>().ok());
                    if let Some(pid) = pid.filter(|&p| process_alive(p)) {
                        return Err(CalibError::Locked { dir: dir.to_path_buf(), pid });
                    }
                    state.remove("lock")?;
                }
                Err(e) => return Err(CalibError::Io { path: shown, source: e }),
            }
        }
        Err(CalibError::Locked { dir: dir.to_path_buf(), pid: 0 })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
/// Whether `pid` is a live process running the same program as this one (Linux `/proc`; where
/// there is none, every lock counts as held).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return false; // our own PID: the lock was left by an earlier process that had it
    }
    let Ok(comm) = std::fs::read_to_string("/proc/self/comm") else { return true };
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let zombie = std::fs::read_to_string(proc.join("stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')));
    match zombie {
        None | Some(true) => false,
        Some(false) => std::fs::read_to_string(proc.join("comm")).is_ok_and(|c| c == comm),
    }
}
