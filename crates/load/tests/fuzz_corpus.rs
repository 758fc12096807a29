//! Fuzz smoke for CI: the committed corpus of the cargo-fuzz targets `fuzz_safetensors`,
//! `fuzz_gguf` and `fuzz_config` (fuzz/corpus/), each file as committed and in seeded
//! mutations, through the same entry points the targets call (fuzz/src/load_targets.rs). No
//! input may panic. `write_seed_corpus` (ignored) regenerates the seed files from our own
//! writers and a GGUF built here byte by byte from the spec; fuzz/README.md has the rest.

#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/load_targets.rs"]
mod targets;

use adadim_load::safetensors_out::StreamWriter;
use adadim_load::synth::{write_random_checkpoint, Rng};
use adadim_load::LlamaConfig;
use std::path::Path;

/// Seeded mutations per corpus file (the whole test stays within a few seconds).
const MUTATIONS: usize = 1000;

#[test]
fn config_corpus_never_panics() {
    replay::replay("fuzz_config", MUTATIONS, targets::config);
}

#[test]
fn safetensors_corpus_never_panics() {
    let s = targets::Scratch::new();
    replay::replay("fuzz_safetensors", MUTATIONS, |d| targets::safetensors(&s, d));
}

#[test]
fn gguf_corpus_never_panics() {
    let s = targets::Scratch::new();
    replay::replay("fuzz_gguf", MUTATIONS, |d| targets::gguf(&s, d));
}

