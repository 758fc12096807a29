//! What the user reads when a command fails, and flag checks shared by several commands.

use anyhow::Result;

/// The error and its causes on one line, `top: cause: cause`, safe for a terminal: a cause
/// whose text its parent already includes is not repeated (library errors show their cause
/// in their own message so that it survives `to_string()`, and also return it as `source()`),
/// and names read from files cannot reach the terminal as control characters.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut parent = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parent.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        parent = text;
    }
    adadim_load::printable(&out).into_owned()
}

/// `--limit N` of the eval commands: 0 would evaluate nothing (and then report an empty text
/// or a shortage of tokens), so it is refused by name before any work.
pub fn check_limit(limit: Option<usize>) -> Result<()> {
    if limit == Some(0) {
        anyhow::bail!(
            "--limit 0: nothing would be evaluated; give at least 1, or leave --limit out to evaluate everything"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_its_parent_shows_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "Permission denied (os error 13)");
        let e = anyhow::Error::new(adadim_load::LoadError::Io { path: "m/config.json".into(), source: io })
            .context("loading m");
        assert_eq!(error_text(&e), "loading m: m/config.json: Permission denied (os error 13)");
        let e = anyhow::anyhow!("tensor 'a\u{1b}[2J'");
        assert_eq!(error_text(&e), "tensor 'a\\u{1b}[2J'");
    }
}
