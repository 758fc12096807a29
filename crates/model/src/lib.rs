//! # adadim-model
//!
//! The decoder forward pass (f32, CPU, candle), shared by evaluation, generation and the
//! layer-by-layer quantization driver. See [`llama`] for the block structure, [`linear`] for a
//! layer whose weight is dense or packed, and [`settings`] for the one value
//! ([`DecodeSettings`]: activation precision, integer prefill, KV-cache type, head bits) that a
//! [`Model`] holds and passes down every forward to its blocks and linears.
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
pub mod bert;
pub mod decode_batch;
pub mod error;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod settings;
pub mod source;

pub use bert::{is_bert, Bert, BertConfig, Padded};
pub use decode_batch::BatchScratch;
pub use error::{ModelError, Result};
pub use linear::{Linear, Weight};
pub use llama::{Block, DecodeScratch, Flow, KvCache, LinearKind, Model, Rope};
pub use settings::{DecodeSettings, KvType};
pub use source::{is_packed, open, PackedModel, WeightSource};
