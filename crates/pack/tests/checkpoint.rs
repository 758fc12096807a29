//! The packed checkpoint: what goes in comes out bit for bit, and a file that lies (about
//! shapes, versions, permutations) or is cut short is a clear error naming the tensor.

use adadim_load::safetensors_out::DenseDtype;
use adadim_load::synth::Rng;
use adadim_pack::{PackedFile, PackedLinear, PackedWriter};
use adadim_quantize::{gptq, rtn, Axis, GptqOptions, Hessian, QuantSpec, Zero};
use std::path::Path;

fn linears() -> Vec<(String, PackedLinear)> {
    let mut rng = Rng::new(5);
    let mut out = Vec::new();
    for (i, (rows, cols, bits, group, axis)) in [
        (192, 576, 3, Some(128), Axis::Ic),
        (64, 96, 4, Some(32), Axis::Oc),
        (40, 24, 2, None, Axis::Oc),
        (16, 40, 8, Some(8), Axis::Ic),
    ]
    .into_iter()
    .enumerate()
    {
        let w = rng.normals(rows * cols, 0.1);
        let q = rtn(&w, rows, cols, &QuantSpec { bits, group, axis, zero: Zero::Awq }).unwrap();
        out.push((format!("model.layers.{i}.mlp.up_proj"), PackedLinear::from_quantized(&q)));
    }
    // Per-OC act-order: stored with its column permutation.
    let (rows, cols) = (32, 64);
    let w = rng.normals(rows * cols, 0.1);
    let mut h = Hessian::new(cols);
    h.add_batch(&rng.normals(128 * cols, 1.0)).unwrap();
    let spec = QuantSpec { bits: 4, group: Some(16), axis: Axis::Oc, zero: Zero::Gptq };
    let q =
        gptq(&w, rows, cols, &h, &spec, &GptqOptions { act_order: true, ..GptqOptions::default() }).unwrap().quantized;
    assert!(q.g_idx().is_some());
    out.push(("model.layers.9.self_attn.o_proj".into(), PackedLinear::from_quantized(&q)));
    out
}

fn write(path: &Path, items: &[(String, PackedLinear)]) {
    let mut w = PackedWriter::create(path, 64).unwrap();
    for (name, p) in items {
        w.linear(name, p).unwrap();
    }
    w.dense("model.norm.weight", &[3], &[1.0, -2.0, 0.5], DenseDtype::F32).unwrap();
    w.dense("model.embed_tokens.weight", &[2, 2], &[0.1, -65504.0, 3.0e-8, 1.5], DenseDtype::F16).unwrap();
    w.dense("lm_head.weight", &[3], &[1.0e30, -0.1, 7.0], DenseDtype::BF16).unwrap();
    w.finish(&serde_json::json!({"method": "gptq", "tool": "test"})).unwrap();
}

#[test]
fn round_trip_is_bit_exact() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("m.safetensors");
    let items = linears();
    write(&path, &items);
    let f = PackedFile::open(&path).unwrap();
    assert_eq!(f.linear_names().count(), items.len());
    assert_eq!(f.quantization()["method"], "gptq");
    for (name, p) in &items {
        let back = f.linear(name).unwrap();
        assert_eq!(&back, p, "{name}");
        assert_eq!(back.dequantize(), p.dequantize(), "{name}");
    }
    assert_eq!(f.dense("model.norm.weight").unwrap(), (vec![3], vec![1.0, -2.0, 0.5]));
    // Dense tensors keep the type they were given (the source model's): values of that type
    // come back exactly, and the file holds 2 bytes per f16 / bf16 value.
    let f16s: Vec<f32> = [0.1f32, -65504.0, 3.0e-8, 1.5].iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    assert_eq!(f.dense("model.embed_tokens.weight").unwrap(), (vec![2, 2], f16s));
    let bf16s: Vec<f32> = [1.0e30f32, -0.1, 7.0].iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    assert_eq!(f.dense("lm_head.weight").unwrap(), (vec![3], bf16s));
    let header = header_of(&path);
    assert_eq!(header["model.embed_tokens.weight"]["dtype"], "F16");
    assert_eq!(header["lm_head.weight"]["dtype"], "BF16");
    assert_eq!(header["model.norm.weight"]["dtype"], "F32");
}

