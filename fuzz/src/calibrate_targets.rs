//! What the fuzz targets whose bodies need adadim-run or adadim-calibrate do with one input:
//! `fuzz_tokenizer_config` (the `tokenizer_config.json` reader, then the chat template) and
//! `fuzz_resume` (the resume-state reader of `crates/calibrate/src/resume.rs`). Shared by the
//! cargo-fuzz targets (`fuzz/fuzz_targets/`) and the corpus replay test that CI runs
//! (`crates/calibrate/tests/fuzz_corpus.rs`, which includes this file with `#[path]`; that
//! crate's dependencies cover both). Every function must return normally for any input: a bad
//! file is an error naming it (or the work directory), never a panic, an abort or an unbounded
//! allocation.

use adadim_calibrate::WorkDir;
use adadim_load::fetch::sha256_hex;
use adadim_load::state_dir::StateDir;
use adadim_load::tokenizer;
use adadim_run::ChatTemplate;
use std::path::{Path, PathBuf};

/// A scratch directory on tmpfs where there is one (the targets write files per input).
fn tmpfs_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
    dir.expect("a scratch directory")
}

// ---- fuzz_tokenizer_config ----------------------------------------------------------------

/// The model directory `fuzz_tokenizer_config` writes its input into.
pub struct TokenizerScratch {
    dir: tempfile::TempDir,
}

impl TokenizerScratch {
    pub fn new() -> Self {
        TokenizerScratch { dir: tmpfs_dir() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TokenizerScratch {
    fn default() -> Self {
        Self::new()
    }
}

/// `data` as the model's `tokenizer_config.json`: `tokenizer::config`, then what `generate`
/// does with what it returns (the chat template recognized and rendered, the EOS token read).
/// A file present is never taken for an absent one (that would silently drop the template).
pub fn tokenizer_config(s: &TokenizerScratch, data: &[u8]) {
    std::fs::write(s.path().join("tokenizer_config.json"), data).expect("write the fuzz input");
    match tokenizer::config(s.path()) {
        Ok(None) => panic!("tokenizer_config.json is present but was reported absent"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("tokenizer_config.json"), "an error that does not name the file: {msg}");
        }
        Ok(Some(v)) => {
            // What the reader promises its callers.
            assert!(v.is_object(), "accepted a non-object: {v}");
            let template = &v["chat_template"];
            assert!(template.is_null() || template.is_string(), "accepted chat_template {template}");
            let eos = &v["eos_token"];
            assert!(eos.is_null() || eos.is_string() || eos["content"].is_string(), "accepted eos_token {eos}");
            if let Some(t) = template.as_str().and_then(ChatTemplate::from_jinja) {
                let prompt = t.render("Hello, who are you?");
                assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
                let _ = t.render_dialogue(&["Hi", "Hello!", "What is 2 + 2?"]);
            }
            let _ = eos.as_str().or(eos["content"].as_str());
        }
    }
}

// ---- fuzz_resume ---------------------------------------------------------------------------

// An input is a mode byte, then a file:
// - mode byte even: the rest is `resume.json`, in a work directory that holds the marker and an
//   empty `blocks/`; then `WorkDir::open(dir, JOB, false)`. A seed written by a real run of
//   [`JOB`] holds its checksum, so mutations that keep it reach the resume path (stale-file
//   sweep, checksum verification of the blocks recorded done).
// - mode byte odd: the rest is `blocks/block-00000.safetensors`, next to the `resume.json` a run
//   of [`JOB`] writes after its first block, with the SHA-256 of these very bytes: the checksum
//   passes, so the block parser itself (`load_block`, through the `fuzz_load_block` seam) runs
//   on the fuzzed bytes; every linear it accepts is then dequantized, as an f32 / f16 output is.

/// The job the work directory is opened for (what `quantize` records: settings, the inputs'
/// checksums, the output format, the tool's version). Its checksum is in the seeds.
pub const JOB: &str = r#"{"model_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","method":"gptq","dim":"ada","bits":3,"group":4,"format":"packed","version":"fuzz"}"#;

/// The block file a mode-odd input becomes.
pub const BLOCK: &str = "blocks/block-00000.safetensors";

/// A directory the work directories are made in (tmpfs where there is one), and the
/// `resume.json` a fresh run of [`JOB`] writes (read back from a real [`WorkDir`], so that the
/// target follows the manifest's layout without naming its private type).
pub struct ResumeScratch {
    dir: tempfile::TempDir,
    job: serde_json::Value,
    fresh: serde_json::Value,
}

impl ResumeScratch {
    pub fn new() -> Self {
        let dir = tmpfs_dir();
        let job: serde_json::Value = serde_json::from_str(JOB).expect("JOB is JSON");
        let template = dir.path().join("template");
        let w = WorkDir::open(&template, job.clone(), false).expect("a fresh work directory");
        let fresh = serde_json::from_slice(&std::fs::read(template.join("resume.json")).expect("resume.json"))
            .expect("resume.json is JSON");
        w.remove().expect("remove the template work directory");
        ResumeScratch { dir, job, fresh }
    }

    /// The work directory each input is written into (emptied first).
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("w")
    }

    /// `resume.json` of [`JOB`] after its first block, saved with the SHA-256 `sha`.
    pub fn manifest_after_block(&self, sha: &str) -> Vec<u8> {
        let mut m = self.fresh.clone();
        m["done"] = 1.into();
        m["files"] = serde_json::json!({ BLOCK: sha });
        serde_json::to_vec_pretty(&m).expect("JSON")
    }
}

impl Default for ResumeScratch {
    fn default() -> Self {
        Self::new()
    }
}

/// One input of `fuzz_resume` (its two modes are described above).
pub fn resume(s: &ResumeScratch, data: &[u8]) {
    let Some((&mode, file)) = data.split_first() else { return };
    let work = s.work();
    match std::fs::remove_dir_all(&work) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{}: {e}", work.display()),
        _ => {}
    }
    // The state a run leaves: the marker (with its exact text), blocks/, then the fuzzed file.
    drop(StateDir::create(&work).expect("create the work directory"));
    std::fs::create_dir(work.join("blocks")).expect("create blocks/");
    let block = mode % 2 == 1;
    if block {
        std::fs::write(work.join(BLOCK), file).expect("write the block");
        std::fs::write(work.join("resume.json"), s.manifest_after_block(&sha256_hex(file))).expect("write resume.json");
    } else {
        std::fs::write(work.join("resume.json"), file).expect("write resume.json");
    }
    let names_dir = |e: &dyn std::fmt::Display| {
        let msg = e.to_string();
        assert!(msg.contains(&*work.to_string_lossy()), "an error that does not name the work directory: {msg}");
    };
    let w = match WorkDir::open(&work, s.job.clone(), false) {
        Ok(w) => w,
        Err(e) => return names_dir(&e),
    };
    if block {
        assert_eq!(w.done(), 1, "the manifest records one block done");
        match w.fuzz_load_block(0) {
            Ok((linears, _reports)) => {
                for (_, q) in &linears {
                    assert_eq!(q.dequantize().len(), q.rows() * q.cols());
                }
            }
            Err(e) => names_dir(&e),
        }
    }
}
