//! MMLU scoring against a plain reference: every prompt written out here independently, run
//! whole through the uncached forward pass, the answer the likeliest of " A".." D". The
//! library's prefix-cached, context-fitted run must choose the same answer for every question.

use adadim_eval::mmlu::{evaluate, Options, SUBJECTS};
use adadim_load::synth::{byte_tokenizer_json, tiny_config, write_random_checkpoint};
use adadim_load::Checkpoint;
use adadim_model::Model;
use std::path::Path;
use tokenizers::Tokenizer;

const HEADER: &str = "question,choice0,choice1,choice2,choice3,answer\n";

/// The tiny model's byte tokenizer plus one token each for " A".." D" (ids 256..260).
fn tokenizer_with_letters(dir: &Path) -> Tokenizer {
    let mut t = byte_tokenizer_json(tiny_config().vocab_size);
    let vocab = t["model"]["vocab"].as_object_mut().unwrap();
    vocab.retain(|_, id| !(256..260).contains(&id.as_u64().unwrap()));
    let mut merges = Vec::new();
    for (i, l) in ["A", "B", "C", "D"].iter().enumerate() {
        vocab.insert(format!("\u{120}{l}"), (256 + i).into());
        merges.push(format!("\u{120} {l}"));
    }
    t["model"]["merges"] = merges.into();
    std::fs::write(dir.join("tokenizer.json"), t.to_string()).unwrap();
    adadim_load::tokenizer::load(dir).unwrap()
}

/// Two subjects: 5 dev examples and 4 (or 3) test questions, with quoted commas and newlines.
fn write_data(dir: &Path) {
    for split in ["dev", "test"] {
        std::fs::create_dir_all(dir.join(split)).unwrap();
    }
    for (s, (subject, _)) in SUBJECTS.iter().take(2).enumerate() {
        const WORDS: [&str; 7] = ["red", "\"green, dark\"", "blue", "\"say \"\"so\"\"\"", "ochre", "teal", "jet"];
        let w = |k: usize| WORDS[k % 7];
        let row = |i: usize| {
            format!(
                "\"Q{s}.{i}: which, of these {}?\nThink.\",{},{},{},{},{}\n",
                ["cups", "hats", "maps"][i % 3],
                w(i),
                w(i * 3 + 1),
                w(i * 5 + 2),
                w(i + 4),
                i % 4
            )
        };
        std::fs::write(
            dir.join(format!("dev/{subject}_dev.csv")),
            format!("{HEADER}{}", (0..5).map(row).collect::<String>()),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("test/{subject}_test.csv")),
            format!("{HEADER}{}", (10..14 - s).map(row).collect::<String>()),
        )
        .unwrap();
    }
}

fn block(q: &adadim_eval::mmlu::Question) -> String {
    format!(
        "{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        q.question, q.choices[0], q.choices[1], q.choices[2], q.choices[3]
    )
}

