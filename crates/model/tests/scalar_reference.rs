//! The candle forward pass against a plain scalar implementation written from the LLaMA
//! equations (loops, f64 accumulation, explicit GQA head mapping, RoPE rotate-half), on a
//! seeded random model with GQA and ragged sizes.

use adadim_load::synth::{tiny_config, write_random_checkpoint};
use adadim_load::Checkpoint;
use adadim_model::{DecodeSettings, KvType, Model};

struct W {
    v: Vec<f32>,
    cols: usize,
}
impl W {
    fn get(ck: &Checkpoint, name: &str) -> W {
        let shape = ck.entry(name).unwrap().shape.clone();
        W { v: ck.tensor_f32(name).unwrap(), cols: *shape.last().unwrap() }
    }
    /// y = W x for W (rows, cols)
    fn mv(&self, x: &[f64]) -> Vec<f64> {
        self.v.chunks(self.cols).map(|r| r.iter().zip(x).map(|(&a, &b)| a as f64 * b).sum()).collect()
    }
}

fn rmsnorm(x: &[f64], w: &W, eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(&w.v).map(|(v, &g)| v * r * g as f64).collect()
}

fn rope(x: &mut [f64], pos: usize, hd: usize, theta: f64) {
    for head in x.chunks_mut(hd) {
        for i in 0..hd / 2 {
            let a = pos as f64 / theta.powf(2.0 * i as f64 / hd as f64);
            let (c, s) = (a.cos(), a.sin());
            let (x0, x1) = (head[i], head[i + hd / 2]);
            head[i] = x0 * c - x1 * s;
            head[i + hd / 2] = x1 * c + x0 * s;
        }
    }
}

/// Logits (t, vocab) for `ids`, scalar.
fn reference_logits(ck: &Checkpoint, ids: &[u32]) -> Vec<Vec<f64>> {
    let c = &ck.config;
    let (d, nh, nkv, hd) = (c.hidden_size, c.num_attention_heads, c.n_kv_heads(), c.head_dim());
    let emb = W::get(ck, "model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> =
        ids.iter().map(|&i| emb.v[i as usize * d..(i as usize + 1) * d].iter().map(|&v| v as f64).collect()).collect();
    for l in 0..c.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        let (wq, wk, wv, wo) = (
            W::get(ck, &p("self_attn.q_proj.weight")),
            W::get(ck, &p("self_attn.k_proj.weight")),
            W::get(ck, &p("self_attn.v_proj.weight")),
            W::get(ck, &p("self_attn.o_proj.weight")),
        );
        let (wg, wu, wd) = (
            W::get(ck, &p("mlp.gate_proj.weight")),
            W::get(ck, &p("mlp.up_proj.weight")),
            W::get(ck, &p("mlp.down_proj.weight")),
        );
        let (n1, n2) = (W::get(ck, &p("input_layernorm.weight")), W::get(ck, &p("post_attention_layernorm.weight")));
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let h = rmsnorm(x, &n1, c.rms_norm_eps);
            let (mut q, mut k) = (wq.mv(&h), wk.mv(&h));
            rope(&mut q, pos, hd, c.rope_theta);
            rope(&mut k, pos, hd, c.rope_theta);
            qs.push(q);
            ks.push(k);
            vs.push(wv.mv(&h));
        }
        for (t, x) in xs.iter_mut().enumerate() {
            let mut ctx = vec![0.0; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[t][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=t)
                    .map(|s| {
                        q.iter().zip(&ks[s][kvh * hd..(kvh + 1) * hd]).map(|(a, b)| a * b).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (s, w) in e.iter().enumerate() {
                    for i in 0..hd {
                        ctx[head * hd + i] += w / z * vs[s][kvh * hd + i];
                    }
                }
            }
            let o = wo.mv(&ctx);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let h = rmsnorm(x, &n2, c.rms_norm_eps);
            let (g, u) = (wg.mv(&h), wu.mv(&h));
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let dn = wd.mv(&act);
            x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
    }
    let norm = W::get(ck, "model.norm.weight");
    xs.iter().map(|x| emb.mv(&rmsnorm(x, &norm, c.rms_norm_eps))).collect()
}

#[test]
fn candle_forward_matches_scalar_reference() {
    let d = tempfile::tempdir().unwrap();
    write_random_checkpoint(d.path(), &tiny_config(), 11).unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let model = Model::load(&ck, 64, &mut |_, _| {}).unwrap();
    let ids: Vec<u32> = (0..37).map(|i| (i * 37 % 300) as u32).collect();
    let want = reference_logits(&ck, &ids);
    let got = model.logits(&model.forward_hidden(&ids).unwrap()).unwrap().to_vec2::<f32>().unwrap();
    let mut max = 0f64;
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            max = max.max((*a as f64 - b).abs());
        }
    }
    let scale = want.iter().flatten().map(|v| v.abs()).fold(0.0, f64::max);
    println!("max |logit diff| {max:.3e} (max |logit| {scale:.2})");
    assert!(max < 1e-4 * scale.max(1.0), "max diff {max}");

    // Target log-probs agree with a log-softmax of the scalar logits.
    let lp = model.target_logprobs(&model.forward_hidden(&ids[..36]).unwrap(), &ids[1..], 7).unwrap();
    for (t, l) in lp.iter().enumerate() {
        let row = &want[t];
        let m = row.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        assert!((l - (row[ids[t + 1] as usize] - lse)).abs() < 1e-4, "position {t}");
    }
}

