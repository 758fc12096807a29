//! Replays a committed fuzz corpus (`fuzz/corpus/<target>/`) through a target, plus seeded
//! mutations of every file (bit flips, truncations, insertions, overwrites with boundary
//! values), catching panics so that a failure names the file and the mutation. This is the
//! fuzzing CI runs on stable Rust without libFuzzer (`cargo test --release --workspace`);
//! `fuzz/README.md` has the real fuzzing runs. Included with `#[path]` by the replay tests.

use adadim_load::synth::Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Uniform in `0..n` (`n > 0`) from the project's seeded generator (SplitMix64), so the
/// mutations are the same on every run.
fn below(rng: &mut Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

/// The committed corpus of `target`, sorted by name.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

pub fn corpus_files(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).expect("read corpus file")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
}

/// Values that sit on the edges readers get wrong: lengths and counts of 0, 1, the maximum,
/// a half, sizes just past a 32-bit length.
const BOUNDARY_U64: &[u64] =
    &[0, 1, 2, 7, 8, 255, 256, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1 << 40, u64::MAX / 2, u64::MAX];

/// One seeded mutation of `data`.
pub fn mutate(data: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut d = data.to_vec();
    let rounds = 1 + below(rng, 3);
    for _ in 0..rounds {
        match below(rng, 8) {
            // Flip one to four bits.
            0 if !d.is_empty() => {
                for _ in 0..1 + below(rng, 4) {
                    let i = below(rng, d.len());
                    d[i] ^= 1 << below(rng, 8);
                }
            }
            // Truncate.
            1 if !d.is_empty() => {
                let n = below(rng, d.len());
                d.truncate(n);
            }
            // Insert random bytes.
            2 => {
                let at = below(rng, d.len() + 1);
                let n = 1 + below(rng, 16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                d.splice(at..at, bytes);
            }
            // Overwrite a byte with a boundary value.
            3 if !d.is_empty() => {
                let i = below(rng, d.len());
                d[i] = [0u8, 1, 0x7F, 0x80, 0xFF, b'"', b'9', b'-'][below(rng, 8)];
            }
            // Overwrite eight bytes (a GGUF length, a safetensors header size) with a boundary value.
            4 if d.len() >= 8 => {
                let i = below(rng, d.len() - 7);
                let v = BOUNDARY_U64[below(rng, BOUNDARY_U64.len())];
                d[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            // Overwrite four bytes (a GGUF type, a dimension count) with a small or boundary value.
            5 if d.len() >= 4 => {
                let i = below(rng, d.len() - 3);
                let v = [0u32, 1, 2, 3, 4, 8, 9, 12, 13, 30, 31, 0xFFFF_FFFF][below(rng, 12)];
                d[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            // Delete a range.
            6 if !d.is_empty() => {
                let at = below(rng, d.len());
                let n = 1 + below(rng, (d.len() - at).min(64));
                d.drain(at..at + n);
            }
            // Duplicate a range.
            7 if !d.is_empty() => {
                let at = below(rng, d.len());
                let n = 1 + below(rng, (d.len() - at).min(64));
                let chunk = d[at..at + n].to_vec();
                let to = below(rng, d.len() + 1);
                d.splice(to..to, chunk);
            }
            _ => d.push(rng.next_u64() as u8),
        }
    }
    d
}

/// Runs `run` on every corpus file of `target` and on `mutations` seeded mutations of each.
/// Fails naming the file (and mutation) of every input that panicked.
pub fn replay(target: &str, mutations: usize, mut run: impl FnMut(&[u8])) {
    let mut failures = Vec::new();
    let mut inputs = 0usize;
    for (name, data) in corpus_files(target) {
        let mut rng = Rng::new(name.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
        for m in 0..=mutations {
            let input = if m == 0 { data.clone() } else { mutate(&data, &mut rng) };
            inputs += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&input))).is_err() {
                let what = if m == 0 { "as committed".to_string() } else { format!("mutation {m}") };
                // Keep the input so that it can be fed to the cargo-fuzz target and committed.
                let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-replay-{target}-{name}-m{m}"));
                let kept = std::fs::write(&keep, &input)
                    .map(|()| format!(", saved as {}", keep.display()))
                    .unwrap_or_default();
                failures.push(format!("fuzz/corpus/{target}/{name} ({what}, {} bytes{kept})", input.len()));
            }
        }
    }
    assert!(failures.is_empty(), "{target}: {} of {inputs} inputs panicked:\n{}", failures.len(), failures.join("\n"));
}
