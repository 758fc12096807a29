//! Streaming perplexity (blocks read one at a time, windows in batches) gives the bits of the
//! in-memory evaluation, whatever the batch size.

use adadim_eval::ppl::{perplexity, perplexity_streaming};
use adadim_load::synth::{tiny_config, write_random_checkpoint, Rng};
use adadim_load::Checkpoint;
use adadim_model::Model;

#[test]
fn streamed_equals_in_memory_for_every_batch_size() {
    let d = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    write_random_checkpoint(d.path(), &cfg, 7).unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..700).map(|_| (rng.next_u64() % cfg.vocab_size as u64) as u32).collect();
    let seqlen = 64;
    let model = Model::load(&ck, seqlen, &mut |_, _| {}).unwrap();
    let want = perplexity(&model, &ids, seqlen, None, &mut |_, _| {}).unwrap();
    assert_eq!(want.windows, 700 / 64);
    let shell = Model::load_shell(&ck, seqlen).unwrap();
    assert!(shell.blocks.is_empty());
    let per_window = (seqlen - 1) * cfg.hidden_size * 4;
    // One window per batch, a ragged last batch, all windows in one batch.
    for batch_bytes in [1, 3 * per_window, usize::MAX] {
        let mut calls = Vec::new();
        let got =
            perplexity_streaming(&shell, &ck, &ids, seqlen, None, batch_bytes, &mut |a, b| calls.push((a, b))).unwrap();
        assert_eq!(got.ppl.to_bits(), want.ppl.to_bits(), "batch {batch_bytes}: ppl {} vs {}", got.ppl, want.ppl);
        assert_eq!(got.window_nll, want.window_nll);
        let batches = want.windows.div_ceil((batch_bytes / per_window).clamp(1, want.windows));
        assert_eq!(calls.last(), Some(&(batches * cfg.num_hidden_layers, batches * cfg.num_hidden_layers)));
    }
    // --limit applies the same way.
    let want = perplexity(&model, &ids, seqlen, Some(4), &mut |_, _| {}).unwrap();
    let got = perplexity_streaming(&shell, &ck, &ids, seqlen, Some(4), 1, &mut |_, _| {}).unwrap();
    assert_eq!((got.windows, got.ppl.to_bits()), (4, want.ppl.to_bits()));
}
