//! `--calib chat`: dialogue in the model's own chat format.
//!
//! The conversations are the English part of the ChatterBot corpus (PyPI wheel
//! `chatterbot-corpus==1.3.3`, BSD, SHA-256 pinned): 21 topic files of short human-written
//! exchanges (greetings, small talk, tech support, trivia, some programming Q&A). Each
//! conversation becomes one rendering of the model's chat template, turns alternating user /
//! assistant, and the renderings are concatenated in file-name order, duplicates dropped. It
//! needs no network beyond PyPI and no model output, and it shares nothing with the
//! evaluation sets (WikiText-2, MMLU, HumanEval).
//!
//! The files are a small subset of YAML (a list of lists of strings); [`parse_conversations`]
//! reads that subset and refuses anything else, naming the file and line. A test holds it to
//! PyYAML on every file.

use crate::error::{CalibError, Result};
use adadim_load::fetch::{pip_download, run_python};
use adadim_run::ChatTemplate;
use std::path::{Path, PathBuf};

const WHEEL: (&str, &str, &str) = (
    "chatterbot-corpus==1.3.3",
    "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
);
const ENGLISH: &str = "chatterbot_corpus/data/english/";

/// The English YAML files, unpacked once into `$ADADIM_HOME/data/chatterbot-corpus-1.3.3/`,
/// sorted by name.
pub fn corpus_files(home: &Path) -> Result<Vec<PathBuf>> {
    let dir = home.join("data").join("chatterbot-corpus-1.3.3");
    if !dir.exists() {
        let wheel = pip_download(WHEEL.0, WHEEL.1, WHEEL.2, home)?;
        let tmp = adadim_load::fetch::partial_path(&dir);
        // Created here, fresh, so that only a directory of this run is ever removed below.
        std::fs::create_dir_all(dir.parent().unwrap_or(home))
            .and_then(|_| std::fs::create_dir(&tmp))
            .map_err(|e| CalibError::Data { path: tmp.clone(), msg: e.to_string() })?;
        let script = "import sys, os, zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z:\n    for n in z.namelist():\n        if n.startswith(sys.argv[3]) and n.endswith('.yml'):\n            open(os.path.join(sys.argv[2], os.path.basename(n)), 'wb').write(z.read(n))\n";
        if let Err(e) = run_python(WHEEL.0, script, &[&wheel, &tmp, Path::new(ENGLISH)]) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
        if let Err(e) = std::fs::rename(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another fetch put the same files in place meanwhile.
            if !dir.exists() {
                return Err(CalibError::Data { path: dir.clone(), msg: e.to_string() });
            }
        }
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| CalibError::Data { path: dir.clone(), msg: e.to_string() })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Every conversation of every file, rendered with `template`, duplicates dropped.
pub fn chat_text(files: &[PathBuf], template: &ChatTemplate) -> Result<String> {
    let mut seen = std::collections::HashSet::new();
    let mut out = String::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(|e| CalibError::Data { path: f.clone(), msg: e.to_string() })?;
        for turns in parse_conversations(&text, f)? {
            if turns.len() >= 2 && seen.insert(turns.clone()) {
                out.push_str(&template.render_dialogue(&turns.iter().map(String::as_str).collect::<Vec<_>>()));
            }
        }
    }
    Ok(out)
}

