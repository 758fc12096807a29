//! `adadim rotate`: a float model with its residual stream rotated, ready to quantize.

use anyhow::Result;
use std::path::Path;

pub fn rotate(model: &str, out: &Path, seed: u64, heads: bool) -> Result<()> {
    let src = crate::resolve::model_dir(model)?;
    let mut bar = crate::progress::Bar::new("rotate", 0);
    let r = adadim_calibrate::rotate_model::rotate_checkpoint(&src, out, seed, heads, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    println!("{}", serde_json::to_string_pretty(&r)?);
    Ok(())
}