#[test]
fn block_at_a_time_equals_whole_model() {
    let d = tempfile::tempdir().unwrap();
    write_random_checkpoint(d.path(), &tiny_config(), 5).unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let model = Model::load(&ck, 32, &mut |_, _| {}).unwrap();
    let ids = [5u32, 17, 250, 3, 3, 99];
    let whole = model.forward_hidden(&ids).unwrap();
    let mut x = model.embed(&ids).unwrap();
    let mut taps = Vec::new();
    for b in &model.blocks {
        x = b
            .forward_tapped(&x, &model.rope, &model.settings(), &mut |k, t| {
                taps.push((k, t.dims().to_vec()));
                Ok(adadim_model::Flow::Continue)
            })
            .unwrap()
            .unwrap();
    }
    let diff = (whole - x).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0);
    use adadim_model::LinearKind::*;
    assert_eq!(taps[..4], [(Q, vec![6, 48]), (O, vec![6, 48]), (Gate, vec![6, 48]), (Down, vec![6, 80])]);
    assert_eq!(taps.len(), 8);
    // Stopping at a tap ends the pass there.
    let mut seen = Vec::new();
    let r = model.blocks[0].forward_tapped(&model.embed(&ids).unwrap(), &model.rope, &model.settings(), &mut |k, _| {
        seen.push(k);
        Ok(if k == O { adadim_model::Flow::Stop } else { adadim_model::Flow::Continue })
    });
    assert!(r.unwrap().is_none());
    assert_eq!(seen, [Q, O]);
    // Out-of-vocabulary ids are an error, not a panic.
    assert!(model.embed(&[300]).unwrap_err().to_string().contains("outside the vocabulary"));
}

/// A seeded tiny model (its directory kept alive beside it).
fn tiny_model(seed: u64, positions: usize) -> (tempfile::TempDir, Model) {
    let d = tempfile::tempdir().unwrap();
    write_random_checkpoint(d.path(), &tiny_config(), seed).unwrap();
    let model = Model::load(&Checkpoint::open(d.path()).unwrap(), positions, &mut |_, _| {}).unwrap();
    (d, model)
}

/// Rows of hidden states equal up to f32 rounding, relative to each row's largest value.
fn assert_rows_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    let worst = rows_rel_diff(got, want, what);
    assert!(worst <= 1e-5, "{what}: max relative diff {worst:e}");
}

/// The largest difference between two sets of rows, relative to each row's largest value.
fn rows_rel_diff(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst = 0f32;
    for (a, b) in got.iter().zip(want) {
        let scale = b.iter().map(|v| v.abs()).fold(0f32, f32::max);
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        worst = worst.max(diff / scale.max(1.0));
    }
    worst
}