/// The reference: the whole prompt through the plain forward pass, fewest shots dropped first
/// while it is longer than `ctx`.
fn reference_answer(
    model: &Model,
    tok: &Tokenizer,
    subject: &str,
    dev: &[adadim_eval::mmlu::Question],
    q: &adadim_eval::mmlu::Question,
    ctx: usize,
) -> (usize, bool) {
    let letters: Vec<u32> =
        [" A", " B", " C", " D"].iter().map(|l| tok.encode(*l, false).unwrap().get_ids()[0]).collect();
    for drop in 0..=dev.len() {
        let shots: String =
            dev[drop..].iter().map(|d| format!("{} {}\n\n", block(d), ["A", "B", "C", "D"][d.answer])).collect();
        let text = format!(
            "The following are multiple choice questions (with answers) about {}.\n\n{shots}{}",
            subject.replace('_', " "),
            block(q)
        );
        let ids = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        if ids.len() <= ctx {
            let h = model.forward_hidden(&ids).unwrap();
            let logits = model
                .logits(&h.narrow(0, ids.len() - 1, 1).unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let best =
                (0..4).fold(0, |b, i| if logits[letters[i] as usize] > logits[letters[b] as usize] { i } else { b });
            return (best, drop > 0);
        }
    }
    panic!("the test's questions fit without shots");
}

#[test]
fn cached_and_fitted_prompts_choose_what_the_full_forward_chooses() {
    let d = tempfile::tempdir().unwrap();
    let model_dir = d.path().join("model");
    write_random_checkpoint(&model_dir, &tiny_config(), 11).unwrap();
    let tok = tokenizer_with_letters(&model_dir);
    let model = Model::load(&Checkpoint::open(&model_dir).unwrap(), 1024, &mut |_, _| {}).unwrap();
    let data = d.path().join("mmlu");
    write_data(&data);
    let subjects: Vec<String> = SUBJECTS.iter().take(2).map(|s| s.0.to_string()).collect();
    // 1024 positions hold every prompt; 300 make the library drop shots (bytes are tokens here).
    for ctx in [1024, 300] {
        let opts = Options { shots: 5, limit: Some(3), max_context: ctx, subjects: subjects.clone() };
        let mut seen = Vec::new();
        let r = evaluate(&model, &tok, &data, &opts, &mut |done, total| seen.push((done, total))).unwrap();
        assert_eq!(seen.last(), Some(&(6, 6)));
        assert_eq!((r.questions, r.subjects.len()), (6, 2));
        let mut shortened = 0;
        for s in &r.subjects {
            let dev = adadim_eval::mmlu::read_csv(&data.join(format!("dev/{}_dev.csv", s.name))).unwrap();
            let test = adadim_eval::mmlu::read_csv(&data.join(format!("test/{}_test.csv", s.name))).unwrap();
            for (i, q) in test.iter().take(3).enumerate() {
                let (want, short) = reference_answer(&model, &tok, &s.name, &dev, q, ctx);
                assert_eq!(s.predictions[i], want, "ctx {ctx}, {} question {i}", s.name);
                shortened += short as usize;
            }
            assert_eq!(s.correct, s.predictions.iter().zip(&test).filter(|(p, q)| **p == q.answer).count());
        }
        assert_eq!(r.shortened, shortened, "ctx {ctx}");
        assert_eq!(r.shortened > 0, ctx == 300, "ctx {ctx}: {} shortened", r.shortened);
        assert_eq!(r.correct, r.subjects.iter().map(|s| s.correct).sum::<usize>());
        assert!((r.macro_accuracy - r.subjects.iter().map(|s| s.accuracy).sum::<f64>() / 2.0).abs() < 1e-12);
    }
}

#[test]
fn missing_subject_files_and_unknown_subjects_are_named() {
    let d = tempfile::tempdir().unwrap();
    let e = adadim_eval::mmlu::subject_files(d.path(), &[]).unwrap_err().to_string();
    assert!(e.contains("abstract_algebra_dev.csv") && e.contains("missing"), "{e}");
    let e = adadim_eval::mmlu::subject_files(d.path(), &["astrology".into()]).unwrap_err().to_string();
    assert!(e.contains("astrology") && e.contains("unknown"), "{e}");
}

#[test]
fn smollm2_cached_answers_equal_the_full_forward_on_real_questions() {
    // The real tokenizer is where a cached prefix could disagree with tokenizing the whole
    // prompt (merges across the boundary); the common-prefix reuse must hide that.
    let model_dir = adadim_load::fetch::adadim_home().join("models/smollm2");
    let Some(data) = adadim_eval::datasets::data_dir_from_env().map(|d| d.join("mmlu")).filter(|d| d.is_dir()) else {
        eprintln!("skipping: $ADADIM_DATA/mmlu not found (set ADADIM_DATA to the shared data folder)");
        return;
    };
    if !model_dir.join("config.json").exists() {
        eprintln!(
            "skipping: {} not imported yet (any adadim command with --model smollm2 does it)",
            model_dir.display()
        );
        return;
    }
    let tok = adadim_load::tokenizer::load(&model_dir).unwrap();
    let model = Model::load(adadim_model::open(&model_dir).unwrap().as_ref(), 2048, &mut |_, _| {}).unwrap();
    let subjects = vec!["high_school_geography".to_string(), "marketing".to_string()];
    let opts = Options { shots: 5, limit: Some(2), max_context: 2048, subjects: subjects.clone() };
    let r = evaluate(&model, &tok, &data, &opts, &mut |_, _| {}).unwrap();
    for s in &r.subjects {
        let dev = adadim_eval::mmlu::read_csv(&data.join(format!("dev/{}_dev.csv", s.name))).unwrap();
        let test = adadim_eval::mmlu::read_csv(&data.join(format!("test/{}_test.csv", s.name))).unwrap();
        for (i, q) in test.iter().take(2).enumerate() {
            assert_eq!(
                s.predictions[i],
                reference_answer(&model, &tok, &s.name, &dev, q, 2048).0,
                "{} question {i}",
                s.name
            );
        }
    }
    assert_eq!(r.shortened, 0);
}
