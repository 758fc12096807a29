use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] adadim_model::ModelError),
    #[error(transparent)]
    Load(#[from] adadim_load::LoadError),
    #[error("{path}: {msg}")]
    Dataset { path: PathBuf, msg: String },
    #[error("tokenizing {what}: {msg}")]
    Tokenize { what: String, msg: String },
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, EvalError>;
