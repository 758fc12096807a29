//! # adadim-calibrate
//!
//! Between loading and quantizing: calibration text ([`data`]; the task-specific sets in
//! [`code`] and [`chat`]) and the one layer-by-layer
//! driver ([`driver::quantize_model`]) that runs the model block by block on it and hands each
//! linear, with its input Hessian, to the quantizers in `adadim-quantize`; [`run_dir`] takes a
//! `quantize` job from its inputs to a finished, resumable output directory.

pub mod awq_fold;
pub mod chat;
pub mod code;
pub mod damage;
pub mod data;
pub mod driver;
pub mod encoder;
pub mod encoder_damage;
pub mod error;
pub mod input_rms;
pub mod output;
pub mod resume;
pub mod rotate_model;
pub mod run_dir;

pub use driver::{
    embed_samples, quantize_model, quantize_model_resumable, AdaError, Dim, LinearReport, Method, QuantizeConfig,
    QuantizeRun, Select, Timings, ACT_CACHE_BYTES,
};
pub use error::{CalibError, Result};
pub use output::{Format, Output};
pub use resume::WorkDir;
pub use run_dir::{CalibrationInfo, Job, Report, RunDir, Summary};
