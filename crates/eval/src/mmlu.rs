//! MMLU (Hendrycks et al. 2021), k-shot multiple choice, scored as hendrycks/test and
//! lm-eval-harness do: the prediction is the argmax of the next-token logits over the tokens
//! `" A"`, `" B"`, `" C"`, `" D"` after a prompt ending in `"Answer:"`.
//!
//! ```text
//! The following are multiple choice questions (with answers) about {subject}.\n\n   header
//! {dev question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: {letter}\n\n                   x shots
//! {test question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer:                                   scored
//! ```
//!
//! Data: `$ADADIM_DATA/mmlu/{dev,test}/<subject>_{dev,test}.csv`, header
//! `question,choice0,choice1,choice2,choice3,answer`, answer an index 0-3. The header and shots
//! are the same for every question of a subject: their keys and values are computed once
//! ([`KvCache`]) and every question only runs its own tokens.

use crate::error::{EvalError, Result};
use adadim_model::{KvCache, Model};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// The 57 subjects and their category, as hendrycks/test `categories.py` maps them
/// (subject -> subcategory -> one of four categories).
pub const SUBJECTS: [(&str, &str); 57] = [
    ("abstract_algebra", STEM),
    ("anatomy", OTHER),
    ("astronomy", STEM),
    ("business_ethics", OTHER),
    ("clinical_knowledge", OTHER),
    ("college_biology", STEM),
    ("college_chemistry", STEM),
    ("college_computer_science", STEM),
    ("college_mathematics", STEM),
    ("college_medicine", OTHER),
    ("college_physics", STEM),
    ("computer_security", STEM),
    ("conceptual_physics", STEM),
    ("econometrics", SOCIAL),
    ("electrical_engineering", STEM),
    ("elementary_mathematics", STEM),
    ("formal_logic", HUMANITIES),
    ("global_facts", OTHER),
    ("high_school_biology", STEM),
    ("high_school_chemistry", STEM),
    ("high_school_computer_science", STEM),
    ("high_school_european_history", HUMANITIES),
    ("high_school_geography", SOCIAL),
    ("high_school_government_and_politics", SOCIAL),
    ("high_school_macroeconomics", SOCIAL),
    ("high_school_mathematics", STEM),
    ("high_school_microeconomics", SOCIAL),
    ("high_school_physics", STEM),
    ("high_school_psychology", SOCIAL),
    ("high_school_statistics", STEM),
    ("high_school_us_history", HUMANITIES),
    ("high_school_world_history", HUMANITIES),
    ("human_aging", OTHER),
    ("human_sexuality", SOCIAL),
    ("international_law", HUMANITIES),
    ("jurisprudence", HUMANITIES),
    ("logical_fallacies", HUMANITIES),
    ("machine_learning", STEM),
    ("management", OTHER),
    ("marketing", OTHER),
    ("medical_genetics", OTHER),
    ("miscellaneous", OTHER),
    ("moral_disputes", HUMANITIES),
    ("moral_scenarios", HUMANITIES),
    ("nutrition", OTHER),
    ("philosophy", HUMANITIES),
    ("prehistory", HUMANITIES),
    ("professional_accounting", OTHER),
    ("professional_law", HUMANITIES),
    ("professional_medicine", OTHER),
    ("professional_psychology", SOCIAL),
    ("public_relations", SOCIAL),
    ("security_studies", SOCIAL),
    ("sociology", SOCIAL),
    ("us_foreign_policy", SOCIAL),
    ("virology", OTHER),
    ("world_religions", HUMANITIES),
];

const STEM: &str = "STEM";
const HUMANITIES: &str = "humanities";
const SOCIAL: &str = "social sciences";
const OTHER: &str = "other";
/// In the order hendrycks/test reports them.
pub const CATEGORIES: [&str; 4] = [STEM, HUMANITIES, SOCIAL, OTHER];

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];
const HEADER: [&str; 6] = ["question", "choice0", "choice1", "choice2", "choice3", "answer"];

#[derive(Clone, Debug, PartialEq)]
pub struct Question {
    pub question: String,
    pub choices: [String; 4],
    /// 0..4
    pub answer: usize,
}

