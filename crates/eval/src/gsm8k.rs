//! GSM8K (Cobbe et al. 2021): grade-school math word problems, scored on the final number.
//!
//! ```text
//! 8 worked train solutions ("Question: ...\nAnswer: ... #### N", calculator <<...>> removed)
//!   + "Question: <test problem>\nAnswer:"
//!   ── greedy decoding with the KV cache, cut at the next "Question:" or a blank line
//!   ── the number after "####", else the last number ── compared with the reference's "####" N
//! ```
//!
//! The shots' keys and values are computed once, from the first prompt, and every later
//! prompt starts from them (a fork of the KV cache), so each problem prefills only its own
//! question. `--chat`: zero-shot through the model's chat template, the answer read after "The
//! answer is". Numbers are compared as text after [`normalize`] (commas, `$`, a trailing `.0`).
//! The data are openai/grade-school-math's `train.jsonl` / `test.jsonl` in `$ADADIM_DATA/gsm8k`.

use crate::error::{EvalError, Result};
use adadim_model::Model;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// The few-shot examples: these lines (0-based) of `train.jsonl`, the first eight.
pub const SHOTS: [usize; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

/// Where a few-shot completion ends: the model starting the next problem, or a blank line.
pub const STOP: [&str; 2] = ["Question:", "\n\n"];

/// The instruction after each problem in `--chat` mode.
pub const CHAT_INSTRUCTION: &str = "Solve the problem step by step, then give the final answer as \"The answer is N.\"";

/// One problem: its question and the worked solution ending in `#### N`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Problem {
    pub question: String,
    pub answer: String,
}

impl Problem {
    /// The reference answer: the number after `####`, normalized.
    pub fn reference(&self) -> String {
        let tail = self.answer.rsplit_once("####").map_or("", |(_, t)| t);
        normalize(tail.trim())
    }

    /// The worked solution as the shots show it: calculator annotations removed.
    pub fn worked(&self) -> String {
        strip_calculator(&self.answer)
    }
}

/// `$ADADIM_DATA/gsm8k/{split}.jsonl`.
pub fn split_file(data_dir: &Path, split: &str) -> PathBuf {
    data_dir.join("gsm8k").join(format!("{split}.jsonl"))
}

