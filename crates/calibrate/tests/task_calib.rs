//! The task-specific calibration sets (`--calib code`, `--calib chat`) built from what this
//! machine has: deterministic, shaped as promised, and disjoint from the evaluation set.

use adadim_calibrate::data::calibration_file;
use adadim_load::fetch::adadim_home;
use std::path::Path;
use std::process::Command;

/// A model directory whose tokenizer config carries SmolLM2's ChatML template.
fn chatml_model(dir: &Path) {
    let jinja = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({"chat_template": jinja}).to_string()).unwrap();
}

#[test]
fn code_is_the_stdlib_sorted_without_tests_and_the_same_every_time() {
    let home = tempfile::tempdir().unwrap();
    let a = calibration_file("code", home.path(), home.path()).unwrap();
    let b = calibration_file("code", home.path(), home.path()).unwrap();
    assert_eq!(a, b, "named by content: the same text, the same file");
    let text = std::fs::read_to_string(&a).unwrap();
    let files: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# file: ")).collect();
    assert!(files.len() > 100, "{} files", files.len());
    assert!(files.contains(&"os.py") && files.contains(&"json/decoder.py"), "{:?}", &files[..10]);
    let mut sorted = files.clone();
    sorted.sort_by_key(|f| std::path::PathBuf::from(f));
    assert_eq!(files, sorted);
    assert!(files.iter().all(|f| !f.split('/').any(|c| c == "test" || c == "tests" || c == "site-packages")));
    // HumanEval's problems are not in it (checked when the problems were fetched before).
    let he = adadim_home().join("data").join("HumanEval.jsonl");
    match std::fs::read_to_string(&he) {
        Ok(jsonl) => {
            for line in jsonl.lines().filter(|l| !l.is_empty()) {
                let p: serde_json::Value = serde_json::from_str(line).unwrap();
                let prompt = p["prompt"].as_str().unwrap();
                let doc = prompt.split("\"\"\"").nth(1).or_else(|| prompt.split("'''").nth(1)).unwrap_or(prompt).trim();
                assert!(!text.contains(doc), "{} docstring found in the stdlib text", p["task_id"]);
            }
        }
        Err(_) => eprintln!(
            "skipping the HumanEval disjointness check: {} not fetched yet (adadim eval humaneval fetches it)",
            he.display()
        ),
    }
}

#[test]
fn chat_is_dialogue_in_the_models_template_and_reads_as_pyyaml_does() {
    let home = adadim_home();
    let files = match adadim_calibrate::chat::corpus_files(&home) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipping: the ChatterBot corpus could not be fetched: {e}");
            return;
        }
    };
    assert_eq!(files.len(), 21, "{files:?}");
    let model = tempfile::tempdir().unwrap();
    chatml_model(model.path());
    let path = calibration_file("chat", &home, model.path()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"), "{}", &text[..200]);
    assert!(text.matches("<|im_start|>assistant\n").count() > 1000);
    assert_eq!(text.matches("<|im_start|>").count(), text.matches("<|im_end|>\n").count());
    // Without a ChatML template there is nothing honest to render.
    let plain = tempfile::tempdir().unwrap();
    let e = calibration_file("chat", &home, plain.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer_config.json") && e.contains("chat template"), "{e}");

    // Our reading of the YAML subset against PyYAML's, file by file.
    let script = "import sys, json, yaml\nd = yaml.safe_load(open(sys.argv[1], encoding='utf-8'))\nprint(json.dumps([c for c in d.get('conversations', []) if isinstance(c, list)]))";
    if !Command::new("python3").args(["-c", "import yaml"]).status().is_ok_and(|s| s.success()) {
        eprintln!("skipping the PyYAML comparison: python3 has no yaml module");
        return;
    }
    for f in &files {
        let out = Command::new("python3").args(["-c", script]).arg(f).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want: Vec<Vec<String>> = serde_json::from_slice(&out.stdout).unwrap();
        let got = adadim_calibrate::chat::parse_conversations(&std::fs::read_to_string(f).unwrap(), f).unwrap();
        assert_eq!(got.len(), want.len(), "{}", f.display());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{} conversation {i}", f.display());
        }
    }
}

#[test]
fn gsm8k_is_the_train_split_worked_and_holds_no_test_problem() {
    let data = adadim_eval::datasets::data_dir_from_env().expect("ADADIM_DATA (the tests read ../shared/data)");
    let home = tempfile::tempdir().unwrap();
    let path = calibration_file("gsm8k", home.path(), home.path()).unwrap();
    assert_eq!(path, calibration_file("gsm8k", home.path(), home.path()).unwrap());
    let text = std::fs::read_to_string(&path).unwrap();
    let train = adadim_eval::gsm8k::load(&adadim_eval::gsm8k::split_file(&data, "train")).unwrap();
    let test = adadim_eval::gsm8k::load(&adadim_eval::gsm8k::split_file(&data, "test")).unwrap();
    assert_eq!(text.matches("Question: ").count(), train.len());
    assert!(text.starts_with(&format!("Question: {}\nAnswer: ", train[0].question)));
    assert!(text.trim_end().ends_with(&format!("#### {}", train.last().unwrap().reference())));
    assert!(!text.contains("<<"), "calculator annotations are removed");
    for t in &test {
        assert!(!text.contains(&format!("Question: {}\n", t.question)), "test problem in the text: {}", t.question);
    }
}

#[test]
fn mix_alternates_shakespeare_and_the_gsm8k_text() {
    let home = tempfile::tempdir().unwrap();
    // A stand-in for the fetched plays: the named corpus is read from where it is kept.
    let plays: String = (0..300).map(|i| format!("ACT {i}. Enter a lord, then a lady.\n")).collect();
    std::fs::create_dir_all(home.path().join("data")).unwrap();
    std::fs::write(home.path().join("data/shakespeare.txt"), &plays).unwrap();
    let gsm8k = std::fs::read_to_string(calibration_file("gsm8k", home.path(), home.path()).unwrap()).unwrap();
    let path = calibration_file("mix", home.path(), home.path()).unwrap();
    assert_eq!(path, calibration_file("mix", home.path(), home.path()).unwrap(), "kept by content");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), plays.len() + gsm8k.len(), "every character of both texts, once");
    let piece = adadim_calibrate::data::MIX_PIECE;
    let (p, g): (Vec<char>, Vec<char>) = (plays.chars().collect(), gsm8k.chars().collect());
    let want: String = p[..piece].iter().chain(&g[..piece]).chain(&p[piece..2 * piece]).collect();
    assert!(text.starts_with(&want), "plays, GSM8K, plays, ... in {piece}-character pieces");
    assert!(text.ends_with(&gsm8k.chars().skip(g.len() - 100).collect::<String>()), "GSM8K's tail closes it");
}
