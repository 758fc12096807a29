//! `adadim import-gguf`: a llama-architecture GGUF file as a Hugging Face directory.

use anyhow::Result;
use std::path::Path;

pub fn import_gguf(file: &Path, out: &Path) -> Result<()> {
    let mut bar = crate::progress::Bar::new("import", 0);
    let s = adadim_load::gguf::import_gguf(file, out, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}
