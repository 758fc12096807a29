//! A finished quantization run, as `adadim quantize --out RUN_DIR` leaves it: `report.json`
//! ([`Report`]: summary + one [`LinearReport`] per linear) and, when it calibrated,
//! `input_rms.safetensors` ([`adadim_calibrate::input_rms`]).

use std::path::{Path, PathBuf};

use adadim_calibrate::input_rms::{self, InputRms};
use adadim_calibrate::run_dir::{Report, Summary};
use adadim_calibrate::LinearReport;

use crate::error::{ReportError, Result};

pub struct Run {
    pub dir: PathBuf,
    pub summary: Summary,
    pub linears: Vec<LinearReport>,
    /// Absent for runs without calibration, and runs made before `quantize` wrote it.
    pub input_rms: Option<Vec<InputRms>>,
}

impl Run {
    /// Read the run in `dir`.
    pub fn open(dir: &Path) -> Result<Run> {
        let not_a_run = |msg: &str| ReportError::NotARun { dir: dir.to_path_buf(), msg: msg.into() };
        if !dir.is_dir() {
            return Err(not_a_run("no such directory"));
        }
        let path = dir.join(Report::FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(not_a_run("no report.json; give the --out directory of `adadim quantize`"))
            }
            Err(source) => return Err(ReportError::Io { path, source }),
        };
        let file: Report = serde_json::from_str(&text).map_err(|e| ReportError::Damaged {
            path: path.clone(),
            msg: format!("not a report written by `adadim quantize`: {e}"),
        })?;
        if file.linears.is_empty() {
            return Err(ReportError::Damaged { path, msg: "no linears reported".into() });
        }
        let rms_path = dir.join(input_rms::FILE);
        let input_rms = if rms_path.exists() { Some(input_rms::read(&rms_path)?) } else { None };
        Ok(Run { dir: dir.to_path_buf(), summary: file.summary, linears: file.linears, input_rms })
    }

    /// Number of decoder blocks reported.
    pub fn layers(&self) -> usize {
        self.linears.iter().map(|r| r.layer + 1).max().unwrap_or(0)
    }

    /// The report of linear `module` (`mlp.down_proj`) in block `layer`.
    pub fn linear(&self, layer: usize, module: &str) -> Option<&LinearReport> {
        self.linears.iter().find(|r| r.layer == layer && r.module == module)
    }

    /// The input RMS of linear `module` in block `layer`, if the run recorded it.
    pub fn rms(&self, layer: usize, module: &str) -> Option<&[f32]> {
        self.input_rms.as_ref()?.iter().find(|r| r.layer == layer && r.module == module).map(|r| r.rms.as_slice())
    }

    /// `w3g128` (`g-` for whole channels); `bpw3.25` for a `--bpw` run.
    pub fn spec_label(&self) -> String {
        if let Some(b) = &self.summary.settings.budget {
            return format!("bpw{}", b.bpw);
        }
        let s = &self.summary.settings.spec;
        format!("w{}g{}", s.bits, s.group.map_or("-".to_string(), |g| g.to_string()))
    }
}