/// The `conversations:` list of a ChatterBot file: lists of strings. Entries that are a
/// lone string (not a conversation) are skipped.
pub fn parse_conversations(text: &str, path: &Path) -> Result<Vec<Vec<String>>> {
    let lines: Vec<&str> = text.lines().collect();
    let bad =
        |i: usize, msg: &str| CalibError::Data { path: path.to_path_buf(), msg: format!("line {}: {msg}", i + 1) };
    let (mut i, mut in_conversations, mut out) = (0, false, Vec::<Vec<String>>::new());
    while i < lines.len() {
        let line = lines[i];
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            i += 1;
        } else if !line.starts_with([' ', '-']) {
            let key = line.trim_end().strip_suffix(':').ok_or_else(|| bad(i, "expected a top-level `key:`"))?;
            in_conversations = key == "conversations";
            i += 1;
        } else if !in_conversations {
            i += 1;
        } else if let Some(first) = line.strip_prefix("- - ") {
            let (s, next) = scalar(&lines, i, 2, first).map_err(|m| bad(i, &m))?;
            out.push(vec![s]);
            i = next;
        } else if let Some(more) = line.strip_prefix("  - ") {
            let (s, next) = scalar(&lines, i, 2, more).map_err(|m| bad(i, &m))?;
            out.last_mut().ok_or_else(|| bad(i, "a message before any conversation"))?.push(s);
            i = next;
        } else if let Some(lone) = line.strip_prefix("- ") {
            i = scalar(&lines, i, 0, lone).map_err(|m| bad(i, &m))?.1;
        } else {
            return Err(bad(i, "not a list item of the ChatterBot layout"));
        }
    }
    Ok(out)
}

/// A scalar starting with `first` on line `i`, the item of a dash in column `dash` (its
/// continuation lines are indented more), and the index of the line after it.
fn scalar(lines: &[&str], i: usize, dash: usize, first: &str) -> std::result::Result<(String, usize), String> {
    let continues = |l: &str| l.trim().is_empty() || l.len() - l.trim_start_matches(' ').len() > dash;
    let mut end = i + 1;
    while end < lines.len() && continues(lines[end]) {
        end += 1;
    }
    // Trailing blank lines belong to no scalar.
    while end > i + 1 && lines[end - 1].trim().is_empty() {
        end -= 1;
    }
    let body = &lines[i + 1..end];
    let head = first.trim_end_matches([' ', '\t']);
    match head {
        "|" | "|-" => {
            let indent = body.iter().find(|l| !l.trim().is_empty()).map_or(0, |l| l.len() - l.trim_start().len());
            let text: Vec<&str> = body.iter().map(|l| l.get(indent..).unwrap_or("")).collect();
            let keep_newline = if head == "|" { "\n" } else { "" };
            Ok((format!("{}{keep_newline}", text.join("\n")), end))
        }
        _ if head.starts_with('\'') => {
            let joined = std::iter::once(&head[1..]).chain(body.iter().copied()).collect::<Vec<_>>().join("\n");
            let mut inner = String::new();
            let mut chars = joined.char_indices().peekable();
            while let Some((k, c)) = chars.next() {
                if c != '\'' {
                    inner.push(c);
                } else if chars.peek().is_some_and(|&(_, n)| n == '\'') {
                    inner.push('\'');
                    chars.next();
                } else {
                    if !joined[k + 1..].trim().is_empty() {
                        return Err("text after a closing quote".into());
                    }
                    return Ok((fold(&inner, true), end));
                }
            }
            Err("unterminated single-quoted string".into())
        }
        _ if head.starts_with('"') => {
            let joined = std::iter::once(&head[1..]).chain(body.iter().copied()).collect::<Vec<_>>().join("\n");
            let b = joined.as_bytes();
            let mut k = 0;
            while k < b.len() && b[k] != b'"' {
                k += if b[k] == b'\\' { 2 } else { 1 };
            }
            if k >= b.len() {
                return Err("unterminated double-quoted string".into());
            }
            if !joined[k + 1..].trim().is_empty() {
                return Err("text after a closing quote".into());
            }
            Ok((unescape(&fold(&joined[..k], true))?, end))
        }
        _ if head.starts_with(['>', '|', '&', '*', '!', '[', '{']) => Err(format!("unsupported YAML here: {head:?}")),
        _ => {
            let joined = std::iter::once(head).chain(body.iter().copied()).collect::<Vec<_>>().join("\n");
            if joined.contains(" #") || head.trim_end().ends_with(':') || head.contains(": ") {
                return Err(format!(
                    "a plain string with a comment or a `: ` (YAML would not read it as text): {head:?}"
                ));
            }
            Ok((fold(&joined, false), end))
        }
    }
}

