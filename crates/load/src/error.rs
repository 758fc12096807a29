//! Typed errors for loading. Every variant names the file (and the tensor, where there is one)
//! so that a user can find what is wrong without a debugger.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

// Every string field may hold text read from a file (tensor names, architecture strings,
// metadata keys, tokens), so each is shown through [`printable`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    // The OS error is both shown and the `source()`: callers that print only the top error
    // (`to_string()`) still see the cause, and the binary prints a cause its parent already
    // shows once.
    #[error("{}: {source}", shown(.path))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not found{}", shown(.path), shown(.hint))]
    NotFound { path: PathBuf, hint: String },
    /// A directory (or another non-file) where a file is expected.
    #[error("{}: is a directory, expected a file", shown(.path))]
    IsADirectory { path: PathBuf },
    #[error("{}: invalid config: {}", shown(.path), shown(.msg))]
    Config { path: PathBuf, msg: String },
    #[error("{}: unsupported architecture \"{}\" (supported: {})", shown(.path), shown(.arch), shown(.supported))]
    UnsupportedArch { path: PathBuf, arch: String, supported: String },
    #[error("{}: corrupt or truncated safetensors file: {}", shown(.path), shown(.msg))]
    Safetensors { path: PathBuf, msg: String },
    #[error("{}: corrupt or truncated GGUF file: {}", shown(.path), shown(.msg))]
    Gguf { path: PathBuf, msg: String },
    #[error("{}: tensor '{}': {}", shown(.path), shown(.tensor), shown(.msg))]
    Tensor { path: PathBuf, tensor: String, msg: String },
    #[error("{}: tensor '{}' is missing", shown(.path), shown(.tensor))]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{}: tensor '{}' has unsupported type {}", shown(.path), shown(.tensor), shown(.dtype))]
    UnsupportedDtype { path: PathBuf, tensor: String, dtype: String },
    #[error("{}: tensor '{}' has shape {found:?}, but the config implies {expected:?}", shown(.path), shown(.tensor))]
    ShapeMismatch { path: PathBuf, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{}: tensor '{}' contains {count} non-finite values (NaN or Inf), first at index {first}", shown(.path), shown(.tensor))]
    NonFinite { path: PathBuf, tensor: String, count: usize, first: usize },
    #[error("{}: tokenizer: {}", shown(.path), shown(.msg))]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{}: more than {cap} bytes, more than any {} should hold (is it the right file?)", shown(.path), shown(.what))]
    TooLarge { path: PathBuf, what: String, cap: u64 },
    /// A path where adadim would keep its own state, holding something else: never touched.
    #[error("{}: {}; adadim removes nothing it did not write: move it away or choose another output", shown(.path), shown(.why))]
    NotOwnState { path: PathBuf, why: String },
    #[error("fetching {}: {}", shown(.what), shown(.msg))]
    Fetch { what: String, msg: String },
}

pub type Result<T> = std::result::Result<T, LoadError>;

/// `path`'s I/O error as a [`LoadError`]: a missing file is [`LoadError::NotFound`]; a
/// directory where a file is expected is [`LoadError::IsADirectory`] (reading one fails with
/// EISDIR, but mapping one fails with ENODEV, "No such device", which names neither).
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LoadError {
    const ENODEV: i32 = 19; // Linux and the BSDs alike
    let path = path.into();
    move |source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            LoadError::NotFound { path, hint: String::new() }
        } else if source.kind() == std::io::ErrorKind::IsADirectory
            || (source.raw_os_error() == Some(ENODEV) && path.is_dir())
        {
            LoadError::IsADirectory { path }
        } else {
            LoadError::Io { path, source }
        }
    }
}

/// Why `path` cannot be read as a regular file, in words, or `None` when it can: not found, a
/// symbolic link to nothing or one that cannot be followed (a loop), a directory, a device, a
/// FIFO or a socket (where reading would block or never end), or the OS's reason.
pub fn file_problem(path: &Path) -> Option<String> {
    let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => None,
        Ok(m) => Some(format!("is {}, expected a file", kind_of(m.file_type()))),
        Err(e) if link && e.kind() == std::io::ErrorKind::NotFound => {
            Some("is a symbolic link to a file that does not exist".into())
        }
        Err(_) if !link && std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) => {
            Some("not found".into())
        }
        Err(e) if link => Some(format!("is a symbolic link that cannot be followed: {e}")),
        Err(e) => Some(e.to_string()),
    }
}

fn kind_of(t: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        } else if t.is_block_device() {
            return "a block device";
        } else if t.is_fifo() {
            return "a named pipe (FIFO)";
        } else if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// `s` safe to print on a terminal: control characters (C0 such as ESC, DEL, C1), bidi
/// overrides and isolates, and line / paragraph separators are written as escapes (`\n`, `\t`,
/// `\r`, else `\u{1b}`), so a name read from a file cannot move the cursor, recolour the
/// terminal, reorder what is shown or break a one-line message. Backslashes are kept as they
/// are, so printing an already printable string changes nothing.
pub fn printable(s: &str) -> Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A path or string field of an error, through [`printable`].
fn shown<S: AsRef<OsStr> + ?Sized>(s: &S) -> String {
    printable(&s.as_ref().to_string_lossy()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        assert!(matches!(printable("model.layers.0.q_proj.weight"), Cow::Borrowed(_)));
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\ny\tz\r"), "x\\ny\\tz\\r");
        assert_eq!(printable("\u{9b}31m \u{7f}"), "\\u{9b}31m \\u{7f}");
        assert_eq!(printable("abc\u{202e}fed\u{2066}"), "abc\\u{202e}fed\\u{2066}");
        // Kept: ordinary Unicode, and backslashes (escaping twice changes nothing).
        assert_eq!(printable("Ġthe ▁día 中文 \\u{1b}"), "Ġthe ▁día 中文 \\u{1b}");
        let once = printable("\u{1b}]0;pwned\u{7}").into_owned();
        assert_eq!(printable(&once), once);
    }

    #[test]
    fn file_problems_are_named() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("f.txt");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(file_problem(&file), None);
        assert_eq!(file_problem(d.path()).unwrap(), "is a directory, expected a file");
        assert_eq!(file_problem(&d.path().join("none")).unwrap(), "not found");
        #[cfg(unix)]
        {
            assert_eq!(file_problem(Path::new("/dev/null")).unwrap(), "is a character device, expected a file");
            let (a, b) = (d.path().join("a"), d.path().join("b"));
            std::os::unix::fs::symlink(&b, &a).unwrap();
            assert_eq!(file_problem(&a).unwrap(), "is a symbolic link to a file that does not exist");
            std::os::unix::fs::symlink(&a, &b).unwrap();
            let e = file_problem(&a).unwrap();
            assert!(e.starts_with("is a symbolic link that cannot be followed") && e.contains("symbolic links"), "{e}");
        }
    }

    #[test]
    fn errors_show_names_escaped() {
        let e = LoadError::Tensor {
            path: "m/model.safetensors".into(),
            tensor: "evil\u{1b}[31m".into(),
            msg: "bad\nline".into(),
        };
        assert_eq!(e.to_string(), "m/model.safetensors: tensor 'evil\\u{1b}[31m': bad\\nline");
    }
}