/// Read one subject file; errors name the file and the record's line.
pub fn read_csv(path: &Path) -> Result<Vec<Question>> {
    let bad = |msg: String| EvalError::Dataset { path: path.to_path_buf(), msg };
    let mut r = csv::ReaderBuilder::new().has_headers(true).from_path(path).map_err(|e| bad(e.to_string()))?;
    let header = r.headers().map_err(|e| bad(e.to_string()))?.clone();
    if header.iter().ne(HEADER) {
        return Err(bad(format!("header is {:?}, expected {}", header.iter().collect::<Vec<_>>(), HEADER.join(","))));
    }
    let mut out = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| bad(e.to_string()))?;
        let line = rec.position().map_or(0, |p| p.line());
        let answer = rec[5]
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&a| a < 4)
            .ok_or_else(|| bad(format!("line {line}: answer '{}' is not an index 0-3", &rec[5])))?;
        out.push(Question {
            question: rec[0].to_string(),
            choices: std::array::from_fn(|i| rec[i + 1].to_string()),
            answer,
        });
    }
    Ok(out)
}

/// "The following are multiple choice questions (with answers) about high school physics.\n\n"
pub fn header(subject: &str) -> String {
    format!("The following are multiple choice questions (with answers) about {}.\n\n", subject.replace('_', " "))
}

/// A question block ending in "Answer:", or with its letter and a blank line (a shot).
pub fn format_question(q: &Question, with_answer: bool) -> String {
    let mut s = q.question.clone();
    for (letter, c) in LETTERS.iter().zip(&q.choices) {
        s.push_str(&format!("\n{letter}. {c}"));
    }
    s.push_str("\nAnswer:");
    if with_answer {
        s.push_str(&format!(" {}\n\n", LETTERS[q.answer]));
    }
    s
}