#[test]
fn cached_decoding_equals_the_full_forward() {
    // Prefill 5 tokens, then 1, then a chunk of 3, then 1 at a time: every position's hidden
    // state must be the full (uncached) forward's.
    let (_d, model) = tiny_model(7, 32);
    // 30 positions: the cache grows past its first 16 and then its 32 (copying what it held).
    let ids: Vec<u32> = (0..30).map(|i| (i * 53 % 250) as u32).collect();
    let full = model.forward_hidden(&ids).unwrap().to_vec2::<f32>().unwrap();
    let cached = |kv: KvType| {
        let mut cache = adadim_model::KvCache::new(kv);
        let mut got = Vec::new();
        let chunks = [&ids[..5], &ids[5..6], &ids[6..9], &ids[9..10], &ids[10..11], &ids[11..14], &ids[14..20]];
        for chunk in chunks.into_iter().chain(ids[20..].chunks(1)) {
            got.extend(model.forward_cached(chunk, &mut cache).unwrap().to_vec2::<f32>().unwrap());
        }
        assert_eq!(cache.len(), ids.len());
        // Keys and values of every layer and position: 2 x layers x kv heads x head dim each.
        let c = model.config.clone();
        let numbers = 2 * c.num_hidden_layers * c.n_kv_heads() * c.head_dim() * ids.len();
        assert_eq!(cache.bytes(), numbers * if kv == KvType::F16 { 2 } else { 4 }, "{kv:?} cache bytes");
        got
    };
    assert_rows_close(&cached(KvType::F32), &full, "cached");
    // An f16 cache rounds each cached key and value by up to 2^-11 of itself; through 2 layers
    // that moves the hidden state by a small multiple of that (measured: 7.9e-4 of the row's largest
    // value). Bounded at 8x 2^-11, and it must move at all (the cache really is f16).
    let f16 = rows_rel_diff(&cached(KvType::F16), &full, "f16 cache");
    assert!(f16 > 0.0 && f16 <= 8.0 / 2048.0, "f16 cache: max relative diff {f16:e}");
    // The prompt attends to its own keys and values at full precision.
    assert_rows_close(&cached(KvType::F16)[..5], &full[..5], "f16 cache, first chunk");
}

#[test]
fn a_truncated_cache_serves_another_continuation_of_its_prefix() {
    // One cache over a shared prefix, cut back and reused for two prompts that diverge after
    // 4 tokens: each must equal its own full forward (the MMLU few-shot prefix cache). Both
    // cache types: f16 within the bound of `cached_decoding_equals_the_full_forward`.
    let (_d, model) = tiny_model(8, 32);
    for (kv, tol) in [(KvType::F32, 1e-5), (KvType::F16, 8.0 / 2048.0)] {
        let close = |got: &[Vec<f32>], want: &[Vec<f32>], what: &str| {
            let d = rows_rel_diff(got, want, what);
            assert!(d <= tol, "{kv:?} {what}: max relative diff {d:e}");
        };
        let prefix: Vec<u32> = vec![10, 20, 30, 40, 50, 60];
        let mut shared = adadim_model::KvCache::new(kv);
        model.forward_cached(&prefix, &mut shared).unwrap();
        for (keep, tail) in [(4usize, vec![7u32, 8, 9]), (6, vec![99]), (0, vec![1, 2])] {
            let mut cache = shared.fork(keep).unwrap();
            assert_eq!(cache.len(), keep);
            let got = model.forward_cached(&tail, &mut cache).unwrap().to_vec2::<f32>().unwrap();
            let ids: Vec<u32> = prefix[..keep].iter().chain(&tail).copied().collect();
            let full = model.forward_hidden(&ids).unwrap().to_vec2::<f32>().unwrap();
            close(&got, &full[keep..], &format!("keep {keep}"));
        }
        assert_eq!(shared.len(), prefix.len(), "the shared cache is untouched by its forks");
        // And it still continues correctly itself, then in place after being cut back.
        let got = model.forward_cached(&[5], &mut shared).unwrap().to_vec2::<f32>().unwrap();
        let ids: Vec<u32> = prefix.iter().chain(&[5]).copied().collect();
        let full = model.forward_hidden(&ids).unwrap().to_vec2::<f32>().unwrap();
        close(&got, &full[prefix.len()..], "the shared cache after its forks");
        shared.truncate(2);
        let got = model.forward_cached(&[77, 78], &mut shared).unwrap().to_vec2::<f32>().unwrap();
        let full = model.forward_hidden(&[10, 20, 77, 78]).unwrap().to_vec2::<f32>().unwrap();
        close(&got, &full[2..], "truncated in place and overwritten");
    }
}

