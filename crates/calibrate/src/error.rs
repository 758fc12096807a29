use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error(transparent)]
    Load(#[from] adadim_load::LoadError),
    #[error(transparent)]
    Model(#[from] adadim_model::ModelError),
    #[error("layer {layer} {module}: {source}")]
    Quantize {
        layer: usize,
        module: String,
        #[source]
        source: adadim_quantize::Error,
    },
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file of a resume work directory that cannot be what this tool wrote.
    #[error("{path}: {msg} (the interrupted run's state is damaged; delete its directory to start over)")]
    Resume { path: PathBuf, msg: String },
    /// The work directory holds an interrupted run of another job.
    #[error("{dir}: holds an interrupted run with other settings or inputs ({differences}); to start over, delete that directory (or pass --restart), or re-run with the settings it was started with")]
    OtherJob { dir: PathBuf, differences: String },
    /// The finished model could not be moved to the output path (its blocks stay in the work
    /// directory).
    #[error("moving the result to {out}: {source}")]
    MoveOut {
        out: PathBuf,
        #[source]
        source: adadim_load::LoadError,
    },
    /// A file-system step of assembling the output (`creating DIR`, `copying FILE`).
    #[error("{what}: {source}")]
    Step {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir}: in use by another adadim process (pid {pid}); wait for it, or delete {dir}/lock if no such process is running")]
    Locked { dir: PathBuf, pid: u32 },
}

pub type Result<T> = std::result::Result<T, CalibError>;
