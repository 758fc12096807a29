//! Fuzz smoke for CI: the committed corpus of the cargo-fuzz targets `fuzz_tokenizer_config`
//! and `fuzz_resume` (fuzz/corpus/), each file as committed and in seeded mutations, through the
//! same entry points the targets call (fuzz/src/calibrate_targets.rs).
//! No input may panic. They live here, not with adadim-load's replay, because their bodies need
//! adadim-run (the chat template) and adadim-calibrate (the work directory). The ignored
//! `write_seed_corpus` regenerates the seed files; fuzz/README.md has the rest.
#![allow(clippy::result_large_err)] // interrupted runs' results travel through catch_unwind once

#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/calibrate_targets.rs"]
mod targets;

use adadim_calibrate::{quantize_model_resumable, Dim, Method, Output, QuantizeConfig, Select, WorkDir};
use adadim_load::synth::{write_random_checkpoint, Rng};
use adadim_load::{Checkpoint, LlamaConfig};
use adadim_quantize::{Axis, GptqOptions, QuantSpec, Zero};
use std::path::Path;

/// Seeded mutations per corpus file (the whole test stays within a few seconds).
const MUTATIONS: usize = 1000;

#[test]
fn tokenizer_config_corpus_never_panics() {
    let s = targets::TokenizerScratch::new();
    replay::replay("fuzz_tokenizer_config", MUTATIONS, |d| targets::tokenizer_config(&s, d));
}

#[test]
fn resume_corpus_never_panics() {
    let s = targets::ResumeScratch::new();
    replay::replay("fuzz_resume", MUTATIONS, |d| targets::resume(&s, d));
}