#[test]
fn quantized_decode_head_stays_close_to_the_float_head() {
    // 8-bit RTN head (g128 along each row): each logit moves by at most sum_c |h_c| step_c / 2,
    // about 0.4% of sum_c |h_c w_c|; evaluation-sized inputs keep the float head.
    let d = tempfile::tempdir().unwrap();
    write_random_checkpoint(d.path(), &tiny_config(), 9).unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let mut model = Model::load(&ck, 32, &mut |_, _| {}).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 31 % 250) as u32).collect();
    let h = model.forward_hidden(&ids).unwrap();
    let float = model.logits(&h).unwrap().to_vec2::<f32>().unwrap();
    let before = model.weight_bytes_per_token();
    model.quantize_decode_head(8).unwrap();
    assert!(model.weight_bytes_per_token() < before, "the packed head reads fewer bytes");
    let long = model.logits(&h).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(long, float, "12 positions: evaluation keeps the float head");
    let last = h.narrow(0, 11, 1).unwrap();
    let q = model.logits(&last).unwrap().to_vec2::<f32>().unwrap();
    let f = &float[11];
    let scale = f.iter().map(|v| v.abs()).fold(0f32, f32::max);
    let diff = q[0].iter().zip(f).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 0.0 && diff <= 0.02 * scale, "one position: quantized head, max diff {diff} vs scale {scale}");
}

/// A seeded random 2-block model, 2 KV heads, vocabulary 300, tied embeddings, q/k/v biases
/// where `bias` (loaded from a checkpoint written to a temporary directory, 32 positions).
fn random_model(hidden: usize, intermediate: usize, heads: usize, bias: bool, seed: u64) -> Model {
    let d = tempfile::tempdir().unwrap();
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": 2,
        "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true,
        "attention_bias": bias
    });
    let cfg = adadim_load::LlamaConfig::from_json(d.path(), &json.to_string()).unwrap();
    write_random_checkpoint(d.path(), &cfg, seed).unwrap();
    Model::load(&Checkpoint::open(d.path()).unwrap(), 32, &mut |_, _| {}).unwrap()
}

/// Replaces every linear of `model` by its RTN w4 (groups of `group`) packed form, per-OC and
/// per-IC in turn. Returns how many take the integer prefill product on this CPU.
fn pack_linears(model: &mut Model, group: usize) -> usize {
    use adadim_model::{LinearKind, Weight};
    use adadim_quantize::{rtn, Axis, QuantSpec, Zero};
    let mut integer = 0;
    for (i, block) in model.blocks.iter_mut().enumerate() {
        for (j, kind) in LinearKind::ALL.into_iter().enumerate() {
            let lin = block.linear_mut(kind);
            let w = lin.dense().unwrap();
            let (rows, cols) = w.dims2().unwrap();
            let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let axis = if (i + j) % 2 == 0 { Axis::Oc } else { Axis::Ic };
            let q = rtn(&w, rows, cols, &QuantSpec { bits: 4, group: Some(group), axis, zero: Zero::Awq }).unwrap();
            let p = adadim_pack::PackedLinear::from_quantized(&q);
            integer += usize::from(adadim_pack::matmul_int::kind(&p, adadim_pack::ActBits::I16).is_some());
            lin.weight = Weight::Packed(std::sync::Arc::new(p));
        }
    }
    integer
}

