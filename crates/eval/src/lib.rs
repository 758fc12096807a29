//! # adadim-eval
//!
//! What a quantized model costs in quality. [`ppl::perplexity`] follows the GPTQ papers'
//! protocol; [`mmlu`] scores k-shot multiple choice from next-token logits; [`humaneval`]
//! generates code and runs its tests in the [`sandbox`]; [`gsm8k`] scores worked math answers;
//! [`embed`] measures a sentence encoder's fidelity to a reference;
//! [`datasets`] resolves named corpora
//! in `$ADADIM_DATA`.

pub mod complete;
pub mod datasets;
pub mod embed;
pub mod error;
pub mod gsm8k;
pub mod humaneval;
pub mod mmlu;
pub mod ppl;
pub mod sandbox;

pub use error::{EvalError, Result};
