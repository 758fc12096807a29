//! GSM8K on the real data ($ADADIM_DATA/gsm8k): the reference solutions score 100% through the
//! same extraction a model's completions go through, and no listed shot is a test problem.

use adadim_eval::gsm8k::{self, Completer};

fn data() -> std::path::PathBuf {
    adadim_eval::datasets::data_dir_from_env().expect("ADADIM_DATA (the tests read ../shared/data)")
}

#[test]
fn the_reference_solutions_score_every_problem() {
    let test = gsm8k::load(&gsm8k::split_file(&data(), "test")).unwrap();
    assert_eq!(test.len(), 1319);
    let r = gsm8k::evaluate(&test, &Completer::Canonical, &mut |_, _, _| {}).unwrap();
    let wrong: Vec<_> =
        r.results.iter().filter(|p| !p.correct).map(|p| (p.index, p.extracted.clone(), p.reference.clone())).collect();
    assert!(wrong.is_empty(), "{} wrong: {:?}", wrong.len(), &wrong[..wrong.len().min(5)]);
    assert_eq!((r.correct, r.accuracy, r.stderr), (1319, 1.0, 0.0));
}

#[test]
fn the_shots_are_train_problems_none_of_them_in_the_test_split() {
    let train = gsm8k::load(&gsm8k::split_file(&data(), "train")).unwrap();
    let test = gsm8k::load(&gsm8k::split_file(&data(), "test")).unwrap();
    assert_eq!(train.len(), 7473);
    let shots = gsm8k::shots(&train, &test, 8).unwrap();
    for s in &shots {
        assert!(test.iter().all(|t| t.question != s.question && t.answer != s.answer));
        assert!(!s.worked().contains("<<"));
    }
    // Each shot shows its own worked solution, and its answer scores as its reference.
    for s in &shots {
        assert_eq!(gsm8k::extract(&format!(" {}", s.worked())), Some(s.reference()));
    }
}
