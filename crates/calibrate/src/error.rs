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
}

pub type Result<T> = std::result::Result<T, CalibError>;