/// The seeds must reach past the first checks, or the fuzzers start from nothing.
#[test]
fn seeds_are_valid_files() {
    let s = targets::TokenizerScratch::new();
    for (name, chatml) in [
        ("seed-smollm2.json", true),
        ("seed-qwen2.json", true),
        ("seed-llama3.json", false),
        ("seed-eos-object.json", false),
        ("seed-from-gguf.json", true),
    ] {
        std::fs::copy(replay::corpus_dir("fuzz_tokenizer_config").join(name), s.path().join("tokenizer_config.json"))
            .unwrap();
        let v = adadim_load::tokenizer::config(s.path()).unwrap_or_else(|e| panic!("{name}: {e}")).expect("present");
        assert_eq!(
            v["chat_template"].as_str().and_then(adadim_run::ChatTemplate::from_jinja).is_some(),
            chatml,
            "{name}"
        );
    }
    let s = targets::ResumeScratch::new();
    for (name, linears) in [("seed-block-gptq-ada", 7), ("seed-block-gptq-act-order", 7), ("seed-block-rtn-ic-2bit", 7)]
    {
        let data = std::fs::read(replay::corpus_dir("fuzz_resume").join(name)).unwrap();
        targets::resume(&s, &data);
        let w = WorkDir::open(&s.work(), serde_json::from_str(targets::JOB).unwrap(), false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (got, reports) = w.fuzz_load_block(0).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((got.len(), reports.len()), (linears, linears), "{name}");
    }
    let data = std::fs::read(replay::corpus_dir("fuzz_resume").join("seed-manifest-fresh")).unwrap();
    targets::resume(&s, &data);
    assert_eq!(WorkDir::open(&s.work(), serde_json::from_str(targets::JOB).unwrap(), false).unwrap().done(), 0);
    // After one block: the manifest is read and the job matches, the block it records is missing.
    let data = std::fs::read(replay::corpus_dir("fuzz_resume").join("seed-manifest-after-block")).unwrap();
    targets::resume(&s, &data);
    let e = WorkDir::open(&s.work(), serde_json::from_str(targets::JOB).unwrap(), false)
        .err()
        .expect("the block is missing")
        .to_string();
    assert!(e.contains("block-00000.safetensors"), "{e}");
}

/// The block reader's two bugs (found by reading `load_block`, reproduced by these inputs):
/// 0 bits made every row 0 bytes, so an empty codes tensor passed and unpacking indexed an
/// empty row; a shape whose byte count wraps (2^63 rows x 2 bytes = 0) passed the same way.
/// Both were panics; each is now an error naming the block file and the linear.
#[test]
fn bad_block_specs_and_shapes_are_errors() {
    let s = targets::ResumeScratch::new();
    for (name, what) in [("crash-block-zero-bits", "q.spec"), ("crash-block-shape-overflow", "q.codes")] {
        targets::resume(&s, &std::fs::read(replay::corpus_dir("fuzz_resume").join(name)).unwrap());
        let w = WorkDir::open(&s.work(), serde_json::from_str(targets::JOB).unwrap(), false).unwrap();
        let e = w.fuzz_load_block(0).expect_err(name).to_string();
        assert!(e.contains("block-00000.safetensors") && e.contains(what), "{name}: {e}");
    }
}

// ---- seed corpus --------------------------------------------------------------------------

/// Regenerate the seed files (`seed-*`) of the two corpora. Deterministic: rerunning it
/// rewrites the same bytes (the clocks a run records are replaced by fixed values). Crash
/// reproducers (`crash-*`) are kept by hand.
#[test]
#[ignore = "writes fuzz/corpus; run by hand: cargo test --release -p adadim-calibrate --test fuzz_corpus -- --ignored"]
fn write_seed_corpus() {
    write_tokenizer_config_seeds();
    write_resume_seeds();
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = replay::corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn write_tokenizer_config_seeds() {
    use serde_json::json;
    let chatml = |system: &str| {
        format!(
            "{{% for message in messages %}}{{% if loop.first and messages[0]['role'] != 'system' %}}{{{{ '<|im_start|>system\n{system}<|im_end|>\n' }}}}{{% endif %}}\
             {{{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}}}{{% endfor %}}\
             {{% if add_generation_prompt %}}{{{{ '<|im_start|>assistant\n' }}}}{{% endif %}}"
        )
    };
    let added = |id: u32, content: &str| json!({ id.to_string(): {"content": content, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true} });
    let seeds = [
        (
            "seed-smollm2.json",
            json!({"add_prefix_space": false, "added_tokens_decoder": added(1, "<|im_start|>"), "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                   "bos_token": "<|im_start|>", "chat_template": chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
                   "clean_up_tokenization_spaces": false, "eos_token": "<|im_end|>", "model_max_length": 8192, "pad_token": "<|im_end|>",
                   "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", "vocab_size": 49152}),
        ),
        (
            "seed-qwen2.json",
            json!({"add_prefix_space": false, "added_tokens_decoder": added(151644, "<|im_start|>"), "bos_token": null,
                   "chat_template": chatml("You are a helpful assistant."), "eos_token": "<|im_end|>", "errors": "replace",
                   "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": false, "tokenizer_class": "Qwen2Tokenizer", "unk_token": null}),
        ),
        (
            "seed-llama3.json",
            json!({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "model_max_length": 131072,
                   "chat_template": "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"}),
        ),
        (
            "seed-eos-object.json",
            json!({"add_bos_token": true, "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
                   "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
                   "chat_template": null, "legacy": false, "model_max_length": 1e30, "tokenizer_class": "LlamaTokenizer"}),
        ),
        // What `tokenizer::from_gguf` writes for an imported GGUF.
        (
            "seed-from-gguf.json",
            json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false, "chat_template": chatml("You are a helpful assistant")}),
        ),
        (
            "seed-template-list.json",
            json!({"chat_template": [{"name": "default", "template": chatml("")}, {"name": "tool_use", "template": "{{ tools }}"}], "eos_token": "<|im_end|>"}),
        ),
        ("seed-not-an-object.json", json!(["chat_template", "<|im_start|>", "<|im_end|>"])),
    ];
    for (name, v) in seeds {
        put("fuzz_tokenizer_config", name, serde_json::to_string_pretty(&v).unwrap().as_bytes());
    }
    put(
        "fuzz_tokenizer_config",
        "seed-truncated.json",
        br#"{"bos_token": "<|im_start|>", "chat_template": "{% for message in messages %}<|im_st"#,
    );
}

/// The tiny model the resume seeds come from (a few KB a block).
fn seed_model_config() -> LlamaConfig {
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "vocab_size": 40, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    LlamaConfig::from_json(Path::new("seed"), &json.to_string()).unwrap()
}

