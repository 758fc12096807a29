//! The i-quant decoders against gguf-py's own dequantization of the same random blocks
//! (tests/reference/iquant_ref.py), bit for bit, with the codebooks read from the same wheel.

use adadim_load::iquant::{type_info, Codebooks};

#[test]
fn every_i_quant_dequantizes_as_gguf_py_does() {
    let books = Codebooks::load(&adadim_load::fetch::adadim_home()).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/reference/iquant_fixture.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let types = fixture["types"].as_array().unwrap();
    assert_eq!(types.len(), 9);
    for t in types {
        let (name, id) = (t["name"].as_str().unwrap(), t["id"].as_u64().unwrap() as u32);
        assert_eq!(type_info(id).map(|i| i.0), Some(name));
        let hex = t["blocks"].as_str().unwrap();
        let data: Vec<u8> =
            (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        let want: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let mut got = vec![f32::NAN; want.len()];
        books.dequantize(id, &data, &mut got).unwrap();
        let bad: Vec<(usize, f32, f32)> = got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (a, b))| a.to_bits() != b.to_bits())
            .map(|(i, (a, b))| (i, *a, *b))
            .take(5)
            .collect();
        assert!(bad.is_empty(), "{name}: first differences (index, ours, gguf-py): {bad:?}");
        // A byte count that is not whole blocks is an error, not a panic.
        assert!(books.dequantize(id, &data[1..], &mut got[..want.len() - type_info(id).unwrap().1]).is_err());
    }
}
