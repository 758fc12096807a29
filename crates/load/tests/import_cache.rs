//! The import cache of `--model FILE.gguf` is keyed by the file's content (issue 29): a GGUF
//! changed in place, its size and modification time restored, is imported again.

use adadim_load::fetch::resolve_model;
use std::path::Path;

#[test]
fn a_gguf_changed_in_place_is_imported_again() {
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/fuzz_gguf/seed-v3-tiny-llama");
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("home");
    let g = d.path().join("tiny.gguf");
    std::fs::copy(&seed, &g).unwrap();
    let mtime = std::fs::metadata(&g).unwrap().modified().unwrap();
    let resolve = || resolve_model(g.to_str().unwrap(), &home, &mut |_, _, _| {}).unwrap();
    let first = resolve();
    assert_eq!(resolve(), first, "an unchanged file is imported once");

    // One quant of the last tensor (blk.0.ffn_down.weight, Q8_0, the file's last bytes),
    // changed in place: same path, same size, mtime set back.
    let mut bytes = std::fs::read(&g).unwrap();
    let at = bytes.len() - 40;
    bytes[at] ^= 1;
    std::fs::write(&g, &bytes).unwrap();
    std::fs::File::options().write(true).open(&g).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&g).unwrap().modified().unwrap(), mtime);

    let second = resolve();
    assert_ne!(second, first, "the changed file must not reuse the first import");
    let w = |dir: &Path| {
        adadim_load::Checkpoint::open(dir).unwrap().tensor_f32("model.layers.0.mlp.down_proj.weight").unwrap()
    };
    assert_ne!(w(&first), w(&second));
}