#[test]
fn version_1_files_read_as_they_were_written() {
    // Version 1 stored 3-bit codes as one bit stream per row (the other widths as now): make
    // such a file by rewriting the 3-bit codes in place, and read the same linears from it.
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("v1.safetensors");
    let items = linears();
    write(&path, &items);
    let header = header_of(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    let start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut rewritten = 0;
    for (name, p) in &items {
        if p.layout().bits != 3 {
            continue;
        }
        let (rows, cols) = (p.rows(), p.cols());
        let t = &header[format!("{name}.qcodes")]["data_offsets"];
        let (a, b) = (start + t[0].as_u64().unwrap() as usize, start + t[1].as_u64().unwrap() as usize);
        let codes = adadim_pack::bits::unpack_codes(&bytes[a..b], rows, cols, 3);
        let stream = adadim_pack::bits::pack(&codes, rows, cols, 3);
        assert_ne!(&stream[..b - a], &bytes[a..b], "{name}: the planar layout differs from the stream");
        bytes[a..b].copy_from_slice(&stream[..b - a]);
        rewritten += 1;
    }
    assert!(rewritten > 0);
    std::fs::write(&path, bytes).unwrap();
    edit_header(&path, |h| h["__metadata__"]["adadim.format_version"] = "1".into());
    let f = PackedFile::open(&path).unwrap();
    for (name, p) in &items {
        assert_eq!(&f.linear(name).unwrap(), p, "{name}");
    }
}

fn header_of(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

#[test]
fn a_dense_value_beyond_f16_is_an_error_not_an_infinity() {
    let d = tempfile::tempdir().unwrap();
    let mut w = PackedWriter::create(&d.path().join("m.safetensors"), 4).unwrap();
    let e = w.dense("model.embed_tokens.weight", &[2], &[1.0, 70000.0], DenseDtype::F16).unwrap_err().to_string();
    assert!(e.contains("model.embed_tokens.weight") && e.contains("70000") && e.contains("F16"), "{e}");
}

/// Rewrite the file's header with `edit` applied to its JSON (keeping the data as it is), and
/// drop the metadata seal, as in files written before it: the reader's own checks must catch
/// every lie without it.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_header_sealed(path, |h| {
        edit(h);
        h["__metadata__"].as_object_mut().unwrap().remove(adadim_pack::checkpoint::METADATA_DIGEST);
    })
}

/// Rewrite the header with `edit` applied, leaving the seal as it is.
fn edit_header_sealed(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn linears_meta(h: &mut serde_json::Value) -> serde_json::Value {
    serde_json::from_str(h["__metadata__"]["adadim.linears"].as_str().unwrap()).unwrap()
}

fn set_linears_meta(h: &mut serde_json::Value, m: &serde_json::Value) {
    h["__metadata__"]["adadim.linears"] = m.to_string().into();
}

/// A sealed file whose metadata is edited into another valid value is refused as a whole; the
/// unedited, re-serialized header still opens (the seal covers values, not formatting).
#[test]
fn edited_metadata_breaks_the_seal() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("sealed.safetensors");
    write(&p, &linears());
    edit_header_sealed(&p, |_| {});
    assert!(PackedFile::open(&p).is_ok());
    edit_header_sealed(&p, |h| h["__metadata__"]["adadim.format_version"] = "1".into());
    let e = PackedFile::open(&p).err().expect("edited").to_string();
    assert!(e.contains("sealed.safetensors") && e.contains("metadata was changed"), "{e}");
}

#[test]
fn lies_and_damage_are_errors_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let items = linears();
    let fresh = |tag: &str| {
        let p = d.path().join(format!("{tag}.safetensors"));
        write(&p, &items);
        p
    };
    let up0 = "model.layers.0.mlp.up_proj";

    // Metadata claims more rows than the codes hold.
    let p = fresh("rows");
    edit_header(&p, |h| {
        let mut m = linears_meta(h);
        m[up0]["rows"] = 4096.into();
        set_linears_meta(h, &m);
    });
    let e = PackedFile::open(&p).unwrap().linear(up0).unwrap_err().to_string();
    assert!(e.contains("qcodes") && e.contains("declared layout"), "{e}");

    // Absurd sizes must not overflow or allocate.
    let p = fresh("huge");
    edit_header(&p, |h| {
        let mut m = linears_meta(h);
        m[up0]["rows"] = serde_json::json!(u64::MAX / 2);
        m[up0]["cols"] = serde_json::json!(u64::MAX / 2);
        m[up0]["group"] = 1.into();
        set_linears_meta(h, &m);
    });
    let e = PackedFile::open(&p).unwrap().linear(up0).unwrap_err().to_string();
    assert!(e.contains("overflows"), "{e}");

    // A group larger than the axis, bits off the menu, an unknown axis.
    for (key, value, want) in [
        ("group", serde_json::json!(0), "group"),
        ("bits", serde_json::json!(5), "bits 5"),
        ("axis", serde_json::json!("diagonal"), "axis"),
    ] {
        let p = fresh(key);
        edit_header(&p, |h| {
            let mut m = linears_meta(h);
            m[up0][key] = value;
            set_linears_meta(h, &m);
        });
        let e = PackedFile::open(&p).unwrap().linear(up0).unwrap_err().to_string();
        assert!(e.contains(up0) && e.contains(want), "{key}: {e}");
    }

    // A tensor relabelled with another dtype.
    let p = fresh("dtype");
    edit_header(&p, |h| h[format!("{up0}.scales")]["dtype"] = "BF16".into());
    let e = PackedFile::open(&p).unwrap().linear(up0).unwrap_err().to_string();
    assert!(e.contains("scales") && e.contains("BF16"), "{e}");

    // Unknown format version, and a file that is not ours.
    let p = fresh("version");
    edit_header(&p, |h| h["__metadata__"]["adadim.format_version"] = "7".into());
    let e = PackedFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("version '7'") && e.contains("reads versions 1 to 3"), "{e}");
    let p = fresh("foreign");
    edit_header(&p, |h| {
        h["__metadata__"].as_object_mut().unwrap().remove("adadim.format");
    });
    assert!(PackedFile::open(&p).err().unwrap().to_string().contains("not an adadim packed checkpoint"));

    // A permutation with a repeated column would read x twice and skip another.
    let p = fresh("perm");
    let o = "model.layers.9.self_attn.o_proj";
    {
        let mut bytes = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let start = h[format!("{o}.perm")]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n;
        let first = bytes[start..start + 4].to_vec();
        bytes[start + 4..start + 8].copy_from_slice(&first);
        std::fs::write(&p, bytes).unwrap();
    }
    let e = PackedFile::open(&p).unwrap().linear(o).unwrap_err().to_string();
    assert!(e.contains("perm") && e.contains("not a permutation"), "{e}");

    // Truncated: the data ends before the header says.
    let p = fresh("cut");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = PackedFile::open(&p).err().unwrap().to_string();
    assert!(e.contains("cut.safetensors") && e.contains("corrupt or truncated"), "{e}");
    // Empty, and shorter than the header's own length field (the file is mapped, not read).
    for (name, len) in [("empty", 0usize), ("stub", 5)] {
        let p = fresh(name);
        std::fs::write(&p, &bytes[..len]).unwrap();
        let e = PackedFile::open(&p).err().unwrap().to_string();
        assert!(e.contains(&format!("{name}.safetensors")), "{e}");
    }
}

