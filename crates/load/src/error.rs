//! Typed errors for loading. Every variant names the file (and the tensor, where there is one)
//! so that a user can find what is wrong without a debugger.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not found{hint}")]
    NotFound { path: PathBuf, hint: String },
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: unsupported architecture {arch:?} (supported: {supported})")]
    UnsupportedArch { path: PathBuf, arch: String, supported: String },
    #[error("{path}: corrupt or truncated safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: corrupt or truncated GGUF file: {msg}")]
    Gguf { path: PathBuf, msg: String },
    #[error("{path}: tensor '{tensor}': {msg}")]
    Tensor { path: PathBuf, tensor: String, msg: String },
    #[error("{path}: tensor '{tensor}' is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor '{tensor}' has unsupported type {dtype}")]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    #[error("{path}: tensor '{tensor}' has shape {found:?}, but the config implies {expected:?}")]
    ShapeMismatch { path: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor '{tensor}' contains {count} non-finite values (NaN or Inf), first at index {first}")]
    NonFinite { path: PathBuf, tensor: String, count: usize, first: usize },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: more than {cap} bytes, more than any {what} should hold (is it the right file?)")]
    TooLarge { path: PathBuf, what: String, cap: u64 },
    /// A path where adadim would keep its own state, holding something else: never touched.
    #[error("{path}: {why}; adadim removes nothing it did not write: move it away or choose another output")]
    NotOwnState { path: PathBuf, why: String },
    #[error("fetching {what}: {msg}")]
    Fetch { what: String, msg: String },
}

pub type Result<T> = std::result::Result<T, LoadError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LoadError {
    let path = path.into();
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            LoadError::NotFound { path, hint: String::new() }
        } else {
            LoadError::Io { path, source }
        }
    }
}