/// The seeds must reach past the header checks, or the fuzzer starts from nothing.
#[test]
fn seeds_are_valid_files() {
    let s = targets::Scratch::new();
    for name in ["seed-f32", "seed-f16", "seed-bf16-mixed"] {
        let data = std::fs::read(replay::corpus_dir("fuzz_safetensors").join(name)).unwrap();
        std::fs::write(s.path("model.safetensors"), data).unwrap();
        let ck = adadim_load::Checkpoint::open(&s.path("")).unwrap_or_else(|e| panic!("{name}: {e}"));
        for t in ck.tensor_names() {
            ck.tensor_f32(t).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    for name in ["seed-v3-tiny-llama", "seed-v2-kquants", "seed-v1-header"] {
        let p = replay::corpus_dir("fuzz_gguf").join(name);
        let mut g = adadim_load::gguf::Gguf::open(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        let names: Vec<String> = g.content.tensor_infos.keys().cloned().collect();
        for t in names {
            g.tensor_f32(&t).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    let out = s.path("imported");
    adadim_load::gguf::import_gguf(&replay::corpus_dir("fuzz_gguf").join("seed-v3-tiny-llama"), &out, &mut |_, _| {})
        .unwrap();
    adadim_load::Checkpoint::open(&out).unwrap();
    let text = std::fs::read_to_string(replay::corpus_dir("fuzz_config").join("seed-smollm2.json")).unwrap();
    LlamaConfig::from_json(Path::new("seed"), &text).unwrap();
}

// ---- seed corpus --------------------------------------------------------------------------

/// Regenerate the seed files (`seed-*`) of the three corpora. Deterministic: rerunning it
/// rewrites the same bytes. Crash reproducers (`crash-*`) are kept by hand.
#[test]
#[ignore = "writes fuzz/corpus; run by hand: cargo test --release -p adadim-load --test fuzz_corpus -- --ignored"]
fn write_seed_corpus() {
    write_safetensors_seeds();
    write_gguf_seeds();
    write_config_seeds();
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = replay::corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn checkpoint_config() -> LlamaConfig {
    LlamaConfig::from_json(Path::new("seed"), targets::CHECKPOINT_CONFIG).unwrap()
}

/// A safetensors file with its header written without the padding our streaming writers reserve.
fn compact_safetensors(bytes: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end().as_bytes().to_vec();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn write_safetensors_seeds() {
    let cfg = checkpoint_config();
    let d = tempfile::tempdir().unwrap();
    write_random_checkpoint(d.path(), &cfg, 1).unwrap();
    put("fuzz_safetensors", "seed-f32", &std::fs::read(d.path().join("model.safetensors")).unwrap());

    // The same tensors as F16, and as BF16 / F32 alternating (the dtypes the reader converts).
    let mut rng = Rng::new(2);
    for (name, mixed) in [("seed-f16", false), ("seed-bf16-mixed", true)] {
        let p = d.path().join(name);
        let mut w = StreamWriter::create(&p, 8192).unwrap();
        for (i, (t, shape)) in cfg.expected_tensors().iter().enumerate() {
            let v = rng.normals(shape.iter().product(), 0.5);
            let (dtype, bytes): (&'static str, Vec<u8>) = match (mixed, i % 2) {
                (false, _) => ("F16", v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()),
                (true, 0) => ("BF16", v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()),
                (true, _) => ("F32", v.iter().flat_map(|&x| x.to_le_bytes()).collect()),
            };
            w.write(t, dtype, shape, &bytes).unwrap();
        }
        w.finish(&[("format".into(), "pt".into())]).unwrap();
        put("fuzz_safetensors", name, &compact_safetensors(&std::fs::read(&p).unwrap()));
    }
}

/// A GGUF file written from the spec (ggml docs/gguf.md): little-endian, `GGUF`, version,
/// tensor count, metadata count, metadata, tensor infos, then the data aligned to
/// `general.alignment` (default 32), each tensor starting on an aligned offset.
struct GgufBuilder {
    version: u32,
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    alignment: usize,
}

// GGUF metadata value types.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

// ggml tensor types and their (block elements, block bytes).
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q4_0: u32 = 2;
const GGML_Q4_1: u32 = 3;
const GGML_Q5_0: u32 = 6;
const GGML_Q5_1: u32 = 7;
const GGML_Q8_0: u32 = 8;
const GGML_Q2_K: u32 = 10;
const GGML_Q3_K: u32 = 11;
const GGML_Q4_K: u32 = 12;
const GGML_Q5_K: u32 = 13;
const GGML_Q6_K: u32 = 14;
const GGML_BF16: u32 = 30;

fn block(ty: u32) -> (usize, usize) {
    match ty {
        GGML_F32 => (1, 4),
        GGML_F16 | GGML_BF16 => (1, 2),
        GGML_Q4_0 => (32, 18),
        GGML_Q4_1 => (32, 20),
        GGML_Q5_0 => (32, 22),
        GGML_Q5_1 => (32, 24),
        GGML_Q8_0 => (32, 34),
        GGML_Q2_K => (256, 84),
        GGML_Q3_K => (256, 110),
        GGML_Q4_K => (256, 144),
        GGML_Q5_K => (256, 176),
        GGML_Q6_K => (256, 210),
        _ => unreachable!("type {ty}"),
    }
}

impl GgufBuilder {
    fn new(version: u32) -> Self {
        GgufBuilder { version, kv: Vec::new(), n_kv: 0, tensors: Vec::new(), alignment: 32 }
    }
    fn len(&self, out: &mut Vec<u8>, n: usize) {
        if self.version == 1 {
            out.extend_from_slice(&(n as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(n as u64).to_le_bytes());
        }
    }
    fn string(&self, out: &mut Vec<u8>, s: &str) {
        self.len(out, s.len());
        out.extend_from_slice(s.as_bytes());
    }
    fn key(&mut self, k: &str, ty: u32) -> &mut Vec<u8> {
        let mut b = std::mem::take(&mut self.kv);
        self.string(&mut b, k);
        b.extend_from_slice(&ty.to_le_bytes());
        self.kv = b;
        self.n_kv += 1;
        &mut self.kv
    }
    fn u32(&mut self, k: &str, v: u32) -> &mut Self {
        self.key(k, T_U32).extend_from_slice(&v.to_le_bytes());
        self
    }
    fn i32(&mut self, k: &str, v: i32) -> &mut Self {
        self.key(k, T_I32).extend_from_slice(&v.to_le_bytes());
        self
    }
    fn f32(&mut self, k: &str, v: f32) -> &mut Self {
        self.key(k, T_F32).extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k, T_BOOL).push(u8::from(v));
        self
    }
    fn str(&mut self, k: &str, v: &str) -> &mut Self {
        self.key(k, T_STRING);
        let mut b = std::mem::take(&mut self.kv);
        self.string(&mut b, v);
        self.kv = b;
        self
    }
    fn strs(&mut self, k: &str, v: &[&str]) -> &mut Self {
        self.key(k, T_ARRAY);
        let mut b = std::mem::take(&mut self.kv);
        b.extend_from_slice(&T_STRING.to_le_bytes());
        self.len(&mut b, v.len());
        for s in v {
            self.string(&mut b, s);
        }
        self.kv = b;
        self
    }
    fn i32s(&mut self, k: &str, v: &[i32]) -> &mut Self {
        self.key(k, T_ARRAY);
        let mut b = std::mem::take(&mut self.kv);
        b.extend_from_slice(&T_I32.to_le_bytes());
        self.len(&mut b, v.len());
        for x in v {
            b.extend_from_slice(&x.to_le_bytes());
        }
        self.kv = b;
        self
    }
    /// A tensor of HF shape `[out, in]` (GGUF lists dimensions innermost first) with `bytes`.
    fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, bytes: Vec<u8>) -> &mut Self {
        let (be, bb) = block(ty);
        let n: usize = shape.iter().product();
        assert_eq!(bytes.len(), n / be * bb, "{name}");
        self.tensors.push((name.into(), shape.iter().rev().map(|&d| d as u64).collect(), ty, bytes));
        self
    }
    fn build(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        self.len(&mut out, self.tensors.len());
        self.len(&mut out, self.n_kv as usize);
        out.extend_from_slice(&self.kv);
        let mut offset = 0usize;
        for (name, dims, ty, bytes) in &self.tensors {
            self.string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for &d in dims {
                if self.version == 1 {
                    out.extend_from_slice(&(d as u32).to_le_bytes());
                } else {
                    out.extend_from_slice(&d.to_le_bytes());
                }
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + bytes.len()).next_multiple_of(self.alignment);
        }
        out.resize(out.len().next_multiple_of(self.alignment), 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(out.len().next_multiple_of(self.alignment), 0);
        }
        out
    }
}

/// Bytes for `n` elements of `ty`: floats from `rng` for F32/F16/BF16; for block types random
/// bytes below 0x3C, so that every f16 scale inside a block is finite (whatever its offset).
fn tensor_bytes(rng: &mut Rng, ty: u32, n: usize) -> Vec<u8> {
    let v = rng.normals(n, 0.3);
    match ty {
        GGML_F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GGML_F16 => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        GGML_BF16 => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        _ => {
            let (be, bb) = block(ty);
            (0..n / be * bb).map(|_| (rng.next_u64() % 0x3C) as u8).collect()
        }
    }
}

fn write_gguf_seeds() {
    // A whole tiny llama (d = 32 so the 32-element quant blocks fit): imports end to end.
    let (d, ff, heads, kv_heads, vocab) = (32usize, 64usize, 2u32, 1u32, 12usize);
    let hd = d / heads as usize;
    let tokens = ["a", "b", "c", "d", "ab", "cd", "abcd", "Ġ", "Ġa", "<|im_start|>", "<|im_end|>", "<|endoftext|>"];
    assert_eq!(tokens.len(), vocab);
    let mut g = GgufBuilder::new(3);
    g.str("general.architecture", "llama")
        .str("general.name", "adadim fuzz seed")
        .u32("general.alignment", 32)
        .u32("llama.block_count", 1)
        .u32("llama.context_length", 64)
        .u32("llama.embedding_length", d as u32)
        .u32("llama.feed_forward_length", ff as u32)
        .u32("llama.attention.head_count", heads)
        .u32("llama.attention.head_count_kv", kv_heads)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .f32("llama.rope.freq_base", 10000.0)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .strs("tokenizer.ggml.tokens", &tokens)
        .i32s("tokenizer.ggml.token_type", &[1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3])
        .strs("tokenizer.ggml.merges", &["a b", "c d", "ab cd", "Ġ a"])
        .u32("tokenizer.ggml.bos_token_id", 9)
        .u32("tokenizer.ggml.eos_token_id", 10)
        .bool("tokenizer.ggml.add_bos_token", false)
        .str("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}");
    let mut rng = Rng::new(3);
    let kvd = hd * kv_heads as usize;
    let plan: [(&str, Vec<usize>, u32); 11] = [
        ("token_embd.weight", vec![vocab, d], GGML_Q8_0),
        ("output_norm.weight", vec![d], GGML_F32),
        ("output.weight", vec![vocab, d], GGML_F16),
        ("blk.0.attn_norm.weight", vec![d], GGML_F32),
        ("blk.0.ffn_norm.weight", vec![d], GGML_F32),
        ("blk.0.attn_q.weight", vec![d, d], GGML_Q4_0),
        ("blk.0.attn_k.weight", vec![kvd, d], GGML_Q4_1),
        ("blk.0.attn_v.weight", vec![kvd, d], GGML_Q5_0),
        ("blk.0.attn_output.weight", vec![d, d], GGML_Q5_1),
        ("blk.0.ffn_gate.weight", vec![ff, d], GGML_BF16),
        ("blk.0.ffn_up.weight", vec![ff, d], GGML_F16),
    ];
    for (name, shape, ty) in plan {
        let b = tensor_bytes(&mut rng, ty, shape.iter().product());
        g.tensor(name, &shape, ty, b);
    }
    let b = tensor_bytes(&mut rng, GGML_Q8_0, d * ff);
    g.tensor("blk.0.ffn_down.weight", &[d, ff], GGML_Q8_0, b);
    put("fuzz_gguf", "seed-v3-tiny-llama", &g.build());

    // Version 2, alignment 64, one small tensor of every K-quant type (one 256-element block).
    let mut g = GgufBuilder::new(2);
    g.alignment = 64;
    g.str("general.architecture", "llama").i32("general.alignment", 64).u32("llama.embedding_length", 256);
    for (name, ty) in
        [("q2k", GGML_Q2_K), ("q3k", GGML_Q3_K), ("q4k", GGML_Q4_K), ("q5k", GGML_Q5_K), ("q6k", GGML_Q6_K)]
    {
        let b = tensor_bytes(&mut rng, ty, 256);
        g.tensor(&format!("{name}.weight"), &[1, 256], ty, b);
    }
    put("fuzz_gguf", "seed-v2-kquants", &g.build());

    // Version 1 (32-bit lengths): metadata and one f32 tensor.
    let mut g = GgufBuilder::new(1);
    g.str("general.architecture", "llama").u32("llama.block_count", 1).strs("tokenizer.ggml.tokens", &["x", "y"]);
    let b = tensor_bytes(&mut rng, GGML_F32, 4);
    g.tensor("output_norm.weight", &[4], GGML_F32, b);
    put("fuzz_gguf", "seed-v1-header", &g.build());
}

fn write_config_seeds() {
    let smollm2 = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,"rms_norm_eps":1e-5,"rope_theta":100000.0,"tie_word_embeddings":true,"max_position_embeddings":8192,"bos_token_id":1,"eos_token_id":2,"torch_dtype":"bfloat16","model_type":"llama"}"#;
    let qwen2 = r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":896,"intermediate_size":4864,"num_hidden_layers":24,"num_attention_heads":14,"num_key_value_heads":2,"vocab_size":151936,"rms_norm_eps":1e-6,"rope_theta":1000000.0,"tie_word_embeddings":true,"eos_token_id":[151645,151643],"rope_scaling":null}"#;
    let mistral = r#"{"architectures":["MistralForCausalLM"],"hidden_size":4096,"intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":128,"vocab_size":32768,"rms_norm_eps":1e-5,"rope_theta":1000000.0,"attention_bias":false}"#;
    let llama3_scaled = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"vocab_size":128256,"rope_scaling":{"factor":32.0,"rope_type":"llama3"}}"#;
    let bad_heads = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":10,"intermediate_size":4,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2,"vocab_size":5}"#;
    for (name, text) in [
        ("seed-smollm2.json", smollm2),
        ("seed-qwen2.json", qwen2),
        ("seed-mistral.json", mistral),
        ("seed-llama3-rope-scaling.json", llama3_scaled),
        ("seed-bad-heads.json", bad_heads),
        ("seed-tiny-checkpoint.json", targets::CHECKPOINT_CONFIG),
        ("seed-not-json.json", "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 5"),
    ] {
        put("fuzz_config", name, text.as_bytes());
    }
}

// ---- regressions for what fuzzing found ---------------------------------------------------

/// candle's GGUF reader divides by `general.alignment`: a 0 there, however it is spelled
/// (any integer type candle accepts, a NUL-padded key, the byte-swapped magic), must be an
/// error naming the key, not a division by zero.
#[test]
fn gguf_alignment_zero_is_an_error() {
    let s = targets::Scratch::new();
    let build = |key: &str, ty: u32, value: &[u8], magic: &[u8; 4]| {
        let mut g = GgufBuilder::new(3);
        g.str("general.architecture", "llama");
        g.key(key, ty).extend_from_slice(value);
        g.u32("llama.block_count", 1);
        let b = tensor_bytes(&mut Rng::new(1), GGML_F32, 8);
        g.tensor("output_norm.weight", &[8], GGML_F32, b);
        let mut bytes = g.build();
        bytes[..4].copy_from_slice(magic);
        bytes
    };
    let cases = [
        ("u32", build("general.alignment", T_U32, &0u32.to_le_bytes(), b"GGUF")),
        ("u8", build("general.alignment", 0, &[0], b"GGUF")),
        ("i16", build("general.alignment", 3, &0i16.to_le_bytes(), b"GGUF")),
        ("NUL-padded key", build("general.alignment\0\0", T_U32, &0u32.to_le_bytes(), b"GGUF")),
        ("byte-swapped magic", build("general.alignment", T_U32, &0u32.to_le_bytes(), b"FUGG")),
    ];
    for (what, bytes) in cases {
        let p = s.path(what);
        std::fs::write(&p, bytes).unwrap();
        let e = adadim_load::gguf::Gguf::open(&p).err().unwrap_or_else(|| panic!("{what}: opened")).to_string();
        assert!(e.contains("general.alignment is 0") && e.contains(what), "{what}: {e}");
    }
    // candle ignores a negative alignment, or one of another type, and uses the default, 32:
    // the value the file states is not believed silently but refused (issue 29).
    for (what, ty, value) in [
        ("-8", T_I32, (-8i32).to_le_bytes().to_vec()),
        ("the string \"64\"", T_STRING, [&2u64.to_le_bytes()[..], b"64"].concat()),
    ] {
        let p = s.path("ignored");
        std::fs::write(&p, build("general.alignment", ty, &value, b"GGUF")).unwrap();
        let e = adadim_load::gguf::Gguf::open(&p).err().unwrap_or_else(|| panic!("{what}: opened")).to_string();
        assert!(e.contains(&format!("general.alignment is {what}")) && e.contains("power of two"), "{e}");
    }
    // 32, written as the signed type candle also takes, is a valid alignment.
    let p = s.path("i32-32");
    std::fs::write(&p, build("general.alignment", T_I32, &32i32.to_le_bytes(), b"GGUF")).unwrap();
    let mut g = adadim_load::gguf::Gguf::open(&p).unwrap();
    assert_eq!(g.tensor_f32("output_norm.weight").unwrap().0, vec![8]);
}
