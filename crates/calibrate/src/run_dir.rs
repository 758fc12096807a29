//! A quantization run from its inputs to its finished directory: the job's identity, the
//! resumable work directory ([`WorkDir`]) beside the output, the staged model, `report.json`
//! ([`Report`]) and `input_rms.safetensors`, and the move into place.
//!
//! ```text
//! OUT/../.OUT.partial/            the work directory (StateDir): blocks, resume.json, lock
//! OUT/../.OUT.partial/model/      the output, assembled once every block is done
//! OUT/                            renamed from there (never replacing anything)
//! ```
//! Nothing at `OUT` is ever incomplete: a run cut short keeps its finished blocks, and the
//! same job run again continues after them and writes the same bytes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use adadim_load::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::driver::{LinearReport, QuantizeConfig, Timings};
use crate::error::{CalibError, Result};
use crate::output::{Format, Output};
use crate::resume::WorkDir;

/// The calibration a run used, as `report.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    /// The calibration text file the run read.
    pub source: String,
    pub nsamples: usize,
    pub seqlen: usize,
    pub seed: u64,
}

/// `report.json`'s summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The model directory that was quantized.
    pub model: String,
    pub settings: QuantizeConfig,
    pub format: Format,
    pub calibration: CalibrationInfo,
    /// Linears quantized, and how many of them kept per-IC groups.
    #[serde(default)]
    pub linears: usize,
    #[serde(default)]
    pub per_ic: usize,
    /// Wall seconds of the whole job, earlier interrupted runs included.
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub timings: Timings,
    #[serde(default)]
    pub peak_rss_mb: Option<f64>,
    /// `--bpw`: what the allocation chose overall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<crate::damage::AllocationSummary>,
}

/// `report.json`: the summary and one report per linear, in block order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub summary: Summary,
    pub linears: Vec<LinearReport>,
}

impl Report {
    /// The file's name inside a quantized model directory.
    pub const FILE: &'static str = "report.json";

    /// Read `DIR/report.json`.
    pub fn read(dir: &Path) -> Result<Report> {
        let path = dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| CalibError::Io { path: path.clone(), source })?;
        serde_json::from_str(&text)
            .map_err(|e| CalibError::Data { path, msg: format!("not a report written by `adadim quantize`: {e}") })
    }

    /// As written: pretty JSON with its keys in sorted order.
    pub fn to_json(&self) -> String {
        let v = serde_json::to_value(self).expect("the report serializes");
        serde_json::to_string_pretty(&v).expect("JSON values serialize")
    }
}

/// What a run quantizes and with what.
pub struct Job<'a> {
    /// The source model directory, and its checkpoint opened.
    pub model: &'a Path,
    pub checkpoint: &'a Checkpoint,
    pub config: &'a QuantizeConfig,
    pub format: Format,
    pub calibration: CalibrationInfo,
    /// The calibration token windows (their content identifies the job, not the file's path).
    pub samples: &'a [Vec<u32>],
    /// `adadim 0.1.0`: written into the output and part of the job's identity.
    pub tool: &'a str,
    /// When the job started (its inputs read); `seconds` counts from here.
    pub started: Instant,
    /// Where `--bpw` damage tables are kept between jobs, by what they were measured on: a
    /// job at another budget (or damage model) on the same model and calibration reuses one.
    pub table_cache: Option<&'a Path>,
}

/// A run that failed: the error, and the work directory with the number of finished blocks
/// it keeps for a re-run, to tell the user (`None`: nothing to tell).
#[derive(Debug)]
pub struct Failed {
    pub error: Box<CalibError>,
    pub kept: Option<(PathBuf, usize)>,
}

/// A run that finished: its report, and an error removing the emptied work directory (the
/// model is complete either way).
pub struct Finished {
    pub report: Report,
    pub cleanup: Option<CalibError>,
}

/// The work directory of one job for the output `out`, locked by this process.
pub struct RunDir {
    work: WorkDir,
    out: PathBuf,
    metadata: serde_json::Value,
    /// `--bpw`: the damage table's file in the job's table cache.
    table_file: Option<PathBuf>,
}

