//! Fuzz smoke for CI: the committed corpus of the cargo-fuzz target `fuzz_packed`
//! (fuzz/corpus/fuzz_packed/), each file as committed and in seeded mutations, through the
//! same entry point the target calls (fuzz/src/pack_targets.rs): open, every linear, the
//! kernels. No input may panic. `write_seed_corpus` (ignored) regenerates the seed files with
//! `PackedWriter`; fuzz/README.md has the rest.

#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/pack_targets.rs"]
mod targets;

use adadim_load::safetensors_out::DenseDtype;
use adadim_load::synth::Rng;
use adadim_pack::{PackedFile, PackedLinear, PackedWriter};
use adadim_quantize::{gptq, rtn, Axis, GptqOptions, Hessian, QuantSpec, Zero};

/// Seeded mutations per corpus file (the whole test stays within a few seconds).
const MUTATIONS: usize = 1000;

#[test]
fn packed_corpus_never_panics() {
    let s = targets::Scratch::new();
    replay::replay("fuzz_packed", MUTATIONS, |d| targets::packed(&s, d));
}

/// The seeds must open and hold linears the reader accepts, or the fuzzer starts from nothing.
#[test]
fn seeds_are_valid_files() {
    for (name, _) in replay::corpus_files("fuzz_packed").into_iter().filter(|(n, _)| n.starts_with("seed-")) {
        let f =
            PackedFile::open(&replay::corpus_dir("fuzz_packed").join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let names: Vec<String> = f.linear_names().map(String::from).collect();
        assert!(!names.is_empty(), "{name}");
        for l in names {
            f.linear(&l).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

// ---- seed corpus --------------------------------------------------------------------------

/// Small linears of every layout: 2/3/4/8 bits, per-OC and per-IC groups, a whole-channel
/// group, ragged shapes, and per-OC act-order with its column permutation.
fn linears(rng: &mut Rng) -> Vec<(String, PackedLinear)> {
    let mut out = Vec::new();
    for (i, (rows, cols, bits, group, axis)) in [
        (16, 64, 3, Some(32), Axis::Ic),
        (8, 40, 4, Some(8), Axis::Oc),
        (12, 24, 2, None, Axis::Oc),
        (8, 16, 8, Some(8), Axis::Ic),
        (5, 33, 3, Some(16), Axis::Oc),
    ]
    .into_iter()
    .enumerate()
    {
        let w = rng.normals(rows * cols, 0.1);
        let q = rtn(&w, rows, cols, &QuantSpec { bits, group, axis, zero: Zero::Awq }).unwrap();
        out.push((format!("model.layers.0.l{i}"), PackedLinear::from_quantized(&q)));
    }
    let (rows, cols) = (8, 32);
    let w = rng.normals(rows * cols, 0.1);
    let mut h = Hessian::new(cols);
    h.add_batch(&rng.normals(64 * cols, 1.0)).unwrap();
    let spec = QuantSpec { bits: 4, group: Some(8), axis: Axis::Oc, zero: Zero::Gptq };
    let q =
        gptq(&w, rows, cols, &h, &spec, &GptqOptions { act_order: true, ..GptqOptions::default() }).unwrap().quantized;
    assert!(q.g_idx().is_some());
    out.push(("model.layers.0.self_attn.o_proj".into(), PackedLinear::from_quantized(&q)));
    out
}

/// `PackedWriter`'s output with the header's reserved padding removed (a valid file either way;
/// the padding would make every seed 64 KiB of spaces).
fn compact(bytes: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end().as_bytes().to_vec();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Regenerate the seed files (`seed-*`) of fuzz/corpus/fuzz_packed. Deterministic: rerunning
/// it rewrites the same bytes. Crash reproducers (`crash-*`) are kept by hand.
#[test]
#[ignore = "writes fuzz/corpus; run by hand: cargo test --release -p adadim-pack --test fuzz_corpus -- --ignored"]
fn write_seed_corpus() {
    let mut rng = Rng::new(11);
    let items = linears(&mut rng);
    let d = tempfile::tempdir().unwrap();
    let dir = replay::corpus_dir("fuzz_packed");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, items: &[&(String, PackedLinear)]| {
        let p = d.path().join(name);
        let mut w = PackedWriter::create(&p, 16).unwrap();
        for (n, l) in items {
            w.linear(n, l).unwrap();
        }
        w.dense("model.norm.weight", &[4], &[1.0, -2.0, 0.5, 0.25], DenseDtype::F32).unwrap();
        w.finish(&serde_json::json!({"method": "rtn", "tool": "fuzz seed"})).unwrap();
        std::fs::write(dir.join(name), compact(&std::fs::read(&p).unwrap())).unwrap();
    };
    write("seed-all-layouts", &items.iter().collect::<Vec<_>>());
    for (i, item) in items.iter().enumerate() {
        write(&format!("seed-linear-{i}"), &[item]);
    }
    let shapes = kernel_shapes(&mut rng);
    write("seed-kernel-shapes", &shapes.iter().collect::<Vec<_>>());
}

/// Shapes that take each kernel's edges: the int16 AVX2 path (per-IC, per-OC groups of whole
/// 32-blocks) with ragged tails, single rows, act-order on the int16 path.
fn kernel_shapes(rng: &mut Rng) -> Vec<(String, PackedLinear)> {
    let mut out = Vec::new();
    let cases = [
        (1, 33, 2, Some(32), Axis::Oc),
        (3, 130, 3, Some(64), Axis::Oc),
        (17, 96, 4, Some(32), Axis::Oc),
        (2, 257, 8, Some(128), Axis::Oc),
        (17, 33, 2, Some(8), Axis::Ic),
        (9, 130, 3, Some(4), Axis::Ic),
        (5, 7, 4, None, Axis::Ic),
        (3, 200, 8, Some(3), Axis::Ic),
    ];
    for (i, (rows, cols, bits, group, axis)) in cases.into_iter().enumerate() {
        let w = rng.normals(rows * cols, 0.1);
        let q = rtn(&w, rows, cols, &QuantSpec { bits, group, axis, zero: Zero::Awq }).unwrap();
        out.push((format!("model.layers.1.k{i}"), PackedLinear::from_quantized(&q)));
    }
    let (rows, cols) = (6, 96);
    let w = rng.normals(rows * cols, 0.1);
    let mut h = Hessian::new(cols);
    h.add_batch(&rng.normals(128 * cols, 1.0)).unwrap();
    let spec = QuantSpec { bits: 3, group: Some(32), axis: Axis::Oc, zero: Zero::Gptq };
    let q =
        gptq(&w, rows, cols, &h, &spec, &GptqOptions { act_order: true, ..GptqOptions::default() }).unwrap().quantized;
    out.push(("model.layers.1.act_order".into(), PackedLinear::from_quantized(&q)));
    out
}
