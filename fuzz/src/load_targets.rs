//! What the fuzz targets of adadim-load's readers do with one input. Shared, file for file, by
//! the cargo-fuzz targets (`fuzz/fuzz_targets/`) and the corpus replay test that CI runs
//! (`crates/load/tests/fuzz_corpus.rs`, which includes this file with `#[path]`), so both
//! exercise the same entry points. Every function must return normally for any input: a
//! reader answers bad bytes with a typed error, never a panic, an abort or an unbounded
//! allocation.

use adadim_load::gguf::{self, Gguf};
use adadim_load::{tokenizer, Checkpoint, LlamaConfig};
use std::path::{Path, PathBuf};

/// The config of the checkpoint the safetensors target opens: every tensor kind (untied head,
/// q/k/v biases, GQA), a few KB of data.
pub const CHECKPOINT_CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,
"intermediate_size":12,"num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,
"vocab_size":10,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":false,
"attention_bias":true}"#;

/// A directory the targets write their input into (on tmpfs where there is one: the targets
/// write a file per input).
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
        let dir = dir.expect("a scratch directory");
        std::fs::write(dir.path().join("config.json"), CHECKPOINT_CONFIG).expect("write config.json");
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn put(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).expect("write the fuzz input");
        p
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// `data` as `config.json`: parse it, then everything a loader derives from a config.
pub fn config(data: &[u8]) {
    // `LlamaConfig::from_file` reads the file as UTF-8 and rejects other bytes before parsing.
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = LlamaConfig::from_json(Path::new("config.json"), text) {
        let _ = (cfg.head_dim(), cfg.q_dim(), cfg.kv_dim(), cfg.has_qkv_bias());
        let _ = (cfg.linear_params_per_block(), cfg.forward_flops(2048));
        let _ = cfg.expected_tensors();
    }
}

/// `data` as `model.safetensors` next to [`CHECKPOINT_CONFIG`]: open the checkpoint (header,
/// layout check), then read every tensor it holds.
pub fn safetensors(s: &Scratch, data: &[u8]) {
    s.put("model.safetensors", data);
    if let Ok(ck) = Checkpoint::open(s.dir.path()) {
        let names: Vec<String> = ck.tensor_names().map(String::from).collect();
        for n in &names {
            let _ = ck.tensor_f32(n);
            let _ = ck.tensor(n);
        }
    }
}

/// `data` as a GGUF file: parse the header, derive the config and the tokenizer, dequantize
/// every tensor; when all of that works, import it (the path `--model x.gguf` takes).
pub fn gguf(s: &Scratch, data: &[u8]) {
    let path = s.put("model.gguf", data);
    let Ok(mut g) = Gguf::open(&path) else { return };
    let config = g.config();
    let tok = tokenizer::from_gguf(&g);
    let mut names: Vec<String> = g.content.tensor_infos.keys().cloned().collect();
    names.sort();
    let mut all_read = true;
    for n in &names {
        let _ = gguf::hf_name(n);
        all_read &= g.tensor_f32(n).is_ok();
    }
    drop(g);
    if config.is_ok() && tok.is_ok() && all_read {
        let out = s.path("imported");
        let _ = std::fs::remove_dir_all(&out);
        let _ = gguf::import_gguf(&path, &out, &mut |_, _| {});
        let _ = std::fs::remove_dir_all(&out);
    }
}
