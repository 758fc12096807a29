//! # adadim-calibrate
//!
//! Between loading and quantizing: calibration text ([`data`]; the task-specific sets in
//! [`code`] and [`chat`]) and the one layer-by-layer
//! driver ([`driver::quantize_model`]) that runs the model block by block on it and hands each
//! linear, with its input Hessian, to the quantizers in `adadim-quantize`.

pub mod chat;
pub mod code;
pub mod data;
pub mod driver;
pub mod output;
pub mod error;
pub mod input_rms;
pub mod resume;

pub use driver::{quantize_model, quantize_model_resumable, ACT_CACHE_BYTES, Dim, LinearReport, Method, QuantizeConfig, QuantizeRun, Select, Timings};
pub use error::{CalibError, Result};
pub use output::{Format, Output};
pub use resume::WorkDir;