/// A block file with its header rewritten: the clocks in the reports fixed (so the seed is the
/// same bytes each time) and the padding the streaming writer reserves dropped.
fn fixed_block(bytes: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let meta = &mut header["__metadata__"];
    let mut reports: serde_json::Value = serde_json::from_str(meta["reports"].as_str().unwrap()).unwrap();
    for r in reports.as_array_mut().unwrap() {
        for k in ["seconds", "cholesky_s", "sweep_s"] {
            if r[k].is_number() {
                r[k] = 0.125.into();
            }
        }
    }
    meta["reports"] = reports.to_string().into();
    let mut text = header.to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

fn write_resume_seeds() {
    let s = targets::ResumeScratch::new();
    let job: serde_json::Value = serde_json::from_str(targets::JOB).unwrap();
    let d = tempfile::tempdir().unwrap();
    let c = seed_model_config();
    write_random_checkpoint(&d.path().join("m"), &c, 29).unwrap();
    let ck = Checkpoint::open(&d.path().join("m")).unwrap();
    let mut rng = Rng::new(29);
    let samples: Vec<Vec<u32>> = (0..3).map(|_| (0..8).map(|_| (rng.next_u64() % 40) as u32).collect()).collect();
    let spec = |bits, group, zero| QuantSpec { bits, group, axis: Axis::Oc, zero };
    let cases = [
        ("seed-block-gptq-ada", Method::Gptq, Dim::Ada, false, spec(3, Some(4), Zero::Awq)),
        ("seed-block-gptq-act-order", Method::Gptq, Dim::Oc, true, spec(4, Some(8), Zero::Sym)),
        ("seed-block-rtn-ic-2bit", Method::Rtn, Dim::Ic, false, spec(2, None, Zero::Gptq)),
    ];
    for (i, (name, method, dim, act_order, spec)) in cases.into_iter().enumerate() {
        let cfg = QuantizeConfig {
            method,
            dim,
            select: Select::Rtn,
            spec,
            search: adadim_quantize::ScaleSearch::MinMax,
            gptq: GptqOptions::default(),
            act_order,
            static_groups: false,
            group_aware: false,
            awq: false,
            refit: false,
            descend: 0,
            qep: None,
            ada_error: adadim_calibrate::AdaError::Linear,
            ic_modules: vec![],
            act_cache_bytes: adadim_calibrate::ACT_CACHE_BYTES,
            budget: None,
            layouts: Default::default(),
        };
        let work = d.path().join(format!("w{i}"));
        let mut w = WorkDir::open(&work, job.clone(), false).unwrap();
        let out = Output {
            path: &d.path().join(format!("out{i}")),
            format: adadim_calibrate::Format::Packed,
            metadata: serde_json::json!({}),
        };
        // Stopped after the first block, as an interrupted run is.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            quantize_model_resumable(&ck, &samples, &cfg, &out, &mut w, &mut |done, _| {
                assert!(done < 1, "interrupted after block {done}")
            })
        }));
        assert!(r.is_err());
        let block = fixed_block(&std::fs::read(work.join(targets::BLOCK)).unwrap());
        put("fuzz_resume", name, &[[1u8].as_slice(), &block].concat());
        if i == 0 {
            // The manifest after that block, its clocks fixed (and the block's checksum with them).
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(work.join("resume.json")).unwrap()).unwrap();
            assert_eq!(m["done"], 1);
            m["files"][targets::BLOCK] = adadim_load::fetch::sha256_hex(&block).into();
            for (k, v) in m["timings"].as_object_mut().unwrap() {
                if k.ends_with("_s") {
                    *v = 0.25.into();
                }
            }
            m["elapsed_s"] = 1.5.into();
            put(
                "fuzz_resume",
                "seed-manifest-after-block",
                &[b"\0".as_slice(), &serde_json::to_vec_pretty(&m).unwrap()].concat(),
            );
        }
    }
    // A fresh start's manifest, as the target's scratch read it from a real work directory.
    let fresh = s.manifest_after_block("0");
    let mut m: serde_json::Value = serde_json::from_slice(&fresh).unwrap();
    m["done"] = 0.into();
    m["files"] = serde_json::json!({});
    put("fuzz_resume", "seed-manifest-fresh", &[b"\0".as_slice(), &serde_json::to_vec_pretty(&m).unwrap()].concat());
}
