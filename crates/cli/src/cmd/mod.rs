//! One file per `adadim` command.

pub mod compare;
pub mod embed;
pub mod eval;
pub mod eval_tasks;
pub mod generate;
pub mod import;
pub mod quantize;
pub mod quantize_layer;
pub mod report;
pub mod rotate;
pub mod rotate_search;
pub mod serve;
pub mod synth;