/// The escapes of a double-quoted scalar that plain text needs; any other is refused.
fn unescape(text: &str) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('n') => '\n',
            Some('t') => '\t',
            Some(c @ ('"' | '\\' | '/' | ' ')) => c,
            other => return Err(format!("unsupported escape \\{}", other.map(String::from).unwrap_or_default())),
        });
    }
    Ok(out)
}

/// YAML line folding of a multi-line flow scalar: a line break between two lines becomes a
/// space, each empty line a newline; space around breaks is dropped (quoted: not the first
/// line's leading or the last line's trailing space).
fn fold(text: &str, quoted: bool) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let n = lines.len();
    let mut out = String::new();
    let mut breaks = 0;
    // YAML's white space is space and tab only (a no-break space is text).
    let ws: &[char] = &[' ', '\t'];
    for (k, l) in lines.iter().enumerate() {
        let t = match (k == 0, k == n - 1) {
            (true, true) => {
                if quoted {
                    *l
                } else {
                    l.trim_matches(ws)
                }
            }
            (true, false) => {
                if quoted {
                    l.trim_end_matches(ws)
                } else {
                    l.trim_matches(ws)
                }
            }
            (false, true) => {
                if quoted {
                    l.trim_start_matches(ws)
                } else {
                    l.trim_matches(ws)
                }
            }
            (false, false) => l.trim_matches(ws),
        };
        if t.is_empty() && k > 0 && k < n - 1 {
            breaks += 1;
            continue;
        }
        if k > 0 {
            out.push_str(&if breaks == 0 { " ".to_string() } else { "\n".repeat(breaks) });
        }
        breaks = 0;
        out.push_str(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<Vec<String>> {
        parse_conversations(text, Path::new("t.yml")).unwrap()
    }

    #[test]
    fn reads_the_chatterbot_subset_of_yaml() {
        let text = "categories:\n- greetings\n- x\nconversations:\n- - Hello\n  - Hi there,\n    how are you?\n\n- - 'It''s a\n\n    quoted one. '\n  - |\n    def f():\n        return 1\n\n    done\n- a lone string, skipped\n  - its continuation\n- - plain\n  - |-\n    no newline\n  - \"say \\\"hi\\\",\n    twice\"\n";
        assert_eq!(
            parse(text),
            vec![
                vec!["Hello".to_string(), "Hi there, how are you?".into()],
                vec!["It's a\nquoted one. ".into(), "def f():\n    return 1\n\ndone\n".into()],
                vec!["plain".into(), "no newline".into(), "say \"hi\", twice".into()],
            ]
        );
    }

    #[test]
    fn refuses_what_it_does_not_read_naming_the_line() {
        for (text, what) in [
            ("conversations:\n- - \"bad \\q\"\n", "unsupported escape"),
            ("conversations:\n- - >\n    folded\n", "unsupported"),
            ("conversations:\n- - 'open\n", "unterminated"),
            ("conversations:\n- - key: value\n", "plain string"),
            ("conversations:\n   - odd\n", "not a list item"),
            ("conversations:\n  - orphan\n", "before any conversation"),
        ] {
            let e = parse_conversations(text, Path::new("t.yml")).unwrap_err().to_string();
            assert!(e.contains("t.yml") && e.contains("line 2") && e.contains(what), "{text:?}: {e}");
        }
    }

    #[test]
    fn renders_each_conversation_once_in_the_template() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.yml"), d.path().join("b.yml"));
        std::fs::write(&a, "conversations:\n- - Hi\n  - Hello\n- - Hi\n  - Hello\n- - alone\n").unwrap();
        std::fs::write(&b, "conversations:\n- - Bye\n  - See you\n  - Soon\n").unwrap();
        let t = ChatTemplate { default_system: None };
        let text = chat_text(&[a, b], &t).unwrap();
        assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nSee you<|im_end|>\n<|im_start|>user\nSoon<|im_end|>\n");
    }
}
