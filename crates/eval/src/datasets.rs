//! Evaluation datasets: named corpora looked up in `$ADADIM_DATA`, or any text file.

use crate::error::{EvalError, Result};
use std::path::{Path, PathBuf};

/// Named datasets and where they live under `$ADADIM_DATA`.
pub const NAMED: &[(&str, &str, &str)] = &[
    ("wikitext2", "wikitext-2-raw/wiki.test.raw", "WikiText-2 raw, test split"),
    ("ptb", "ptb/ptb.test.txt", "Penn Treebank (Mikolov split), test"),
];

/// A resolved dataset: its label (the name, or the path given) and the file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub label: String,
    pub path: PathBuf,
}

impl Dataset {
    /// `spec` is a name from [`NAMED`] or a path to a UTF-8 text file.
    pub fn resolve(spec: &str, data_dir: Option<&Path>) -> Result<Self> {
        if let Some((name, rel, desc)) = NAMED.iter().find(|(n, _, _)| *n == spec) {
            let Some(dir) = data_dir else {
                return Err(EvalError::Dataset {
                    path: PathBuf::from(rel),
                    msg: format!(
                        "dataset '{name}' ({desc}) is looked up in $ADADIM_DATA, which is not set; \
                         set ADADIM_DATA to a folder holding {rel} (e.g. ADADIM_DATA=../shared/data) \
                         or pass the file's path"
                    ),
                });
            };
            let path = dir.join(rel);
            if let Some(problem) = adadim_load::file_problem(&path) {
                return Err(EvalError::Dataset {
                    path,
                    msg: format!(
                        "dataset '{name}' ({desc}) {problem}: put the file here, or point $ADADIM_DATA elsewhere"
                    ),
                });
            }
            return Ok(Dataset { label: name.to_string(), path });
        }
        let path = PathBuf::from(spec);
        if let Some(problem) = adadim_load::file_problem(&path) {
            let names: Vec<&str> = NAMED.iter().map(|n| n.0).collect();
            return Err(EvalError::Dataset {
                path,
                msg: format!("{problem}, and not a dataset name ({})", names.join(", ")),
            });
        }
        Ok(Dataset { label: spec.to_string(), path })
    }

    pub fn read_text(&self) -> Result<String> {
        let bytes = std::fs::read(&self.path)
            .map_err(|e| EvalError::Dataset { path: self.path.clone(), msg: e.to_string() })?;
        String::from_utf8(bytes).map_err(|e| EvalError::Dataset {
            path: self.path.clone(),
            msg: format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()),
        })
    }
}

/// `$ADADIM_DATA`, if set and non-empty.
pub fn data_dir_from_env() -> Option<PathBuf> {
    std::env::var_os("ADADIM_DATA").filter(|v| !v.is_empty()).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_data_dir_says_where_to_put_the_file() {
        let e = Dataset::resolve("wikitext2", None).unwrap_err().to_string();
        assert!(e.contains("ADADIM_DATA") && e.contains("wiki.test.raw"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let e = Dataset::resolve("ptb", Some(d.path())).unwrap_err().to_string();
        assert!(e.contains("ptb.test.txt") && e.contains("not found"), "{e}");
        let e = Dataset::resolve("/no/such/file.txt", None).unwrap_err().to_string();
        assert!(e.contains("/no/such/file.txt"), "{e}");
    }

    /// What is at the path is said as it is: never "not found" for a file that is there.
    #[test]
    fn says_what_the_path_is() {
        let d = tempfile::tempdir().unwrap();
        let e = Dataset::resolve(d.path().to_str().unwrap(), None).unwrap_err().to_string();
        assert!(e.contains("is a directory, expected a file") && !e.contains("not found"), "{e}");
        let e = Dataset::resolve("/dev/null", None).unwrap_err().to_string();
        assert!(e.contains("/dev/null: is a character device, expected a file"), "{e}");
        let e = Dataset::resolve("/no/such/file.txt", None).unwrap_err().to_string();
        assert!(e.contains("not found, and not a dataset name"), "{e}");
        std::fs::create_dir_all(d.path().join("ptb/ptb.test.txt")).unwrap();
        let e = Dataset::resolve("ptb", Some(d.path())).unwrap_err().to_string();
        assert!(e.contains("dataset 'ptb'") && e.contains("is a directory"), "{e}");
    }

    #[test]
    fn rejects_non_utf8() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.txt");
        std::fs::write(&p, b"abc\xff\xfe").unwrap();
        let ds = Dataset::resolve(p.to_str().unwrap(), None).unwrap();
        let e = ds.read_text().unwrap_err().to_string();
        assert!(e.contains("not UTF-8") && e.contains("offset 3"), "{e}");
    }
}
