use std::path::PathBuf;

/// What can go wrong making a report; every variant names the file or directory at fault.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The directory is not the output of `adadim quantize`.
    #[error("{dir}: not a quantization run ({msg})")]
    NotARun { dir: PathBuf, msg: String },
    /// A file of the run that is there but cannot be what `quantize` wrote.
    #[error("{path}: {msg}")]
    Damaged { path: PathBuf, msg: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: drawing the chart failed: {msg}")]
    Chart { path: PathBuf, msg: String },
    /// A request the run cannot answer (a layer it does not have, ...).
    #[error("{0}")]
    Invalid(String),
    /// Reading `input_rms.safetensors`, or GPTQ failing on the re-run linear
    /// (`CalibError::Quantize` names the layer and module).
    #[error(transparent)]
    Calibrate(Box<adadim_calibrate::CalibError>),
    #[error(transparent)]
    Load(#[from] adadim_load::LoadError),
    #[error(transparent)]
    Model(#[from] adadim_model::ModelError),
}

impl From<adadim_calibrate::CalibError> for ReportError {
    fn from(e: adadim_calibrate::CalibError) -> Self {
        ReportError::Calibrate(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, ReportError>;
