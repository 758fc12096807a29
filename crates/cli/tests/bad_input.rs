//! Every malformed input gets one clear line naming the file / tensor, exit code 1, no panic.

use adadim_load::synth::{tiny_config, write_random_checkpoint};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

fn adadim(args: &[&str]) -> (i32, String, String) {
    adadim_with_data(args, None)
}

/// As [`adadim`], with `$ADADIM_DATA` set to `data`.
fn adadim_with_data(args: &[&str], data: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_adadim"));
    cmd.args(args).env("ADADIM_HOME", std::env::temp_dir().join("adadim-test-home")).env_remove("ADADIM_DATA");
    if let Some(d) = data {
        cmd.env("ADADIM_DATA", d);
    }
    let out = cmd.output().unwrap();
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!se.contains("panicked"), "panic: {se}");
    (out.status.code().unwrap_or(-1), so, se)
}

/// Run `eval ppl` on `model` and expect failure whose message contains every `needle`.
fn expect_error(model: &Path, text: &Path, needles: &[&str]) {
    let (code, _, err) = adadim(&[
        "eval",
        "ppl",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        text.to_str().unwrap(),
        "--seqlen",
        "16",
    ]);
    assert_eq!(code, 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

fn fixture() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    write_random_checkpoint(&m, &tiny_config(), 1).unwrap();
    let text = d.path().join("text.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog. ".repeat(20)).unwrap();
    (d, m, text)
}

/// Byte range of a tensor's data inside a safetensors file.
fn data_range(file: &Path, tensor: &str) -> (usize, usize) {
    let bytes = std::fs::read(file).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let info = meta.info(tensor).unwrap();
    (8 + n + info.data_offsets.0, 8 + n + info.data_offsets.1)
}

#[test]
fn a_good_model_runs() {
    let (_d, m, text) = fixture();
    let (code, out, err) = adadim(&[
        "eval",
        "ppl",
        "--model",
        m.to_str().unwrap(),
        "--dataset",
        text.to_str().unwrap(),
        "--seqlen",
        "16",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["ppl"].as_f64().unwrap() > 1.0 && v["windows"].as_u64().unwrap() == 900 / 16);
    // Block by block from the checkpoint: the same numbers.
    let (code, out, err) = adadim(&[
        "eval",
        "ppl",
        "--model",
        m.to_str().unwrap(),
        "--dataset",
        text.to_str().unwrap(),
        "--seqlen",
        "16",
        "--json",
        "--stream",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("streaming the 2 blocks"), "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((&s["ppl"], &s["window_nll"]), (&v["ppl"], &v["window_nll"]));
}

#[test]
fn missing_model_and_dataset() {
    let (_d, m, text) = fixture();
    expect_error(Path::new("/no/such/model"), &text, &["/no/such/model", "not found"]);
    let (code, _, err) = adadim(&["eval", "ppl", "--model", m.to_str().unwrap(), "--dataset", "wikitext2"]);
    assert_eq!(code, 1);
    assert!(err.contains("ADADIM_DATA") && err.contains("wiki.test.raw"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let (_d, m, text) = fixture();
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    expect_error(&m, &text, &["model.safetensors", "corrupt or truncated safetensors"]);
    std::fs::write(&f, &bytes[..5]).unwrap();
    expect_error(&m, &text, &["model.safetensors", "corrupt or truncated safetensors"]);
}

#[test]
fn header_offsets_out_of_range() {
    let (_d, m, text) = fixture();
    let f = m.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    // Claim a header longer than the file.
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    expect_error(&m, &text, &["model.safetensors", "corrupt or truncated"]);
}

#[test]
fn config_that_disagrees_with_tensors() {
    let (_d, m, text) = fixture();
    let cfg = m.join("config.json");
    let s = std::fs::read_to_string(&cfg).unwrap().replace("\"intermediate_size\": 80", "\"intermediate_size\": 96");
    std::fs::write(&cfg, s).unwrap();
    expect_error(&m, &text, &["mlp.", "has shape", "config implies"]);
}

#[test]
fn unsupported_architecture() {
    let (_d, m, text) = fixture();
    let cfg = m.join("config.json");
    let s = std::fs::read_to_string(&cfg).unwrap().replace("LlamaForCausalLM", "FalconForCausalLM");
    std::fs::write(&cfg, s).unwrap();
    expect_error(&m, &text, &["config.json", "FalconForCausalLM", "unsupported architecture"]);
}

#[test]
fn nan_weights() {
    let (_d, m, text) = fixture();
    let f = m.join("model.safetensors");
    let name = "model.layers.1.self_attn.v_proj.weight";
    let (s, _) = data_range(&f, name);
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[s + 8..s + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&f, &bytes).unwrap();
    expect_error(&m, &text, &[name, "NaN", "index 2"]);
    // quantize finds it before the first block, not after every other block was quantized.
    let d = m.parent().unwrap();
    let out = d.join("q");
    let (code, _, err) = adadim(&[
        "quantize",
        "--model",
        m.to_str().unwrap(),
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group",
        "16",
        "--nsamples",
        "2",
        "--calib-seqlen",
        "16",
        "--calib",
        text.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(name) && err.contains("NaN"), "{err}");
    assert!(!out.exists() && !d.join(".q.partial").exists());
}

#[test]
fn wrong_dtype() {
    let (_d, m, text) = fixture();
    let f = m.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    // Relabel one F32 tensor as I32 (same size, so the file stays well-formed).
    let name = "model.norm.weight";
    let at = header.find(name).unwrap();
    let rel = header[at..].find("\"F32\"").unwrap();
    let mut out = bytes.clone();
    out[8 + at + rel..8 + at + rel + 5].copy_from_slice(b"\"I32\"");
    std::fs::write(&f, &out).unwrap();
    expect_error(&m, &text, &[name, "unsupported type", "I32"]);
}

#[test]
fn text_too_short_and_not_utf8() {
    let (d, m, _) = fixture();
    let short = d.path().join("short.txt");
    std::fs::write(&short, "tiny").unwrap();
    expect_error(&m, &short, &["fewer than one window"]);
    let bin = d.path().join("bin.txt");
    std::fs::write(&bin, b"\xff\xfe\x00abc").unwrap();
    expect_error(&m, &bin, &["bin.txt", "not UTF-8"]);
}

fn small_gguf(path: &Path, dtype_override: Option<u32>) {
    let t = Tensor::from_vec(vec![0.5f32; 64], (2, 32), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let arch = Value::String("llama".into());
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("blk.0.attn_q.weight", &q)]).unwrap();
    drop(f);
    if let Some(id) = dtype_override {
        // Patch the tensor-info dtype (after name, n_dims u32 and two u64 dims).
        let mut b = std::fs::read(path).unwrap();
        let name = b"blk.0.attn_q.weight";
        let at = b.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16;
        b[at..at + 4].copy_from_slice(&id.to_le_bytes());
        std::fs::write(path, b).unwrap();
    }
}

#[test]
fn corrupt_and_unsupported_gguf() {
    let d = tempfile::tempdir().unwrap();
    let g = d.path().join("garbage.gguf");
    std::fs::write(&g, b"this is not a gguf file at all").unwrap();
    let out = d.path().join("out");
    let (code, _, err) = adadim(&["import-gguf", g.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("garbage.gguf") && err.contains("GGUF"), "{err}");
    assert!(!out.exists());

    let odd = d.path().join("iq.gguf");
    small_gguf(&odd, Some(99)); // no GGML type has id 99
    let (code, _, err) = adadim(&["import-gguf", odd.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("iq.gguf") && err.contains("supported:"), "{err}");

    // A well-formed GGUF that lacks the llama metadata.
    let partial = d.path().join("partial.gguf");
    small_gguf(&partial, None);
    let (code, _, err) = adadim(&["import-gguf", partial.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("partial.gguf") && err.contains("llama.attention.head_count"), "{err}");
    assert!(!out.exists());
    // An i-quant (20 = IQ4_NL) now reads: the same file gets as far as the missing metadata.
    let iq = d.path().join("iq4nl.gguf");
    small_gguf(&iq, Some(20));
    let (code, _, err) = adadim(&["import-gguf", iq.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("iq4nl.gguf") && err.contains("llama.attention.head_count"), "{err}");
    assert!(!out.exists());
    // --float-min is --bpw's: alone it is an error that says what to use instead.
    let m = d.path().join("m");
    write_random_checkpoint(&m, &tiny_config(), 1).unwrap();
    let (code, _, err) =
        adadim(&["quantize", "--model", m.to_str().unwrap(), "--float-min", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("--float-min") && err.contains("--zero float"), "{err}");
    assert!(!out.exists());
}

#[test]
fn mmlu_and_humaneval_inputs() {
    let (d, m, _) = fixture();
    let model = m.to_str().unwrap();
    let one_line_error = |(code, _, err): (i32, String, String), needles: &[&str]| {
        assert_eq!(code, 1, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        for n in needles {
            assert!(err.contains(n), "expected {n:?} in: {err}");
        }
    };
    one_line_error(adadim(&["eval", "mmlu", "--model", model]), &["ADADIM_DATA"]);
    let data = d.path().join("data");
    one_line_error(
        adadim_with_data(&["eval", "mmlu", "--model", model], Some(&data)),
        &["abstract_algebra_dev.csv", "missing"],
    );
    one_line_error(
        adadim_with_data(&["eval", "mmlu", "--model", model, "--subjects", "astrology"], Some(&data)),
        &["astrology", "unknown MMLU subject"],
    );
    let header = "question,choice0,choice1,choice2,choice3,answer\n";
    for split in ["dev", "test"] {
        std::fs::create_dir_all(data.join("mmlu").join(split)).unwrap();
        std::fs::write(
            data.join(format!("mmlu/{split}/anatomy_{split}.csv")),
            format!("{header}\"Q, with a comma\",a,b,c,d,1\n").repeat(1),
        )
        .unwrap();
    }
    // The tiny model's byte tokenizer spells " A" with two tokens: no answer token to score.
    one_line_error(
        adadim_with_data(&["eval", "mmlu", "--model", model, "--subjects", "anatomy", "--shots", "1"], Some(&data)),
        &["\" A\"", "2 tokens"],
    );
    one_line_error(
        adadim_with_data(&["eval", "mmlu", "--model", model, "--subjects", "anatomy", "--shots", "5"], Some(&data)),
        &["--shots 5", "1 examples"],
    );
    std::fs::write(data.join("mmlu/test/anatomy_test.csv"), format!("{header}q,a,b,c,d,E\n")).unwrap();
    one_line_error(
        adadim_with_data(&["eval", "mmlu", "--model", model, "--subjects", "anatomy", "--shots", "1"], Some(&data)),
        &["anatomy_test.csv", "line 2", "not an index"],
    );
    one_line_error(adadim(&["eval", "humaneval", "--model", model, "--timeout", "0"]), &["--timeout 0"]);

    // GSM8K: no data, a missing split, a line that is not JSON, an answer without "####".
    one_line_error(adadim(&["eval", "gsm8k", "--model", model]), &["ADADIM_DATA"]);
    let gsm = data.join("gsm8k");
    std::fs::create_dir_all(&gsm).unwrap();
    one_line_error(adadim_with_data(&["eval", "gsm8k", "--model", model], Some(&data)), &["test.jsonl"]);
    let row = |q: &str, a: &str| serde_json::json!({"question": q, "answer": a}).to_string();
    let train: Vec<String> = (0..8)
        .map(|i| row(&format!("Train {i}?"), &format!("{i} + 1 = <<{i}+1={}>>{}\n#### {}", i + 1, i + 1, i + 1)))
        .collect();
    std::fs::write(gsm.join("train.jsonl"), train.join("\n")).unwrap();
    std::fs::write(gsm.join("test.jsonl"), format!("{}\n{{\"question\": 1\n", row("A?", "#### 2"))).unwrap();
    one_line_error(adadim_with_data(&["eval", "gsm8k", "--model", model], Some(&data)), &["test.jsonl", "line 2"]);
    std::fs::write(gsm.join("test.jsonl"), format!("{}\n{}\n", row("A?", "#### 2"), row("B?", "3"))).unwrap();
    one_line_error(
        adadim_with_data(&["eval", "gsm8k", "--model", model], Some(&data)),
        &["test.jsonl", "line 2", "####"],
    );
    // A shot that is a test problem is refused; --shots above the listed eight too.
    std::fs::write(gsm.join("test.jsonl"), format!("{}\n{}\n", row("A?", "#### 2"), row("Train 5?", "#### 6")))
        .unwrap();
    one_line_error(
        adadim_with_data(&["eval", "gsm8k", "--model", model], Some(&data)),
        &["train line 6", "test problem"],
    );
    one_line_error(adadim_with_data(&["eval", "gsm8k", "--model", model, "--shots", "9"], Some(&data)), &["--shots 9"]);
    // A well-formed set runs end to end on the tiny model (shared-prefix cache included) and
    // the reference solutions score 100%.
    std::fs::write(
        gsm.join("test.jsonl"),
        format!("{}\n{}\n", row("A?", "1 + 1 = 2\n#### 2"), row("B?", "#### 1,000")),
    )
    .unwrap();
    let (code, out, err) = adadim_with_data(
        &["eval", "gsm8k", "--model", model, "--shots", "1", "--max-tokens", "3", "--json"],
        Some(&data),
    );
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((r["problems"].as_u64(), r["shots"].as_u64()), (Some(2), Some(1)), "{r}");
    assert_eq!(r["results"][1]["reference"], "1000");
    assert!(r["results"][0]["generated_tokens"].as_u64().unwrap() <= 3, "{r}");
    let (code, out, err) = adadim_with_data(&["eval", "gsm8k", "--canonical", "--json"], Some(&data));
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((r["correct"].as_u64(), r["accuracy"].as_f64()), (Some(2), Some(1.0)), "{r}");
}

/// Issue 29's data loss: a link planted at `.NAME.partial` used to be followed and the directory
/// it points to emptied. Now the run is refused, names the link, and the victim keeps its files.
#[test]
fn a_link_planted_at_the_work_directory_deletes_nothing() {
    let (d, m, text) = fixture();
    let victim = d.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("thesis.txt"), "years of work").unwrap();
    std::os::unix::fs::symlink(&victim, d.path().join(".o.partial")).unwrap();
    let out = d.path().join("o");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ms, ts, o) = (s(&m), s(&text), s(&out));
    for extra in [&[][..], &["--restart"][..]] {
        let mut args = vec![
            "quantize",
            "--model",
            &ms,
            "--method",
            "rtn",
            "--dim",
            "ada",
            "--bits",
            "3",
            "--group",
            "16",
            "--nsamples",
            "2",
            "--calib-seqlen",
            "16",
            "--calib",
            &ts,
        ];
        args.extend_from_slice(&["--out", &o]);
        args.extend_from_slice(extra);
        let (code, _, err) = adadim(&args);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(".o.partial")
                && err.contains("symbolic link")
                && err.contains("removes nothing it did not write"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(victim.join("thesis.txt")).unwrap(), "years of work");
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 1, "nothing written into the link's target");
        assert!(!out.exists());
    }
    // A plain directory of someone else's files at that name is refused the same way.
    std::fs::remove_file(d.path().join(".o.partial")).unwrap();
    std::fs::create_dir(d.path().join(".o.partial")).unwrap();
    std::fs::write(d.path().join(".o.partial/notes.txt"), "mine").unwrap();
    let (code, _, err) = adadim(&[
        "quantize",
        "--model",
        &s(&m),
        "--method",
        "rtn",
        "--bits",
        "3",
        "--group",
        "16",
        "--nsamples",
        "2",
        "--calib-seqlen",
        "16",
        "--calib",
        &s(&text),
        "--out",
        &s(&out),
        "--restart",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("notes.txt") && err.contains("did not write"), "{err}");
    assert!(d.path().join(".o.partial/notes.txt").exists());
}

/// An `--out` whose name is near the 255-byte limit still works: the hidden work directory's
/// name is shortened, not rejected by the filesystem.
#[test]
fn a_long_output_name_works() {
    let (d, m, text) = fixture();
    let out = d.path().join("q".repeat(250));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, _, err) = adadim(&[
        "quantize",
        "--model",
        &s(&m),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group",
        "16",
        "--nsamples",
        "2",
        "--calib-seqlen",
        "16",
        "--calib",
        &s(&text),
        "--out",
        &s(&out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("model.safetensors").exists());
}

/// Quantize the fixture model (RTN w4g16, packed) into `dir/q`.
fn packed_fixture(d: &Path, m: &Path, text: &Path) -> PathBuf {
    let q = d.join("q");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, _, err) = adadim(&[
        "quantize",
        "--model",
        &s(m),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group",
        "16",
        "--nsamples",
        "2",
        "--calib-seqlen",
        "16",
        "--calib",
        &s(text),
        "--out",
        &s(&q),
    ]);
    assert_eq!(code, 0, "{err}");
    q
}

/// A config edited to fewer layers than the checkpoint holds is refused, dense or packed,
/// instead of running a truncated model.
#[test]
fn a_config_with_fewer_layers_than_the_checkpoint_is_refused() {
    let (d, m, text) = fixture();
    let q = packed_fixture(d.path(), &m, &text);
    for dir in [&m, &q] {
        let cfg = dir.join("config.json");
        let s = std::fs::read_to_string(&cfg).unwrap();
        assert!(s.contains("\"num_hidden_layers\": 2"), "{s}");
        std::fs::write(&cfg, s.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1")).unwrap();
        expect_error(dir, &text, &["model.safetensors", "model.layers.1.", "not used", "num_hidden_layers"]);
    }
}

/// A packed file whose metadata was edited to another valid value (format version 2 -> 1,
/// which would re-lay 3-bit rows) is refused.
#[test]
fn an_edited_packed_format_version_is_refused() {
    let (d, m, text) = fixture();
    let q = packed_fixture(d.path(), &m, &text);
    let f = q.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let needle = b"\"adadim.format_version\":\"2\"";
    let at = bytes.windows(needle.len()).position(|w| w == needle).expect("version in the header");
    let mut edited = bytes.clone();
    edited[at + needle.len() - 2] = b'1';
    std::fs::write(&f, &edited).unwrap();
    expect_error(&q, &text, &["model.safetensors", "metadata was changed"]);
}

/// A tokenizer_config.json present but broken is an error, not a silently dropped chat template.
#[test]
fn a_broken_tokenizer_config_is_reported() {
    let (_d, m, _text) = fixture();
    std::fs::write(m.join("tokenizer_config.json"), "{\"chat_template\": \"{% for").unwrap();
    let (code, _, err) = adadim(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hi", "--max-tokens", "2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tokenizer_config.json") && err.contains("not valid JSON"), "{err}");
    std::fs::write(m.join("tokenizer_config.json"), "{\"chat_template\": 7}").unwrap();
    let (code, _, err) = adadim(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hi", "--max-tokens", "2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("'chat_template' is not a string"), "{err}");
}

/// JSON inputs have a size cap: a config.json or tokenizer.json that is a link to /dev/zero is
/// an error naming it, not a read until memory runs out.
#[test]
fn json_inputs_that_never_end_are_refused() {
    let (_d, m, text) = fixture();
    for f in ["tokenizer.json", "config.json"] {
        let p = m.join(f);
        let keep = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let (code, _, err) = adadim(&[
            "eval",
            "ppl",
            "--model",
            m.to_str().unwrap(),
            "--dataset",
            text.to_str().unwrap(),
            "--seqlen",
            "16",
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(f) && err.contains("more than"), "{err}");
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, keep).unwrap();
    }
}

/// Sizes from flags are checked before anything is allocated, against the model's context and
/// this machine's memory, with an error naming the flag.
#[test]
fn sizes_from_flags_are_checked_up_front() {
    let (d, m, text) = fixture();
    let (ms, ts) = (m.to_str().unwrap(), text.to_str().unwrap());
    let out = d.path().join("q");
    let (code, _, err) = adadim(&[
        "quantize",
        "--model",
        ms,
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group",
        "16",
        "--nsamples",
        "100000000",
        "--calib-seqlen",
        "512",
        "--calib",
        ts,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--nsamples 100000000") && err.contains("needs about"), "{err}");
    assert!(
        !out.exists()
            && std::fs::read_dir(d.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial"))
    );
    let (code, _, err) = adadim(&["eval", "ppl", "--model", ms, "--dataset", ts, "--seqlen", "1000000000"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--seqlen 1000000000") && err.contains("needs about"), "{err}");
    let (code, _, err) = adadim(&["generate", "--model", ms, "--prompt", "hi", "--max-tokens", "1000000000"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--max-tokens 1000000000") && err.contains("needs about"), "{err}");
    // With a trained context in config.json, that is the limit.
    let cfg = m.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["max_position_embeddings"] = 64.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let (code, _, err) = adadim(&["generate", "--model", ms, "--prompt", "hi", "--max-tokens", "100"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--max-tokens 100") && err.contains("trained context of 64"), "{err}");
}

// ---- issue 29: layout, names and messages ------------------------------------------------

/// Run a command that must fail: exit 1, one line naming every needle, no panic (checked by
/// [`adadim`]), and no raw control character on the terminal.
fn fails_with(args: &[&str], data: Option<&Path>, needles: &[&str]) -> String {
    let (code, _, err) = adadim_with_data(args, data);
    assert_eq!(code, 1, "{args:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.trim_end().chars().any(|c| c.is_control()), "raw control character: {err:?}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in: {err}");
    }
    err
}

/// Two Q8_0 tensors (`blk.0.attn_q.weight` at data offset 0, `blk.0.attn_k.weight` at 96)
/// with `meta`; `patch(bytes, offset_field_of)` edits the written file.
fn two_tensor_gguf(path: &Path, meta: &[(&str, &Value)], patch: impl FnOnce(&mut Vec<u8>, &dyn Fn(&[u8]) -> usize)) {
    let t = Tensor::from_vec(vec![0.5f32; 64], (2, 32), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, meta, &[("blk.0.attn_q.weight", &q), ("blk.0.attn_k.weight", &q)]).unwrap();
    drop(f);
    let mut b = std::fs::read(path).unwrap();
    // A tensor info: name, n_dims (u32), two u64 dimensions, type (u32), then the offset (u64).
    let offset_field = |name: &[u8]| b.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 16 + 4;
    let fields: Vec<usize> =
        [&b"blk.0.attn_q.weight"[..], b"blk.0.attn_k.weight"].iter().map(|n| offset_field(n)).collect();
    let lookup = move |name: &[u8]| if name == b"blk.0.attn_q.weight" { fields[0] } else { fields[1] };
    patch(&mut b, &lookup);
    std::fs::write(path, b).unwrap();
}

#[test]
fn gguf_layout_and_metadata_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let llama = Value::String("llama".into());
    let arch = [("general.architecture", &llama)];
    let k = b"blk.0.attn_k.weight";
    let set_k_offset = |v: u64| {
        move |b: &mut Vec<u8>, at: &dyn Fn(&[u8]) -> usize| b[at(k)..at(k) + 8].copy_from_slice(&v.to_le_bytes())
    };
    let import = |file: &Path, needles: &[&str]| {
        fails_with(&["import-gguf", file.to_str().unwrap(), "--out", out.to_str().unwrap()], None, needles);
        assert!(!out.exists());
    };

    let g = d.path().join("misaligned.gguf");
    two_tensor_gguf(&g, &arch, set_k_offset(96 + 8));
    import(
        &g,
        &["misaligned.gguf", "blk.0.attn_k.weight", "data offset 104 is not a multiple of the file's alignment 32"],
    );

    let g = d.path().join("past-end.gguf");
    two_tensor_gguf(&g, &arch, set_k_offset(1 << 20));
    import(&g, &["past-end.gguf", "blk.0.attn_k.weight", "truncated?"]);

    let g = d.path().join("overlap.gguf");
    two_tensor_gguf(&g, &arch, set_k_offset(32));
    import(&g, &["overlap.gguf", "tensor 'blk.0.attn_k.weight'", "overlap tensor 'blk.0.attn_q.weight'"]);

    let g = d.path().join("twice.gguf");
    two_tensor_gguf(&g, &arch, |b, at| {
        let name_end = at(k) - 4 - 16 - 4;
        b[name_end - 8] = b'q'; // blk.0.attn_k.weight -> blk.0.attn_q.weight
    });
    import(&g, &["twice.gguf", "blk.0.attn_q.weight", "appears more than once"]);

    for (what, v) in [("48", Value::U32(48)), ("the string \"32\"", Value::String("32".into()))] {
        let g = d.path().join("align.gguf");
        two_tensor_gguf(&g, &[("general.architecture", &llama), ("general.alignment", &v)], |_, _| {});
        import(&g, &["align.gguf", &format!("general.alignment is {what}"), "power of two"]);
    }

    let g = d.path().join("no-arch.gguf");
    two_tensor_gguf(&g, &[], |_, _| {});
    let err = fails_with(
        &["import-gguf", g.to_str().unwrap(), "--out", out.to_str().unwrap()],
        None,
        &["no-arch.gguf", "metadata key 'general.architecture' is missing"],
    );
    assert!(!err.contains("unsupported architecture"), "{err}");

    // A name read from the file cannot drive the terminal.
    let g = d.path().join("evil.gguf");
    let evil = Value::String("llama\u{1b}[2J\u{202e}".into());
    two_tensor_gguf(&g, &[("general.architecture", &evil)], |_, _| {});
    import(&g, &["unsupported architecture \"llama\\u{1b}[2J\\u{202e}\""]);
}

#[test]
fn limit_zero_is_refused_by_name() {
    let (_d, m, text) = fixture();
    let model = m.to_str().unwrap();
    let needles = ["--limit 0", "nothing would be evaluated"];
    let err = fails_with(
        &["eval", "ppl", "--model", model, "--dataset", text.to_str().unwrap(), "--seqlen", "16", "--limit", "0"],
        None,
        &needles,
    );
    assert!(!err.contains("fewer than one window"), "{err}");
    fails_with(&["eval", "mmlu", "--model", model, "--limit", "0"], None, &needles);
    fails_with(&["eval", "humaneval", "--model", model, "--limit", "0"], None, &needles);
}

#[test]
fn a_directory_where_a_file_belongs_is_called_one() {
    for file in ["model.safetensors", "config.json"] {
        let (_d, m, text) = fixture();
        std::fs::remove_file(m.join(file)).unwrap();
        std::fs::create_dir(m.join(file)).unwrap();
        let err = fails_with(
            &["eval", "ppl", "--model", m.to_str().unwrap(), "--dataset", text.to_str().unwrap(), "--seqlen", "16"],
            None,
            &[file, "is a directory, expected a file"],
        );
        assert!(!err.contains("No such device"), "{err}");
    }
}

#[test]
fn a_dataset_that_is_not_a_file_says_what_it_is() {
    let (d, m, _) = fixture();
    let (a, b) = (d.path().join("loop-a"), d.path().join("loop-b"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    let model = m.to_str().unwrap();
    for (dataset, what) in [
        (a.to_str().unwrap(), "is a symbolic link that cannot be followed"),
        ("/dev/null", "is a character device, expected a file"),
        (d.path().to_str().unwrap(), "is a directory, expected a file"),
    ] {
        let err = fails_with(
            &["eval", "ppl", "--model", model, "--dataset", dataset, "--seqlen", "16"],
            None,
            &[dataset, what],
        );
        assert!(!err.contains("not found"), "{err}");
    }
    // A named dataset whose file is a directory.
    std::fs::create_dir_all(d.path().join("ptb/ptb.test.txt")).unwrap();
    fails_with(
        &["eval", "ppl", "--model", model, "--dataset", "ptb", "--seqlen", "16"],
        Some(d.path()),
        &["ptb.test.txt", "is a directory"],
    );
}

/// Every cause once: an OS error used to follow its own message a second time.
#[test]
fn an_os_error_is_printed_once() {
    let d = tempfile::tempdir().unwrap();
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/fuzz_gguf/seed-v3-tiny-llama");
    let blocker = d.path().join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let out = blocker.join("model");
    let err = fails_with(
        &["import-gguf", seed.to_str().unwrap(), "--out", out.to_str().unwrap()],
        None,
        &["a-file", "os error"],
    );
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

/// Names read from a checkpoint reach the terminal escaped.
#[test]
fn names_from_files_are_escaped() {
    let (_d, m, text) = fixture();
    let cfg = m.join("config.json");
    let s = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("LlamaForCausalLM", "Evil\\u001b]0;owned\\u0007\\u009b2JForCausalLM");
    std::fs::write(&cfg, s).unwrap();
    expect_error(&m, &text, &["unsupported architecture", "Evil\\u{1b}]0;owned\\u{7}\\u{9b}2J"]);
}

/// A name longer than leaves room for `.NAME.partial-PID-N` within NAME_MAX (255) still
/// imports and synthesizes: the temporary names are shortened.
#[test]
fn long_output_names_fit_the_filesystem() {
    let d = tempfile::tempdir().unwrap();
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/fuzz_gguf/seed-v3-tiny-llama");
    let out = d.path().join("m".repeat(250));
    let (code, _, err) = adadim(&["import-gguf", seed.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("config.json").is_file());
    let out = d.path().join("s".repeat(250));
    let (code, _, err) = adadim(&["synth", "--shape", "tiny", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("config.json").is_file());
}

/// `bench llamacpp` names what it lacks: the source GGUF, a points file that is not one, a
/// plot without our points; nothing is made before the inputs are checked.
#[test]
fn bench_llamacpp_names_what_it_lacks() {
    let d = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let text = d.path().join("text.txt");
    std::fs::write(&text, "some text to evaluate on\n").unwrap();
    let out = d.path().join("llama");
    let base = ["bench", "llamacpp", "--llamacpp", "/nonexistent-llama-bin"];
    let (missing, bad) = (d.path().join("missing.gguf"), d.path().join("ours.json"));
    std::fs::write(&bad, "{\"points\": 3}").unwrap();
    let run = |extra: &[String]| {
        let mut args: Vec<String> = base.iter().map(|a| a.to_string()).collect();
        args.extend(["--datasets".into(), s(&text), "--out".into(), s(&out)]);
        args.extend(extra.iter().cloned());
        adadim(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (code, _, err) = run(&["--gguf".into(), s(&missing)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing.gguf") && err.contains("source GGUF not found"), "{err}");
    let (code, _, err) = run(&["--gguf".into(), s(&missing), "--ours".into(), s(&bad)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("ours.json") && err.contains("not a frontier JSON"), "{err}");
    let (code, _, err) = run(&["--svg".into(), s(&d.path().join("f.svg"))]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--ours"), "{err}");
    assert!(!out.exists(), "{} made before the inputs were checked", out.display());
}

#[test]
fn calibration_sets_built_from_gsm8k_need_adadim_data() {
    // Said before anything is fetched or written.
    for set in ["gsm8k", "mix"] {
        let (d, m, _) = fixture();
        let out = d.path().join("q");
        let (ms, o) = (m.to_str().unwrap(), out.to_str().unwrap());
        let (code, _, err) = adadim(&["quantize", "--model", ms, "--bits", "4", "--calib", set, "--out", o]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(&format!("--calib {set}")) && err.contains("ADADIM_DATA"), "{err}");
        assert!(!out.exists() && !d.path().join(".q.partial").exists(), "{set}: output left behind");
    }
}
