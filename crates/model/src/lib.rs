//! # adadim-model
//!
//! The decoder forward pass (f32, CPU, candle), shared by evaluation, generation and the
//! layer-by-layer quantization driver. See [`llama`] for the block structure.
//!
//! ```no_run
//! use adadim_model::Model;
//! let ckpt = adadim_load::Checkpoint::open(std::path::Path::new("models/smollm2"))?;
//! let model = Model::load(&ckpt, 2048, &mut |_, _| {})?;
//! let hidden = model.forward_hidden(&[1, 2, 3])?;
//! let logits = model.logits(&hidden)?; // (3, vocab)
//! # Ok::<(), adadim_model::ModelError>(())
//! ```

pub mod attention;
pub mod error;
pub mod kernels;
pub mod llama;
pub mod source;

pub use error::{ModelError, Result};
pub use llama::{Block, DecodeScratch, Flow, KvCache, KvType, Linear, LinearKind, Model, Rope, Weight};
pub use source::{is_packed, open, PackedModel, WeightSource};