/// One problem per line; a line that is not a problem, or whose answer has no `####` final
/// answer, is an error naming the file and line.
pub fn load(path: &Path) -> Result<Vec<Problem>> {
    let bad = |msg: String| EvalError::Dataset { path: path.to_path_buf(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let p: Problem = serde_json::from_str(line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?;
        if !p.answer.contains("####") || p.reference().is_empty() {
            return Err(bad(format!("line {}: the answer has no '####' final answer", i + 1)));
        }
        out.push(p);
    }
    if out.is_empty() {
        return Err(bad("no problems in the file".into()));
    }
    Ok(out)
}

/// `text` without GSM8K's calculator annotations (`<<48/2=24>>`).
pub fn strip_calculator(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<<") {
        let Some(len) = rest[start..].find(">>") else { break };
        out.push_str(&rest[..start]);
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}

/// A number as compared: commas, `$` and a leading `+` dropped, trailing zeros of a decimal
/// fraction and then a bare trailing point dropped (`1,234.50` -> `1234.5`, `18.0` -> `18`).
pub fn normalize(number: &str) -> String {
    let mut s: String = number.chars().filter(|c| !matches!(c, ',' | '$' | '+')).collect();
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    if s == "-0" {
        s = "0".into();
    }
    s
}

/// Every number in `text`, in order: an optional minus, digits with thousands commas, an
/// optional decimal fraction (a point is part of a number only when a digit follows it).
pub fn numbers(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let neg = i > 0 && b[i - 1] == b'-' && (i < 2 || !b[i - 2].is_ascii_alphanumeric());
        let start = if neg { i - 1 } else { i };
        let mut j = i;
        loop {
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            // A comma followed by exactly three digits continues the number.
            let group = |k: usize| k < b.len() && b[k].is_ascii_digit();
            if j < b.len() && b[j] == b',' && (1..4).all(|d| group(j + d)) && !group(j + 4) {
                j += 1;
                continue;
            }
            break;
        }
        if j + 1 < b.len() && b[j] == b'.' && b[j + 1].is_ascii_digit() {
            j += 1;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
        }
        out.push(normalize(&text[start..j]));
        i = j;
    }
    out
}

/// The answer a few-shot completion gives: the first number after `####`, else the last
/// number anywhere; `None` when it holds no number.
pub fn extract(completion: &str) -> Option<String> {
    if let Some((_, tail)) = completion.split_once("####") {
        if let Some(n) = numbers(tail).into_iter().next() {
            return Some(n);
        }
    }
    numbers(completion).pop()
}

/// The answer a chat completion gives: the first number after the last "answer is", else as
/// [`extract`].
pub fn extract_chat(completion: &str) -> Option<String> {
    let lower = completion.to_lowercase();
    if let Some(at) = lower.rfind("answer is") {
        if let Some(n) = numbers(&completion[at..]).into_iter().next() {
            return Some(n);
        }
    }
    extract(completion)
}

/// `text` up to the first stop sequence.
pub fn truncate_at_stop(text: &str) -> &str {
    let cut = STOP.iter().filter_map(|s| text.find(s)).min().unwrap_or(text.len());
    &text[..cut]
}

/// The few-shot prompt of `question` after `shots` worked examples.
pub fn few_shot_prompt(shots: &[Problem], question: &str) -> String {
    let mut p = String::new();
    for s in shots {
        p.push_str(&format!("Question: {}\nAnswer: {}\n\n", s.question, s.worked()));
    }
    p.push_str(&format!("Question: {question}\nAnswer:"));
    p
}

/// The shots: [`SHOTS`] of `train`, checked to be none of `test`'s problems.
pub fn shots(train: &[Problem], test: &[Problem], n: usize) -> Result<Vec<Problem>> {
    if n > SHOTS.len() {
        return Err(EvalError::Invalid(format!("--shots {n}: at most {} worked examples are listed", SHOTS.len())));
    }
    let mut out = Vec::with_capacity(n);
    for &i in &SHOTS[..n] {
        let s = train.get(i).ok_or_else(|| EvalError::Invalid(format!("train split: no line {}", i + 1)))?;
        if test.iter().any(|t| t.question.trim() == s.question.trim()) {
            return Err(EvalError::Invalid(format!(
                "shot {} (train line {}) is also a test problem",
                out.len(),
                i + 1
            )));
        }
        out.push(s.clone());
    }
    Ok(out)
}

/// Where completions come from.
pub enum Completer<'a> {
    /// Greedy decoding with the KV cache. `chat`: the problem through the model's chat
    /// template with [`CHAT_INSTRUCTION`], zero-shot, to an end-of-turn token; otherwise the
    /// few-shot prompt, cut at [`STOP`].
    Model {
        model: &'a Model,
        tok: &'a Tokenizer,
        eos: Vec<u32>,
        max_tokens: usize,
        shots: Vec<Problem>,
        chat: Option<adadim_run::ChatTemplate>,
        /// Tokens the prompt may take (the context less `max_tokens`): shots are left out from
        /// the first until it fits.
        max_prompt: usize,
    },
    /// The reference solutions (checks the scorer: every one must be right).
    Canonical,
}

/// One completion and what it cost.
struct Completion {
    text: String,
    generated: usize,
    prompt_tokens: usize,
    shots_dropped: usize,
}

/// The keys and values of the first prompt's tokens (its last left out), kept to start every
/// later prompt that shares a prefix with it: the shots are computed once, not per problem.
type Prefix = Option<(Vec<u32>, adadim_model::KvCache)>;