/// Token ids of `" A"`..`" D"`; each must be one token.
pub fn answer_ids(tok: &Tokenizer) -> Result<[u32; 4]> {
    let mut ids = [0u32; 4];
    for (id, letter) in ids.iter_mut().zip(LETTERS) {
        let enc = tok
            .encode(format!(" {letter}"), false)
            .map_err(|e| EvalError::Tokenize { what: format!("\" {letter}\""), msg: e.to_string() })?;
        match enc.get_ids() {
            [one] => *id = *one,
            more => return Err(EvalError::Invalid(format!("the tokenizer splits \" {letter}\" into {} tokens {more:?}; MMLU scoring needs one token per answer letter", more.len()))),
        }
    }
    Ok(ids)
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Dev examples before each question (at most 5, the dev split's size).
    pub shots: usize,
    /// The first N test questions of each subject.
    pub limit: Option<usize>,
    /// The model's context: longer prompts drop shots from the front.
    pub max_context: usize,
    /// Subjects to run (empty: all 57).
    pub subjects: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Score {
    pub name: String,
    pub questions: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Per subject: the answer index chosen for each question, in file order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<usize>,
}

impl Score {
    fn new(name: &str, questions: usize, correct: usize) -> Self {
        Score {
            name: name.into(),
            questions,
            correct,
            accuracy: correct as f64 / questions.max(1) as f64,
            predictions: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct MmluReport {
    pub shots: usize,
    pub limit: Option<usize>,
    pub questions: usize,
    pub correct: usize,
    /// Over all questions (micro average).
    pub accuracy: f64,
    /// Mean of the per-subject accuracies.
    pub macro_accuracy: f64,
    /// Per category, over its questions.
    pub categories: Vec<Score>,
    pub subjects: Vec<Score>,
    /// Prompts longer than the context, shortened by dropping shots from the front.
    pub shortened: usize,
    /// Tokens the model ran (the shared prefixes once per subject, then each question's own).
    pub tokens_computed: usize,
    pub seconds: f64,
    pub questions_per_s: f64,
}

/// The subject files, checked before any work: `(subject, category, dev, test)`.
pub fn subject_files(
    data_dir: &Path,
    wanted: &[String],
) -> Result<Vec<(&'static str, &'static str, PathBuf, PathBuf)>> {
    if let Some(w) = wanted.iter().find(|w| !SUBJECTS.iter().any(|(s, _)| s == w)) {
        return Err(EvalError::Invalid(format!(
            "unknown MMLU subject '{w}' (one of: {})",
            SUBJECTS.map(|s| s.0).join(", ")
        )));
    }
    let mut out = Vec::new();
    for (subject, category) in SUBJECTS.iter().filter(|(s, _)| wanted.is_empty() || wanted.iter().any(|w| w == s)) {
        let dev = data_dir.join("dev").join(format!("{subject}_dev.csv"));
        let test = data_dir.join("test").join(format!("{subject}_test.csv"));
        for p in [&dev, &test] {
            if !p.is_file() {
                return Err(EvalError::Dataset {
                    path: p.clone(),
                    msg: format!(
                        "MMLU file missing (expected {}/{{dev,test}}/<subject>_{{dev,test}}.csv for all 57 subjects)",
                        data_dir.display()
                    ),
                });
            }
        }
        out.push((*subject, *category, dev, test));
    }
    Ok(out)
}

/// Run MMLU over the subjects in `data_dir` (the `mmlu` folder). `progress(done, total)` after
/// each question.
pub fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    data_dir: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<MmluReport> {
    if opts.max_context < 2 {
        return Err(EvalError::Invalid(format!(
            "a context of {} tokens is too short for MMLU prompts",
            opts.max_context
        )));
    }
    let files = subject_files(data_dir, &opts.subjects)?;
    let mut subjects = Vec::new();
    for (subject, category, dev, test) in &files {
        let dev = read_csv(dev)?;
        if opts.shots > dev.len() {
            return Err(EvalError::Invalid(format!(
                "--shots {}: the {subject} dev split has {} examples",
                opts.shots,
                dev.len()
            )));
        }
        let mut test_q = read_csv(test)?;
        test_q.truncate(opts.limit.unwrap_or(usize::MAX));
        subjects.push((*subject, *category, dev, test_q));
    }
    let answers = answer_ids(tok)?;
    let total: usize = subjects.iter().map(|s| s.3.len()).sum();
    let (mut done, mut shortened, mut tokens_computed) = (0, 0, 0);
    let mut scores = Vec::new();
    let start = Instant::now();
    for (subject, _, dev, test) in &subjects {
        let shots = &dev[..opts.shots];
        let prefix = prompt(subject, shots, None);
        let prefix_ids = encode(tok, &prefix, subject)?;
        let mut cache = KvCache::default();
        let cached = prefix_ids.len().min(opts.max_context.saturating_sub(1));
        if cached > 0 {
            model.forward_cached(&prefix_ids[..cached], &mut cache)?;
        }
        tokens_computed += cached;
        let mut predictions = Vec::with_capacity(test.len());
        for q in test {
            let (ids, short) = fit(tok, subject, shots, q, opts.max_context)?;
            shortened += short as usize;
            let keep = common_prefix(&ids, &prefix_ids[..cached]).min(ids.len() - 1);
            let mut c = cache.fork(keep)?;
            let hidden = model.forward_cached(&ids[keep..], &mut c)?;
            tokens_computed += ids.len() - keep;
            let last =
                hidden.narrow(0, hidden.dims()[0] - 1, 1).map_err(|e| EvalError::Invalid(format!("logits: {e}")))?;
            let logits = model
                .logits(&last)?
                .flatten_all()
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(|e| EvalError::Invalid(format!("logits: {e}")))?;
            predictions.push(pick(&logits, &answers));
            done += 1;
            progress(done, total);
        }
        let correct = predictions.iter().zip(test).filter(|(p, q)| **p == q.answer).count();
        scores.push(Score { predictions, ..Score::new(subject, test.len(), correct) });
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(report(scores, &subjects.iter().map(|s| s.1).collect::<Vec<_>>(), opts, shortened, tokens_computed, seconds))
}

fn report(
    subjects: Vec<Score>,
    category_of: &[&str],
    opts: &Options,
    shortened: usize,
    tokens_computed: usize,
    seconds: f64,
) -> MmluReport {
    let questions: usize = subjects.iter().map(|s| s.questions).sum();
    let correct: usize = subjects.iter().map(|s| s.correct).sum();
    let categories = CATEGORIES
        .iter()
        .filter_map(|c| {
            let of: Vec<&Score> = subjects.iter().zip(category_of).filter(|(_, k)| *k == c).map(|(s, _)| s).collect();
            (!of.is_empty())
                .then(|| Score::new(c, of.iter().map(|s| s.questions).sum(), of.iter().map(|s| s.correct).sum()))
        })
        .collect();
    MmluReport {
        shots: opts.shots,
        limit: opts.limit,
        questions,
        correct,
        accuracy: correct as f64 / questions.max(1) as f64,
        macro_accuracy: subjects.iter().map(|s| s.accuracy).sum::<f64>() / subjects.len().max(1) as f64,
        categories,
        subjects,
        shortened,
        tokens_computed,
        seconds,
        questions_per_s: questions as f64 / seconds.max(1e-9),
    }
}

/// Header, shots and (if given) the question to answer.
fn prompt(subject: &str, shots: &[Question], q: Option<&Question>) -> String {
    let mut s = header(subject);
    for shot in shots {
        s.push_str(&format_question(shot, true));
    }
    if let Some(q) = q {
        s.push_str(&format_question(q, false));
    }
    s
}

fn encode(tok: &Tokenizer, text: &str, subject: &str) -> Result<Vec<u32>> {
    Ok(tok
        .encode(text, true)
        .map_err(|e| EvalError::Tokenize { what: format!("an MMLU {subject} prompt"), msg: e.to_string() })?
        .get_ids()
        .to_vec())
}

/// The prompt's tokens within `max_context`: shots dropped from the front while too long, then
/// (no shot left) the question itself cut from the left. Also whether it was shortened.
fn fit(
    tok: &Tokenizer,
    subject: &str,
    shots: &[Question],
    q: &Question,
    max_context: usize,
) -> Result<(Vec<u32>, bool)> {
    let mut drop = 0;
    loop {
        let ids = encode(tok, &prompt(subject, &shots[drop..], Some(q)), subject)?;
        if ids.len() <= max_context {
            return Ok((ids, drop > 0));
        }
        if drop == shots.len() {
            return Ok((ids[ids.len() - max_context..].to_vec(), true));
        }
        drop += 1;
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Index of the answer whose token has the highest logit (the first on ties).
fn pick(logits: &[f32], answers: &[u32; 4]) -> usize {
    (0..4).fold(0, |best, i| if logits[answers[i] as usize] > logits[answers[best] as usize] { i } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_match_hendrycks_counts() {
        let count = |c: &str| SUBJECTS.iter().filter(|s| s.1 == c).count();
        assert_eq!([count(STEM), count(HUMANITIES), count(SOCIAL), count(OTHER)], [18, 13, 12, 14]);
        let mut names: Vec<&str> = SUBJECTS.iter().map(|s| s.0).collect();
        names.dedup();
        assert_eq!(names.len(), 57, "sorted and unique");
    }

    #[test]
    fn csv_fields_may_hold_commas_quotes_and_newlines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x_test.csv");
        std::fs::write(&p, "question,choice0,choice1,choice2,choice3,answer\n\"Say \"\"hi\"\",\nthen go\",a,\"b, c\",d,e,2\nplain,1,2,3,4,0\n").unwrap();
        let q = read_csv(&p).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].question, "Say \"hi\",\nthen go");
        assert_eq!(q[0].choices, ["a", "b, c", "d", "e"].map(String::from));
        assert_eq!((q[0].answer, q[1].answer), (2, 0));
        std::fs::write(&p, "question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,4\n").unwrap();
        let e = read_csv(&p).unwrap_err().to_string();
        assert!(e.contains("x_test.csv") && e.contains("line 2") && e.contains("'4'"), "{e}");
        std::fs::write(&p, "q,a,b,c,d,answer\n").unwrap();
        assert!(read_csv(&p).unwrap_err().to_string().contains("header"));
        std::fs::write(&p, "question,choice0,choice1,choice2,choice3,answer\nq,a,b\n").unwrap();
        assert!(read_csv(&p).unwrap_err().to_string().contains("x_test.csv"));
    }

    #[test]
    fn prompt_is_the_standard_few_shot_format() {
        let q =
            |s: &str, a| Question { question: s.into(), choices: ["w", "x", "y", "z"].map(String::from), answer: a };
        let p = prompt("high_school_physics", &[q("Q1?", 1)], Some(&q("Q2?", 0)));
        assert_eq!(p, "The following are multiple choice questions (with answers) about high school physics.\n\nQ1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\nQ2?\nA. w\nB. x\nC. y\nD. z\nAnswer:");
        assert_eq!(pick(&[0.0, 3.0, 1.0, 3.0, 2.0], &[4, 1, 2, 3]), 1, "first of the tied maxima");
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
    }
}