/// Linears with float minima (`Zero::Float`): per-OC GPTQ and per-IC RTN.
fn float_min_linears() -> Vec<(String, PackedLinear)> {
    let mut rng = Rng::new(11);
    let (rows, cols) = (48, 96);
    let w = rng.normals(rows * cols, 0.1);
    let mut h = Hessian::new(cols);
    h.add_batch(&rng.normals(128 * cols, 1.0)).unwrap();
    let oc = QuantSpec { bits: 3, group: Some(32), axis: Axis::Oc, zero: Zero::Float };
    let g = gptq(&w, rows, cols, &h, &oc, &GptqOptions::default()).unwrap().quantized;
    let ic = QuantSpec { bits: 4, group: Some(16), axis: Axis::Ic, zero: Zero::Float };
    let r = rtn(&w, rows, cols, &ic).unwrap();
    // Their zeros are fractional: packed zero points could not hold them.
    assert!(g.zeros().iter().chain(r.zeros()).any(|z| z.fract() != 0.0));
    vec![
        ("model.layers.0.self_attn.q_proj".into(), PackedLinear::from_quantized(&g)),
        ("model.layers.0.mlp.down_proj".into(), PackedLinear::from_quantized(&r)),
    ]
}

#[test]
fn float_minima_round_trip_in_a_version_3_file() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("m.safetensors");
    let items = float_min_linears();
    write(&path, &items);
    let header = header_of(&path);
    assert_eq!(header["__metadata__"]["adadim.format_version"], "3");
    for (name, p) in &items {
        assert_eq!(header[format!("{name}.mins")]["dtype"], "F16");
        assert!(header.get(format!("{name}.qzeros")).is_none());
        let back = PackedFile::open(&path).unwrap().linear(name).unwrap();
        assert_eq!(&back, p, "{name}");
        assert!(back.layout().min);
    }
    // A file of only whole zero points stays version 2 (older readers keep reading it).
    let plain = d.path().join("plain.safetensors");
    write(&plain, &linears());
    assert_eq!(header_of(&plain)["__metadata__"]["adadim.format_version"], "2");

    // Minima declared in a version 2 file, and a missing minima tensor: errors naming them.
    let v2 = d.path().join("v2.safetensors");
    write(&v2, &items);
    edit_header(&v2, |h| h["__metadata__"]["adadim.format_version"] = "2".into());
    let e = PackedFile::open(&v2).unwrap().linear(&items[0].0).unwrap_err().to_string();
    assert!(e.contains("float minima in a version 2 file"), "{e}");
    let gone = d.path().join("gone.safetensors");
    write(&gone, &items);
    let mins = format!("{}.mins", items[1].0);
    edit_header(&gone, |h| {
        let t = h[&mins].take();
        h.as_object_mut().unwrap().remove(&mins);
        h[format!("{}.other", items[1].0)] = t;
    });
    let e = PackedFile::open(&gone).unwrap().linear(&items[1].0).unwrap_err().to_string();
    assert!(e.contains(&mins), "{e}");
}
