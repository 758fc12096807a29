//! Cached generation against the plain definition: at every step, the greedy token is the
//! argmax of the full forward pass over everything so far.

use adadim_load::synth::{tiny_config, write_random_checkpoint};
use adadim_load::Checkpoint;
use adadim_model::Model;
use adadim_run::{generate, generate_until, Settings};

#[test]
fn greedy_generation_equals_recomputing_everything_each_step() {
    let d = tempfile::tempdir().unwrap();
    write_random_checkpoint(d.path(), &tiny_config(), 3).unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let model = Model::load(&ck, 64, &mut |_, _| {}).unwrap();
    let prompt: Vec<u32> = vec![5, 77, 120, 9];
    let mut got = Vec::new();
    let stats =
        generate(&model, &prompt, &[], &Settings { max_tokens: 20, temperature: 0.0, seed: 0 }, &mut |t| got.push(t))
            .unwrap();
    assert_eq!((stats.generated, got.len(), stats.stopped_by_token), (20, 20, false));
    let mut seq = prompt.clone();
    for (i, &g) in got.iter().enumerate() {
        let h = model.forward_hidden(&seq).unwrap();
        let logits = model
            .logits(&h.narrow(0, seq.len() - 1, 1).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want =
            logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
                as u32;
        assert_eq!(g, want, "step {i}");
        seq.push(g);
    }
    // A stop token ends generation without being emitted.
    let mut got2 = Vec::new();
    let stats =
        generate(&model, &prompt, &[got[3]], &Settings { max_tokens: 20, temperature: 0.0, seed: 0 }, &mut |t| {
            got2.push(t)
        })
        .unwrap();
    assert!(stats.stopped_by_token);
    assert_eq!(got2, got[..got.iter().position(|&t| t == got[3]).unwrap()]);
    // The caller ends it after the token it was handed (text stop sequences).
    let mut got3 = Vec::new();
    let stats =
        generate_until(&model, &prompt, &[], &Settings { max_tokens: 20, temperature: 0.0, seed: 0 }, &mut |t| {
            got3.push(t);
            got3.len() < 5
        })
        .unwrap();
    assert!(stats.stopped_by_caller && !stats.stopped_by_token);
    assert_eq!((stats.generated, &got3[..]), (5, &got[..5]));
}
