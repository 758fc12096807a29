//! # adadim-eval
//!
//! What a quantized model costs in quality. [`ppl::perplexity`] follows the GPTQ papers'
//! protocol; [`datasets`] resolves named corpora in `$ADADIM_DATA`.

pub mod datasets;
pub mod error;
pub mod ppl;

pub use error::{EvalError, Result};