/// `model`'s one-token slice path against the tensor path (forward_cached + logits) for a few
/// tokens after a 3-token prompt, on caches of type `kv`: the largest difference, relative to
/// the largest logit.
fn decode_step_vs_tensor_path(model: &Model, kv: KvType) -> f32 {
    let ids: [u32; 8] = [3, 17, 250, 9, 41, 100, 7, 8];
    let (mut a, mut b) = (adadim_model::KvCache::new(kv), adadim_model::KvCache::new(kv));
    model.forward_cached(&ids[..3], &mut a).unwrap();
    model.forward_cached(&ids[..3], &mut b).unwrap();
    let mut s = adadim_model::DecodeScratch::default();
    let mut worst = 0f32;
    for &id in &ids[3..] {
        let want = model
            .logits(&model.forward_cached(&[id], &mut a).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = model.decode_step(id, &mut b, &mut s).unwrap().to_vec();
        assert_eq!((got.len(), b.len()), (want.len(), a.len()));
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        worst = worst.max(got.iter().zip(&want).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale);
    }
    worst
}

#[test]
fn decode_step_equals_the_tensor_path() {
    // Dense weights with q/k/v biases, both cache types; then packed linears (per-OC and
    // per-IC, int16 and int8 activations) and the 8-bit decode head.
    let mut model = random_model(48, 80, 6, true, 11);
    assert!(model.blocks[0].q.bias.is_some());
    for kv in [KvType::F32, KvType::F16] {
        assert_eq!(decode_step_vs_tensor_path(&model, kv), 0.0, "dense, {kv:?}");
    }
    pack_linears(&mut model, 16);
    model.quantize_decode_head(8).unwrap();
    for act in [adadim_pack::ActBits::I16, adadim_pack::ActBits::I8] {
        model.set_settings(DecodeSettings { act, ..model.settings() }).unwrap();
        for kv in [KvType::F32, KvType::F16] {
            assert_eq!(decode_step_vs_tensor_path(&model, kv), 0.0, "packed, {act:?}, {kv:?}");
        }
    }
    // A token past the vocabulary: an error, the cache untouched.
    let mut cache = adadim_model::KvCache::new(KvType::F16);
    let mut s = adadim_model::DecodeScratch::default();
    model.decode_step(1, &mut cache, &mut s).unwrap();
    let err = model.decode_step(300, &mut cache, &mut s).unwrap_err().to_string();
    assert!(err.contains("300"), "{err}");
    assert_eq!(cache.len(), 1);
}

#[test]
fn integer_prefill_moves_the_logits_by_its_rounding() {
    // A prompt of 24 positions through packed linears (per-OC and per-IC, groups of 32): the
    // integer GEMM (`DecodeSettings::integer_prefill`) against the exact f32 one. It moves the logits by the
    // activations' rounding: int16 far less than int8, neither by nothing. (Token by token the
    // integer product is held to the decode matvec's definition in adadim-pack's tests; here a
    // comparison with chunked decoding would be limited by rounding steps flipped by f32
    // round-off upstream, about one int16 step.)
    let mut model = random_model(64, 96, 4, false, 12);
    let integer = pack_linears(&mut model, 32);
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 300).collect();
    let run = |model: &Model, chunk: usize| {
        let mut cache = adadim_model::KvCache::new(KvType::F32);
        let mut out = Vec::new();
        for c in ids.chunks(chunk) {
            out.extend(
                model
                    .logits(&model.forward_cached(c, &mut cache).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
        }
        out
    };
    let diff = |a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    };
    let mut moved = Vec::new();
    for act in [adadim_pack::ActBits::I16, adadim_pack::ActBits::I8] {
        model.set_settings(DecodeSettings { act, integer_prefill: false, ..model.settings() }).unwrap();
        let exact = run(&model, ids.len());
        model.set_settings(DecodeSettings { integer_prefill: true, ..model.settings() }).unwrap();
        let prefill = run(&model, ids.len());
        assert_eq!(run(&model, ids.len()), prefill, "{act:?}: deterministic");
        let to_exact = diff(&prefill, &exact);
        let rounding = if act == adadim_pack::ActBits::I16 { 1e-3 } else { 5e-2 };
        assert!(to_exact <= rounding, "{act:?}: integer prefill vs exact {to_exact}");
        moved.push(to_exact);
        // Off again: the exact GEMM, bit for bit.
        model.set_settings(DecodeSettings { integer_prefill: false, ..model.settings() }).unwrap();
        assert_eq!(run(&model, ids.len()), exact, "{act:?}");
    }
    if integer > 0 {
        // Measured: int16 1e-4, int8 1.4e-2 of the largest logit.
        assert!(
            moved[0] > 0.0 && moved[0] * 20.0 < moved[1],
            "int16 moved the logits by {}, int8 by {}",
            moved[0],
            moved[1]
        );
    }
    if adadim_pack::simd::avx512_vnni_available() {
        assert_eq!(integer, 14, "every linear takes the integer product on this CPU");
    } else {
        eprintln!("NOTE: no AVX-512 VNNI: the prefill stays f32 ({integer} integer linears)");
    }
}

#[test]
fn batched_decode_gives_each_sequence_its_own_decode_step_bit_for_bit() {
    // Sequences of different lengths, joining and leaving the batch between steps, on dense and
    // packed linears (int16 and int8 activations, the 8-bit head), f32 and f16 caches, one of
    // them reserved up front: every sequence's logits are its lone decode step's.
    let mut model = random_model(48, 80, 6, true, 13);
    for round in 0..3 {
        if round == 1 {
            pack_linears(&mut model, 16);
            model.quantize_decode_head(8).unwrap();
        }
        if round == 2 {
            model.set_settings(DecodeSettings { act: adadim_pack::ActBits::I8, ..model.settings() }).unwrap();
        }
        for kv in [KvType::F32, KvType::F16] {
            model.set_settings(DecodeSettings { kv, ..model.settings() }).unwrap();
            let prompts: [&[u32]; 4] = [&[3, 17, 250], &[9], &[41, 100, 7, 8, 2, 5, 77], &[12, 13]];
            let mut alone: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
            let mut batched: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
            batched[2] = model.reserved_cache(32).unwrap();
            for (i, p) in prompts.iter().enumerate() {
                model.forward_cached(p, &mut alone[i]).unwrap();
                model.forward_cached(p, &mut batched[i]).unwrap();
            }
            let (mut s1, mut sb) = (adadim_model::DecodeScratch::default(), adadim_model::BatchScratch::default());
            for step in 0..6u32 {
                // Who is in this step's batch: everyone, then sequences leave and rejoin.
                let members: Vec<usize> =
                    (0..4).filter(|i| !(step as usize + i).is_multiple_of(3) || step == 0).collect();
                let ids: Vec<u32> = members.iter().map(|&i| (step * 31 + i as u32 * 7) % 300).collect();
                let mut caches: Vec<&mut adadim_model::KvCache> = Vec::new();
                for (i, c) in batched.iter_mut().enumerate() {
                    if members.contains(&i) {
                        caches.push(c);
                    }
                }
                let got = model.decode_batch(&ids, &mut caches, &mut sb).unwrap().to_vec();
                let vocab = got.len() / ids.len();
                for (j, &i) in members.iter().enumerate() {
                    let want = model.decode_step(ids[j], &mut alone[i], &mut s1).unwrap();
                    assert_eq!(&got[j * vocab..(j + 1) * vocab], want, "round {round} {kv:?} step {step} sequence {i}");
                }
            }
            for (a, b) in alone.iter().zip(&batched) {
                assert_eq!(a.len(), b.len());
            }
        }
    }
    // A token past the vocabulary: an error naming it, no cache grown.
    let mut caches = [model.new_cache(), model.new_cache()];
    let mut refs: Vec<&mut adadim_model::KvCache> = caches.iter_mut().collect();
    let err = model.decode_batch(&[1, 300], &mut refs, &mut adadim_model::BatchScratch::default()).unwrap_err();
    assert!(err.to_string().contains("300"), "{err}");
    assert!(caches.iter().all(|c| c.is_empty()));
}
