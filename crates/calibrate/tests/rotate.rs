//! `rotate_checkpoint`: the rotated float model computes what the source does (its logits
//! within f32 rounding), for tied and untied heads, and never overwrites an output.

use adadim_calibrate::rotate_model::rotate_checkpoint;
use adadim_load::synth::{tiny_config, write_random_checkpoint};
use adadim_load::{Checkpoint, LlamaConfig};
use std::path::Path;

fn logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let c = Checkpoint::open(dir).unwrap();
    let model = adadim_model::Model::load(&c, 64, &mut |_, _| {}).unwrap();
    model.logits(&model.forward_hidden(ids).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn check_same_function(cfg: &LlamaConfig, seed: u64, heads: bool) {
    let d = tempfile::tempdir().unwrap();
    let (src, out) = (d.path().join("m"), d.path().join("r"));
    write_random_checkpoint(&src, cfg, 5).unwrap();
    let r = rotate_checkpoint(&src, &out, seed, heads, &mut |_, _| {}).unwrap();
    assert_eq!(r.width, cfg.hidden_size);
    let rotated = Checkpoint::open(&out).unwrap();
    assert!(!rotated.config.tie_word_embeddings, "the head carries the final norm, so it is untied");
    // The norms are ones and the linears differ from the source's.
    assert!(rotated.tensor_f32("model.layers.0.input_layernorm.weight").unwrap().iter().all(|&g| g == 1.0));
    let name = "model.layers.1.self_attn.q_proj.weight";
    assert_ne!(rotated.tensor_f32(name).unwrap(), Checkpoint::open(&src).unwrap().tensor_f32(name).unwrap());
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 % cfg.vocab_size) as u32).collect();
    let (a, b) = (logits(&src, &ids), logits(&out, &ids));
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    let gap = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(gap <= 1e-5 * scale.max(1.0) * 10.0, "max |logit gap| {gap} for logits up to {scale}");
}

#[test]
fn a_rotated_model_computes_the_same_logits() {
    // 48 = 16 x 3: a Hadamard part and an odd random part.
    check_same_function(&tiny_config(), 0, false);
    check_same_function(&tiny_config(), 11, true);
    let mut untied = tiny_config();
    untied.tie_word_embeddings = false;
    check_same_function(&untied, 3, true);
    // Biases on q/k/v (Qwen2): v's rotate with its rows.
    let mut biased = tiny_config();
    biased.attention_bias = Some(true);
    check_same_function(&biased, 4, true);
}

#[test]
fn an_existing_output_is_refused_and_left_as_it_was() {
    let d = tempfile::tempdir().unwrap();
    let (src, out) = (d.path().join("m"), d.path().join("r"));
    write_random_checkpoint(&src, &tiny_config(), 5).unwrap();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = rotate_checkpoint(&src, &out, 0, true, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    // Nothing half-written beside it either.
    let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
