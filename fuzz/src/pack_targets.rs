//! What the fuzz target of adadim-pack's reader does with one input. Shared by the cargo-fuzz
//! target (`fuzz/fuzz_targets/fuzz_packed.rs`) and the corpus replay test that CI runs
//! (`crates/pack/tests/fuzz_corpus.rs`, which includes this file with `#[path]`). It must
//! return normally for any input: a bad file is a typed error, and a linear the reader accepts
//! must be safe to hand to every kernel (no out-of-bounds read, no panic).

use adadim_pack::PackedFile;
use std::path::{Path, PathBuf};

/// Dense tensors a packed model directory holds next to its linears.
const DENSE: &[&str] =
    &["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"];

/// A directory the target writes its input into (tmpfs where there is one).
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
        Scratch { dir: dir.expect("a scratch directory") }
    }

    fn put(&self, data: &[u8]) -> PathBuf {
        let p = self.dir.path().join("model.safetensors");
        std::fs::write(&p, data).expect("write the fuzz input");
        p
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// `data` as a packed checkpoint: open it, read every declared linear and the dense tensors,
/// and run each accepted linear through dequantization and every matvec kernel.
pub fn packed(s: &Scratch, data: &[u8]) {
    let path = s.put(data);
    let Ok(f) = PackedFile::open(&path) else { return };
    let _ = f.quantization();
    let names: Vec<String> = f.linear_names().map(String::from).collect();
    for name in &names {
        for part in ["qcodes", "scales", "qzeros", "perm"] {
            let _ = f.dense(&format!("{name}.{part}"));
        }
        let Ok(p) = f.linear(name) else { continue };
        let (rows, cols) = (p.rows(), p.cols());
        let _ = p.layout().bits_per_weight(rows, cols, false);
        let _ = p.bytes_read();
        let w = p.dequantize();
        assert_eq!(w.len(), rows * cols);
        let x: Vec<f32> = (0..cols).map(|c| (c % 7) as f32 - 3.0).collect();
        let mut y = vec![0f32; rows];
        p.matvec(adadim_pack::ActBits::I16, &x, &mut y);
        p.matvec(adadim_pack::ActBits::F32, &x, &mut y);
        p.matvec_portable(&x, &mut y);
        let t = 2;
        let xt: Vec<f32> = x.iter().chain(x.iter()).copied().collect();
        let mut yt = vec![0f32; t * rows];
        p.matmul(adadim_pack::ActBits::F32, &xt, t, &mut yt);
    }
    for name in DENSE {
        let _ = f.dense(name);
    }
}