impl Completer<'_> {
    fn complete(&self, index: usize, p: &Problem, prefix: &mut Prefix) -> Result<Completion> {
        let Completer::Model { model, tok, eos, max_tokens, shots, chat, max_prompt } = self else {
            return Ok(Completion {
                text: format!(" {}", p.worked()),
                generated: 0,
                prompt_tokens: 0,
                shots_dropped: 0,
            });
        };
        let what = || format!("problem {index}");
        // The chat template writes its own special tokens.
        let encode = |text: &str| -> Result<Vec<u32>> {
            let ids = tok
                .encode(text, chat.is_none())
                .map_err(|e| EvalError::Tokenize { what: what(), msg: e.to_string() })?;
            Ok(ids.get_ids().to_vec())
        };
        let (prompt, shots_dropped) = match chat {
            Some(t) => (encode(&t.render(&format!("{}\n{CHAT_INSTRUCTION}", p.question)))?, 0),
            None => {
                let mut dropped = 0;
                loop {
                    let ids = encode(&few_shot_prompt(&shots[dropped..], &p.question))?;
                    if ids.len() <= *max_prompt || dropped == shots.len() {
                        break (ids, dropped);
                    }
                    dropped += 1;
                }
            }
        };
        if prompt.len() > *max_prompt {
            return Err(EvalError::Invalid(format!(
                "problem {index}: its prompt alone takes {} tokens, more than the {max_prompt} the context leaves",
                prompt.len()
            )));
        }
        if prompt.is_empty() {
            return Err(EvalError::Invalid(format!("problem {index}: the prompt is empty after tokenization")));
        }
        let (base, cache) = match prefix.take() {
            Some(kept) => kept,
            None => {
                let mut c = model.new_cache();
                model.forward_cached(&prompt[..prompt.len() - 1], &mut c)?;
                (prompt[..prompt.len() - 1].to_vec(), c)
            }
        };
        let keep = base.iter().zip(&prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        let start = cache.fork(keep)?;
        *prefix = Some((base, cache));
        // Few-shot completions end at the next problem; chat ones at the end-of-turn token.
        fn whole(t: &str) -> &str {
            t
        }
        let cut: &dyn Fn(&str) -> &str = if chat.is_none() { &truncate_at_stop } else { &whole };
        let (text, generated) =
            crate::complete::greedy(model, tok, start, &prompt[keep..], eos, *max_tokens, cut, &what())?;
        Ok(Completion { text, generated, prompt_tokens: prompt.len(), shots_dropped })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProblemResult {
    /// 0-based line of `test.jsonl` (blank lines skipped).
    pub index: usize,
    pub completion: String,
    /// `null` when the completion holds no number.
    pub extracted: Option<String>,
    pub reference: String,
    pub correct: bool,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Gsm8kReport {
    pub problems: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Binomial standard error of the accuracy, `sqrt(p (1 - p) / n)`.
    pub stderr: f64,
    pub shots: usize,
    pub chat: bool,
    /// Problems whose prompt lost shots to fit the context.
    pub shortened: usize,
    /// Completions with no number in them.
    pub no_answer: usize,
    pub generated_tokens: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    pub results: Vec<ProblemResult>,
}

/// Complete and score every problem. `progress(done, total, correct)` after each.
pub fn evaluate(
    problems: &[Problem],
    completer: &Completer,
    progress: &mut dyn FnMut(usize, usize, usize),
) -> Result<Gsm8kReport> {
    let (shots, chat) = match completer {
        Completer::Model { shots, chat, .. } => (if chat.is_some() { 0 } else { shots.len() }, chat.is_some()),
        Completer::Canonical => (0, false),
    };
    let mut results = Vec::with_capacity(problems.len());
    let (mut correct, mut shortened) = (0, 0);
    let mut prefix = None;
    for (index, p) in problems.iter().enumerate() {
        let t = Instant::now();
        let c = completer.complete(index, p, &mut prefix)?;
        let extracted = if chat { extract_chat(&c.text) } else { extract(&c.text) };
        let reference = p.reference();
        let ok = extracted.as_deref() == Some(reference.as_str());
        correct += usize::from(ok);
        shortened += usize::from(c.shots_dropped > 0);
        results.push(ProblemResult {
            index,
            completion: c.text,
            extracted,
            reference,
            correct: ok,
            prompt_tokens: c.prompt_tokens,
            generated_tokens: c.generated,
            seconds: t.elapsed().as_secs_f64(),
        });
        progress(index + 1, problems.len(), correct);
    }
    let n = results.len();
    let accuracy = correct as f64 / n.max(1) as f64;
    let generated_tokens = results.iter().map(|r| r.generated_tokens).sum();
    let seconds: f64 = results.iter().map(|r| r.seconds).sum();
    Ok(Gsm8kReport {
        problems: n,
        correct,
        accuracy,
        stderr: (accuracy * (1.0 - accuracy) / n.max(1) as f64).sqrt(),
        shots,
        chat,
        shortened,
        no_answer: results.iter().filter(|r| r.extracted.is_none()).count(),
        generated_tokens,
        seconds,
        tokens_per_s: generated_tokens as f64 / seconds.max(1e-9),
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_extracted_from_real_completion_shapes() {
        let cases: [(&str, Option<&str>); 14] = [
            (" She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", Some("18")),
            (" The total is 1,234 + 66 = 1,300 dollars.\n#### 1,300", Some("1300")),
            (" He pays $12.50 for each, so $25.00 in all.", Some("25")),
            (" It is 3.75 hours long.", Some("3.75")),
            (" The temperature drops to -5 degrees.", Some("-5")),
            (" 10 - 15 = -5\n#### -5", Some("-5")),
            (" So the answer is 7.0", Some("7")),
            (" There are 5 apples and 12 pears. That makes 17 fruits.", Some("17")),
            (" I do not know.", None),
            ("", None),
            (" #### 42 and then 7 more", Some("42")),
            (" The year 2,0001 is odd: 3", Some("3")),
            (" Route 9-5 closed; it took 40 minutes.", Some("40")),
            (" The answer: 1,000,000.", Some("1000000")),
        ];
        for (text, want) in cases {
            assert_eq!(extract(text).as_deref(), want, "{text:?}");
        }
        assert_eq!(numbers("9-5"), vec!["9", "5"], "a hyphen between numbers is no minus sign");
        assert_eq!(extract_chat("First 3 + 4 = 7. The answer is 7.\nCheck: 2 + 5 = 7, 9"), Some("7".into()));
        assert_eq!(extract_chat("The Answer is $1,200."), Some("1200".into()));
        assert_eq!(extract_chat("no marker: 5 then 6"), Some("6".into()));
    }

    #[test]
    fn numbers_normalize_as_compared() {
        for (raw, want) in
            [("1,234.50", "1234.5"), ("18.0", "18"), ("$5", "5"), ("+3", "3"), ("-0.0", "0"), ("100", "100")]
        {
            assert_eq!(normalize(raw), want, "{raw}");
        }
    }

    #[test]
    fn calculator_annotations_are_removed_and_prompts_are_the_harness_format() {
        assert_eq!(strip_calculator("16 - 3 - 4 = <<16-3-4=9>>9 eggs\n#### 9"), "16 - 3 - 4 = 9 eggs\n#### 9");
        assert_eq!(strip_calculator("a <<b"), "a <<b");
        let shot = Problem { question: "Q1?".into(), answer: "2 + 2 = <<2+2=4>>4\n#### 4".into() };
        assert_eq!(
            few_shot_prompt(&[shot], "Q2?"),
            "Question: Q1?\nAnswer: 2 + 2 = 4\n#### 4\n\nQuestion: Q2?\nAnswer:"
        );
        assert_eq!(truncate_at_stop(" 5 + 5 = 10\n#### 10\n\nQuestion: next"), " 5 + 5 = 10\n#### 10");
        assert_eq!(truncate_at_stop(" 10 Question: x"), " 10 ");
    }

    #[test]
    fn bad_lines_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("test.jsonl");
        let good = serde_json::json!({"question": "How many?", "answer": "1 + 1 = 2\n#### 2"});
        std::fs::write(&p, format!("{good}\n\n{good}\n")).unwrap();
        let ps = load(&p).unwrap();
        assert_eq!((ps.len(), ps[0].reference().as_str()), (2, "2"));
        std::fs::write(&p, format!("{good}\n{{not json\n")).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("test.jsonl") && e.contains("line 2"), "{e}");
        let no_final = serde_json::json!({"question": "How many?", "answer": "1 + 1 = 2"});
        std::fs::write(&p, format!("{good}\n{good}\n{no_final}\n")).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("####"), "{e}");
    }

    #[test]
    fn a_shot_that_is_a_test_problem_is_refused() {
        let mk = |q: &str| Problem { question: q.into(), answer: "#### 1".into() };
        let train: Vec<Problem> = (0..8).map(|i| mk(&format!("train {i}"))).collect();
        let test = vec![mk("other"), mk("train 3")];
        let e = shots(&train, &test, 8).unwrap_err().to_string();
        assert!(e.contains("train line 4"), "{e}");
        assert_eq!(shots(&train, &test, 3).unwrap().len(), 3);
        assert!(shots(&train, &test, 9).is_err());
    }
}
