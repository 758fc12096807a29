//! GGUF import against a GGUF written here from known weights: every supported tensor type,
//! llama.cpp's Q/K row permutation undone, names and config derived from metadata.

use adadim_load::gguf::import_gguf;
use adadim_load::synth::{byte_tokenizer_json, write_random_checkpoint};
use adadim_load::{Checkpoint, LlamaConfig};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

fn config() -> LlamaConfig {
    // Widths of 256 so every K-quant block fits.
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 50000.0, "tie_word_embeddings": false
    });
    LlamaConfig::from_json(Path::new("t"), &json.to_string()).unwrap()
}

const TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// llama.cpp's converter permutation (HF row h*hd + two*hd/2 + j -> GGUF row h*hd + 2j + two).
fn permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let hd = w.len() / cols / n_head;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for two in 0..2 {
            for j in 0..hd / 2 {
                let (src, dst) = (h * hd + two * hd / 2 + j, h * hd + 2 * j + two);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn gguf_name(hf: &str) -> String {
    let s = hf
        .replace("model.embed_tokens", "token_embd")
        .replace("model.norm", "output_norm")
        .replace("lm_head", "output")
        .replace("model.layers.", "blk.")
        .replace("input_layernorm", "attn_norm")
        .replace("post_attention_layernorm", "ffn_norm")
        .replace("self_attn.o_proj", "attn_output");
    s.replace("self_attn.", "attn_").replace("_proj", "").replace("mlp.", "ffn_")
}

/// Write `src` (an HF checkpoint) as a llama GGUF, matrices in the given types.
fn write_gguf(src: &Checkpoint, path: &Path, types: &[GgmlDType]) -> Vec<(String, GgmlDType)> {
    let cfg = &src.config;
    let tok = byte_tokenizer_json(cfg.vocab_size);
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens: Vec<(usize, String)> =
        vocab.iter().map(|(k, v)| (v.as_u64().unwrap() as usize, k.clone())).collect();
    tokens.sort();
    tokens[256].1 = "Ġt".into(); // the merge below needs its result in the vocabulary
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(cfg.num_hidden_layers as u32)),
        ("llama.embedding_length", Value::U32(cfg.hidden_size as u32)),
        ("llama.feed_forward_length", Value::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count", Value::U32(cfg.num_attention_heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(cfg.n_kv_heads() as u32)),
        ("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(cfg.rms_norm_eps as f32)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(|(_, t)| Value::String(t)).collect())),
        ("tokenizer.ggml.merges", Value::Array(vec![Value::String("Ġ t".into())])),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
    ];
    let mut qs = Vec::new();
    let mut chosen = Vec::new();
    let mut k = 0;
    for (name, shape) in cfg.expected_tensors() {
        let mut v = src.tensor_f32(&name).unwrap();
        if name.contains("q_proj") {
            v = permute(&v, cfg.num_attention_heads, shape[1]);
        } else if name.contains("k_proj") {
            v = permute(&v, cfg.n_kv_heads(), shape[1]);
        }
        let ty = if shape.len() == 1 {
            GgmlDType::F32
        } else {
            k += 1;
            types[(k - 1) % types.len()]
        };
        let t = Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap();
        qs.push((gguf_name(&name), QTensor::quantize(&t, ty).unwrap()));
        chosen.push((name, ty));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let q_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &q_refs).unwrap();
    chosen
}

#[test]
fn import_matches_direct_dequantization_for_every_type() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    let cfg = config();
    write_random_checkpoint(&hf, &cfg, 3).unwrap();
    let src = Checkpoint::open(&hf).unwrap();
    let gguf = d.path().join("m.gguf");
    // 8 matrices in this config: two passes over the type list cover all 13 types.
    let mut seen = std::collections::HashSet::new();
    for (pass, offset) in [0usize, 8].into_iter().enumerate() {
        let types: Vec<GgmlDType> = (0..8).map(|i| TYPES[(offset + i) % TYPES.len()]).collect();
        let chosen = write_gguf(&src, &gguf, &types);
        let out = d.path().join(format!("imported{pass}"));
        let mut calls = 0;
        let summary = import_gguf(&gguf, &out, &mut |_, _| calls += 1).unwrap();
        assert_eq!(calls, summary.tensors);
        let imp = Checkpoint::open(&out).unwrap();
        assert_eq!(imp.config.hidden_size, 256);
        assert_eq!(imp.config.n_kv_heads(), 2);
        assert!(!imp.config.tie_word_embeddings);
        assert!((imp.config.rope_theta - 50000.0).abs() < 1e-3);
        for (name, ty) in chosen {
            seen.insert(format!("{ty:?}"));
            let want = src.tensor(&name).unwrap();
            // Quantization works on rows and the permutation moves whole rows, so the import
            // must equal quantize->dequantize of the original, bit for bit.
            let want = QTensor::quantize(&want, ty).unwrap().dequantize(&Device::Cpu).unwrap();
            let got = imp.tensor(&name).unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{name} ({ty:?}): max abs diff {diff}");
        }
        let tok = adadim_load::tokenizer::load(&out).unwrap();
        let ids = tok.encode("a t", false).unwrap().get_ids().to_vec();
        assert_eq!(ids.len(), 2, "the merge 'Ġ t' applies: {ids:?}");
    }
    assert_eq!(seen.len(), TYPES.len(), "covered {seen:?}");
}

#[test]
fn refuses_to_overwrite_and_cleans_up_on_error() {
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    write_random_checkpoint(&hf, &config(), 3).unwrap();
    let src = Checkpoint::open(&hf).unwrap();
    let gguf = d.path().join("m.gguf");
    write_gguf(&src, &gguf, &[GgmlDType::F32]);
    // Existing output directory: refused, untouched.
    let e = import_gguf(&gguf, &hf, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("already exists"), "{e}");
    assert!(Checkpoint::open(&hf).is_ok());
    // Truncated file: a clear error naming the file, and no output directory or temp left.
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = d.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let out = d.path().join("out");
    let e = import_gguf(&cut, &out, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("cut.gguf") && e.contains("tensor '") && e.contains("truncated"), "{e}");
    assert!(!e.contains("backtrace") && e.lines().count() == 1, "{e}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(leftovers.iter().all(|n| !n.to_string_lossy().contains("partial")), "{leftovers:?}");
}

/// i-quants: a GGUF written with F32 matrices, then each matrix's type field set to an i-quant
/// and the start of its data slot filled with random blocks of that type (the i-quant takes
/// fewer bytes than F32, so every offset stays valid). The import must give the decoders' values
/// (tests/iquant.rs checks those against gguf-py), rows unpermuted for q / k, and name the types.
#[test]
fn i_quant_tensors_import_through_their_own_decoders() {
    use adadim_load::iquant::{type_info, Codebooks, TYPES};
    let d = tempfile::tempdir().unwrap();
    let hf = d.path().join("hf");
    let cfg = config();
    write_random_checkpoint(&hf, &cfg, 3).unwrap();
    let src = Checkpoint::open(&hf).unwrap();
    let gguf = d.path().join("iq.gguf");
    let chosen = write_gguf(&src, &gguf, &[GgmlDType::F32]);
    let content = gguf_file::Content::read(&mut std::fs::File::open(&gguf).unwrap()).unwrap();
    let mut bytes = std::fs::read(&gguf).unwrap();
    let books = Codebooks::load(&adadim_load::fetch::adadim_home()).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut want = std::collections::HashMap::new();
    let matrices: Vec<&(String, GgmlDType)> = chosen.iter().filter(|(n, _)| n.ends_with("_proj.weight")).collect();
    for (k, (name, _)) in matrices.iter().enumerate() {
        let (id, tname, per, size) = TYPES[k % TYPES.len()];
        let g = gguf_name(name);
        let info = &content.tensor_infos[&g];
        let n: usize = info.shape.dims().iter().product();
        // The type field: after the name (u64 length + bytes), n_dims (u32) and the dims (u64 each).
        let mut key = (g.len() as u64).to_le_bytes().to_vec();
        key.extend_from_slice(g.as_bytes());
        let at = bytes.windows(key.len()).position(|w| w == key.as_slice()).unwrap() + key.len();
        let at = at + 4 + 8 * info.shape.dims().len();
        bytes[at..at + 4].copy_from_slice(&id.to_le_bytes());
        let mut blocks = vec![0u8; n / per * size];
        for b in blocks.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = (state >> 24) as u8;
        }
        // Finite f16 super-block scales of a plausible size (IQ1_M spreads its own over nibbles).
        for blk in blocks.chunks_mut(size) {
            if tname == "IQ1_M" {
                for (i, nib) in [0x0u16, 0x2, 0x0, 0x2].iter().enumerate() {
                    let w = u16::from_le_bytes([blk[48 + 2 * i], blk[49 + 2 * i]]) & 0x0fff | (nib << 12);
                    blk[48 + 2 * i..50 + 2 * i].copy_from_slice(&w.to_le_bytes());
                }
            } else {
                blk[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            }
        }
        let start = (content.tensor_data_offset + info.offset) as usize;
        bytes[start..start + blocks.len()].copy_from_slice(&blocks);
        let mut v = vec![0f32; n];
        books.dequantize(id, &blocks, &mut v).unwrap();
        let cols = info.shape.dims()[1];
        if name.contains("q_proj") {
            v = adadim_load::gguf::unpermute_rows(&v, cfg.num_attention_heads, cols);
        } else if name.contains("k_proj") {
            v = adadim_load::gguf::unpermute_rows(&v, cfg.n_kv_heads(), cols);
        }
        want.insert(name.clone(), (tname, v));
        assert_eq!(type_info(id).unwrap().0, tname);
    }
    std::fs::write(&gguf, &bytes).unwrap();
    let out = d.path().join("imported");
    let summary = import_gguf(&gguf, &out, &mut |_, _| {}).unwrap();
    let imp = Checkpoint::open(&out).unwrap();
    for (name, (tname, v)) in &want {
        assert_eq!(&imp.tensor_f32(name).unwrap(), v, "{name} ({tname})");
        assert!(summary.source_types.contains_key(*tname), "{tname} in {:?}", summary.source_types);
    }
    assert_eq!(want.len(), 7);
}