/// SHA-256 of every `*.safetensors` file of the model in `dir`, by file name.
fn source_sha256(dir: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let io = |source| CalibError::Io { path: dir.to_path_buf(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut source = serde_json::Map::new();
    for f in &files {
        source.insert(
            f.file_name().unwrap_or_default().to_string_lossy().into(),
            adadim_load::fetch::sha256_file(f)?.into(),
        );
    }
    Ok(source)
}

impl RunDir {
    /// Open (or create) the work directory `.NAME.partial` beside `out` for `job`: one holding
    /// the same job is resumed ([`RunDir::done`] blocks are finished), `restart` discards one
    /// holding another ([`WorkDir::open`]).
    pub fn open(out: &Path, job: &Job<'_>, restart: bool) -> Result<RunDir> {
        let cfg = job.config;
        let c = &job.calibration;
        let source = source_sha256(job.model)?;
        let metadata = serde_json::json!({
            "tool": job.tool,
            "settings": cfg,
            "calibration": c,
            "source_model": {"dir": job.model.display().to_string(), "sha256": &source},
        });
        // What makes two runs the same job: the inputs by content (not by path), every setting.
        let tokens: Vec<u8> = job
            .samples
            .iter()
            .flat_map(|s| s.iter().flat_map(|t| t.to_le_bytes()).chain(u32::MAX.to_le_bytes()))
            .collect();
        let identity = serde_json::json!({
            "tool": job.tool,
            "settings": cfg,
            "gptq": &cfg.gptq,
            "format": job.format,
            "calibration": {"nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed, "tokens_sha256": adadim_load::fetch::sha256_hex(&tokens)},
            "source_model": {"sha256": &source, "config_sha256": adadim_load::fetch::sha256_file(&job.model.join("config.json"))?},
        });
        // A damage table depends on the model, the samples it reads and the layouts measured.
        let table_file = match (&cfg.budget, job.table_cache) {
            (Some(b), Some(dir)) => {
                let n = job.samples.len().min(crate::damage::DAMAGE_SAMPLES);
                let mut key = serde_json::json!({
                    "table": 2,
                    "tool": job.tool,
                    "source_model": &identity["source_model"],
                    "tokens_sha256": adadim_load::fetch::sha256_hex(&serde_json::to_vec(&job.samples[..n]).expect("ids serialize")),
                    "layouts": [&b.bits, &b.groups, &b.axes],
                    "zero": cfg.spec.zero,
                    "search": cfg.search,
                    "permuted": crate::damage::permuted(cfg),
                });
                if b.float_min {
                    key["float_min"] = true.into();
                }
                Some(dir.join(format!("{}.json", adadim_load::fetch::sha256_hex(key.to_string().as_bytes()))))
            }
            _ => None,
        };
        let work = WorkDir::open(&Self::work_path(out), identity, restart)?;
        Ok(RunDir { work, out: out.to_path_buf(), metadata, table_file })
    }

    /// Remove the work directory beside an existing `out` when it is what the run that wrote
    /// `out` left behind (stopped after moving its model out, before deleting the rest).
    pub fn remove_leftover(out: &Path) -> Result<Option<PathBuf>> {
        let work = Self::work_path(out);
        Ok(WorkDir::remove_leftover(&work)?.then_some(work))
    }

    /// `.NAME.partial` beside `out`.
    pub fn work_path(out: &Path) -> PathBuf {
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        parent.join(adadim_load::state_dir::work_name(out, ".partial"))
    }

    /// The work directory.
    pub fn path(&self) -> &Path {
        self.work.path()
    }

    /// Blocks finished by interrupted runs of this job.
    pub fn done(&self) -> usize {
        self.work.done()
    }

    /// Quantize the blocks not yet done, assemble the model in the work directory and move it
    /// to `out`. `after_block(blocks_done, blocks)` runs once each block is saved.
    pub fn run(
        mut self,
        job: &Job<'_>,
        after_block: &mut dyn FnMut(usize, usize),
    ) -> std::result::Result<Finished, Failed> {
        match self.assemble(job, after_block) {
            Ok(report) => {
                if let Err(source) = self.work.state().move_out("model", &self.out) {
                    // The work directory (and the model in it) stays for a re-run to move.
                    return Err(Failed {
                        error: Box::new(CalibError::MoveOut { out: self.out.clone(), source }),
                        kept: None,
                    });
                }
                Ok(Finished { report, cleanup: self.work.remove().err() })
            }
            Err(error) if self.work.done() == 0 => {
                let _ = self.work.remove();
                Err(Failed { error: Box::new(error), kept: None })
            }
            Err(error) => {
                Err(Failed { error: Box::new(error), kept: Some((self.work.path().to_path_buf(), self.work.done())) })
            }
        }
    }

    /// Everything up to the finished model in `.NAME.partial/model`.
    fn assemble(&mut self, job: &Job<'_>, after_block: &mut dyn FnMut(usize, usize)) -> Result<Report> {
        let step = |what: String| move |source| CalibError::Step { what, source };
        let staging = self.work.path().join("model");
        self.work.state().remove("model")?;
        std::fs::create_dir(&staging).map_err(step(format!("creating {}", staging.display())))?;
        let output =
            Output { path: &staging.join("model.safetensors"), format: job.format, metadata: self.metadata.clone() };
        if let Some(file) = &self.table_file {
            if self.work.damage()?.is_none() {
                // A cached table that does not read back is measured again (and replaced).
                let cached = adadim_load::state_dir::read_small_regular(file, 256 << 20)
                    .and_then(|b| serde_json::from_slice::<crate::damage::DamageTable>(&b).ok());
                let per = job.config.budget.as_ref().map_or(0, |b| b.specs(job.config.spec.zero).len());
                if let Some(t) = cached.filter(|t| t.covers(&job.checkpoint.config, per)) {
                    self.work.save_damage(&t)?;
                }
            }
        }
        let run = crate::driver::quantize_model_resumable(
            job.checkpoint,
            job.samples,
            job.config,
            &output,
            &mut self.work,
            &mut |d, t| {
                after_block(d, t);
                #[cfg(feature = "test-hooks")]
                test_hooks::after_block(d);
            },
        )?;
        if let (Some(file), Some(t)) = (&self.table_file, self.work.damage()?) {
            if !file.exists() {
                // Best effort: a cache that cannot be written only costs the next job time.
                let _ = crate::damage::write_cache(file, &t);
            }
        }
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            if job.model.join(f).exists() {
                std::fs::copy(job.model.join(f), staging.join(f)).map_err(step(format!("copying {f}")))?;
            }
        }
        // A dequantized export declares the dtype it holds (HF loaders read torch_dtype).
        let torch_dtype = match job.format {
            Format::F16 => Some("float16"),
            Format::F32 => Some("float32"),
            _ => None,
        };
        if let Some(dt) = torch_dtype {
            let path = staging.join("config.json");
            let io = |source| CalibError::Io { path: path.clone(), source };
            let text = std::fs::read_to_string(&path).map_err(io)?;
            let mut c: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| CalibError::Data { path: path.clone(), msg: format!("not JSON: {e}") })?;
            c["torch_dtype"] = dt.into();
            std::fs::write(&path, serde_json::to_string_pretty(&c).expect("JSON values serialize")).map_err(io)?;
        }
        let reports = run.linears;
        let summary = Summary {
            model: job.model.display().to_string(),
            settings: job.config.clone(),
            format: job.format,
            calibration: job.calibration.clone(),
            linears: reports.len(),
            per_ic: reports.iter().filter(|r| r.axis == adadim_quantize::Axis::Ic).count(),
            seconds: self.work.earlier_seconds() + job.started.elapsed().as_secs_f64(),
            timings: run.timings,
            peak_rss_mb: peak_rss_mb(),
            allocation: run.allocation,
        };
        if job.format == Format::Gptq {
            let q = job.config;
            let qc = adadim_pack::export_gptq::quantize_config(
                q.spec.bits,
                q.spec.group,
                q.act_order,
                q.static_groups || q.group_aware,
                q.gptq.percdamp,
            );
            let path = staging.join("quantize_config.json");
            std::fs::write(&path, serde_json::to_string_pretty(&qc).expect("JSON values serialize"))
                .map_err(|source| CalibError::Io { path, source })?;
        }
        let report = Report { summary, linears: reports };
        let path = staging.join(Report::FILE);
        std::fs::write(&path, report.to_json()).map_err(|source| CalibError::Io { path, source })?;
        crate::input_rms::write(&staging.join(crate::input_rms::FILE), &report.linears)?;
        let entries = std::fs::read_dir(&staging).map_err(step(format!("syncing {}", staging.display())))?;
        for e in entries {
            e.and_then(|e| std::fs::File::open(e.path()))
                .and_then(|f| f.sync_all())
                .map_err(step(format!("syncing {}", staging.display())))?;
        }
        Ok(report)
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Built only for the CLI's own tests (its dev-dependency on this crate turns the feature
/// on; release builds of the tool never have it): `ADADIM_TEST_ABORT_AFTER_BLOCK=N` aborts,
/// and `ADADIM_TEST_PAUSE_AFTER_BLOCK=N` waits to be killed, once N blocks are saved, so
/// that tests can interrupt the real binary at a known block.
#[cfg(feature = "test-hooks")]
mod test_hooks {
    pub fn after_block(done: usize) {
        let hook = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
        if hook("ADADIM_TEST_ABORT_AFTER_BLOCK") == Some(done) {
            std::process::abort();
        }
        if hook("ADADIM_TEST_PAUSE_AFTER_BLOCK") == Some(done) {
            std::thread::sleep(std::time::Duration::from_secs(300));
            std::process::abort();
        }
    }
}
