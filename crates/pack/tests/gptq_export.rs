//! GPTQ v1 export, read back by an independent numpy reader (tests/reference/gptq_export_reader.py):
//! its dequantized weights must be ours bit for bit. The reader ran on the file this test
//! writes with `--ignored write_sample`; the fixture records the file's SHA-256 (so the reader
//! saw exactly what we write today) and the SHA-256 of each linear's dequantized f32 weights.

use adadim_load::safetensors_out::StreamWriter;
use adadim_load::synth::Rng;
use adadim_pack::export_gptq::write_gptq_linear;
use adadim_quantize::{gptq, rtn, Axis, GptqOptions, Hessian, QuantSpec, QuantizedMatrix, Zero};
use sha2::{Digest, Sha256};
use std::path::Path;

fn linears() -> Vec<(String, QuantizedMatrix)> {
    let mut rng = Rng::new(11);
    let mut out = Vec::new();
    // GPTQ with act-order (dynamic groups -> a real g_idx), 3 bits: codes straddle words.
    for (i, (rows, cols, bits, group, act, zero)) in [
        (48, 96, 3u8, Some(32), true, Zero::Gptq),
        (64, 128, 4, Some(32), false, Zero::Awq),
        (40, 64, 2, None, true, Zero::Gptq),
    ]
    .into_iter()
    .enumerate()
    {
        let w = rng.normals(rows * cols, 0.1);
        let mut h = Hessian::new(cols);
        let mut x = rng.normals(256 * cols, 1.0);
        x.iter_mut().step_by(7).for_each(|v| *v *= 4.0);
        h.add_batch(&x).unwrap();
        let spec = QuantSpec { bits, group, axis: Axis::Oc, zero };
        let q = gptq(&w, rows, cols, &h, &spec, &GptqOptions { act_order: act, ..GptqOptions::default() })
            .unwrap()
            .quantized;
        out.push((format!("model.layers.{i}.mlp.down_proj"), q));
    }
    out
}

fn write(path: &Path) {
    let mut w = StreamWriter::create(path, 8192).unwrap();
    for (name, q) in linears() {
        write_gptq_linear(&mut w, &name, &q).unwrap();
    }
    w.finish(&[("format".into(), "pt".into())]).unwrap();
}

fn fixture() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference/gptq_export_fixture.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn numpy_reader_reproduces_our_weights_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("gptq.safetensors");
    write(&p);
    let f = fixture();
    assert_eq!(
        hex(&Sha256::digest(std::fs::read(&p).unwrap())),
        f["file_sha256"].as_str().unwrap(),
        "the export changed: rerun tests/reference/gptq_export_reader.py (see its header)"
    );
    for (name, q) in linears() {
        let bytes: Vec<u8> = q.dequantize().iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            hex(&Sha256::digest(&bytes)),
            f["linears"][&name]["weights_sha256"].as_str().unwrap(),
            "{name}: numpy's dequantization differs from ours"
        );
    }
}

#[test]
fn per_ic_and_zero_points_of_zero_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut w = StreamWriter::create(&d.path().join("x.safetensors"), 4096).unwrap();
    let mut rng = Rng::new(3);
    let m = rng.normals(16 * 32, 1.0);
    let ic = rtn(&m, 16, 32, &QuantSpec { bits: 4, group: Some(8), axis: Axis::Ic, zero: Zero::Gptq }).unwrap();
    let e = write_gptq_linear(&mut w, "a.q_proj", &ic).unwrap_err().to_string();
    assert!(e.contains("a.q_proj") && e.contains("per-IC"), "{e}");
    // An all-positive group under AWQ-style zeros gets zero point 0.
    let pos: Vec<f32> = m.iter().map(|v| v.abs() + 0.1).collect();
    let oc = rtn(&pos, 16, 32, &QuantSpec { bits: 4, group: Some(8), axis: Axis::Oc, zero: Zero::Awq }).unwrap();
    let e = write_gptq_linear(&mut w, "a.k_proj", &oc).unwrap_err().to_string();
    assert!(e.contains("a.k_proj") && e.contains("zero point of 0"), "{e}");
}

/// Writes the sample the numpy reader reads: `cargo test -p adadim-pack --test gptq_export -- --ignored`.
#[test]
#[ignore]
fn write_sample() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/gptq_export_sample.safetensors");
    write(&p);
    eprintln!("wrote {}", p.display());
}
