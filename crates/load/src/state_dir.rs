//! The tool's own state on disk, and the one rule for removing anything:
//!
//! **Nothing outside adadim's own state is ever removed, and state is verified before it is
//! trusted.** A directory adadim may delete from is a [`StateDir`]: created by [`StateDir::create`]
//! (which writes a marker first) or re-opened by [`StateDir::open`], which refuses a symbolic
//! link, a directory of another user and one that holds neither the marker nor is empty. Every
//! removal and rename inside it then goes through a descriptor opened without following links
//! (`/proc/self/fd/N/...` on Linux), so a directory swapped for a link after the check is never
//! followed. Temporary files and directories are created fresh (`create_new` / `create_dir`),
//! never adopted.

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{LoadError, Result};

/// The file whose presence (with this content) says a directory is an adadim work directory.
pub const MARKER: &str = "ADADIM-WORK-DIR";
const MARKER_TEXT: &str = "adadim work directory: everything in here was written by adadim and may be deleted by it\n";

/// A directory proven to be the tool's own state, held open without following links.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    fd: File,
}

fn not_ours(path: &Path, why: impl Into<String>) -> LoadError {
    LoadError::NotOwnState { path: path.to_path_buf(), why: why.into() }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LoadError + '_ {
    move |source| LoadError::Io { path: path.to_path_buf(), source }
}

/// Open `path` as a directory without following a link at its last component.
fn open_dir_nofollow(path: &Path) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC);
    }
    o.open(path)
}

/// Read at most `cap` bytes of the regular file `path` (not through a link): `None` if it is
/// absent, a link or not a regular file, or larger than `cap`.
pub fn read_small_regular(path: &Path, cap: u64) -> Option<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() > cap {
        return None;
    }
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    }
    crate::read_at_most(o.open(path).ok()?, cap).ok()?
}

impl StateDir {
    /// Create `path` (its parent must exist, `path` must not) as a new state directory.
    pub fn create(path: &Path) -> Result<StateDir> {
        std::fs::create_dir(path).map_err(io(path))?;
        let fd = open_dir_nofollow(path).map_err(io(path))?;
        let dir = StateDir { path: path.to_path_buf(), fd };
        dir.write_marker()?;
        Ok(dir)
    }

    /// Re-open `path` as this tool's state. Refused (with the reason): a symbolic link, not a
    /// directory, owned by another user, or holding files without the marker. An empty
    /// directory, or one holding only the marker cut short (a run killed while writing it), is
    /// adopted; so is one for which `legacy(path)` proves an older layout of the tool's own state.
    pub fn open(path: &Path, legacy: &dyn Fn(&Path) -> bool) -> Result<StateDir> {
        let meta = std::fs::symlink_metadata(path).map_err(io(path))?;
        if meta.file_type().is_symlink() {
            let to = std::fs::read_link(path).map(|t| format!(" (to {})", t.display())).unwrap_or_default();
            return Err(not_ours(path, format!("is a symbolic link{to}, not a directory adadim created")));
        }
        if !meta.is_dir() {
            return Err(not_ours(path, "is not a directory"));
        }
        let fd = match open_dir_nofollow(path) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(not_ours(path, "is a symbolic link, not a directory adadim created"))
            }
            Err(e) => return Err(LoadError::Io { path: path.to_path_buf(), source: e }),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let opened = fd.metadata().map_err(io(path))?;
            if (opened.dev(), opened.ino()) != (meta.dev(), meta.ino()) {
                return Err(not_ours(path, "changed while being opened"));
            }
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if opened.uid() != me {
                return Err(not_ours(path, format!("belongs to another user (uid {})", opened.uid())));
            }
        }
        let dir = StateDir { path: path.to_path_buf(), fd };
        let marker = read_small_regular(&path.join(MARKER), 4096);
        if marker.as_deref() == Some(MARKER_TEXT.as_bytes()) {
            return Ok(dir);
        }
        let names: Vec<_> = std::fs::read_dir(dir.at(""))
            .map_err(io(path))?
            .take(2)
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io(path))?;
        // A run killed while writing the marker leaves it alone and cut short: still ours.
        let cut_marker = names.len() == 1
            && names[0] == OsStr::new(MARKER)
            && marker.as_ref().is_some_and(|b| MARKER_TEXT.as_bytes().starts_with(b));
        if cut_marker {
            dir.remove(MARKER)?;
        }
        let mut entries = names.into_iter().filter(|_| !cut_marker);
        match entries.next() {
            None => {
                dir.write_marker()?;
                Ok(dir)
            }
            Some(_) if legacy(path) => {
                dir.write_marker()?;
                Ok(dir)
            }
            Some(name) => {
                let name = name.to_string_lossy().into_owned();
                Err(not_ours(
                    path,
                    format!(
                        "holds files adadim did not write (such as '{}') and no {MARKER} marker",
                        crate::printable(&name)
                    ),
                ))
            }
        }
    }

    fn write_marker(&self) -> Result<()> {
        let p = self.path.join(MARKER);
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create_new(true);
        match o.open(self.at(MARKER)) {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(MARKER_TEXT.as_bytes()).and_then(|_| f.sync_all()).map_err(io(&p))?;
                self.fd.sync_all().map_err(io(&self.path))
            }
            Err(e) => Err(LoadError::Io { path: p, source: e }),
        }
    }

    /// The directory's path as the user gave it (for messages and for writing into).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory this handle holds open, reached without resolving the
    /// original path again (`/proc/self/fd/N/name` where the system has it).
    pub fn at(&self, name: impl AsRef<Path>) -> PathBuf {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            let fd_path = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
            if fd_path.exists() {
                return fd_path.join(name);
            }
        }
        self.path.join(name)
    }

    /// Remove the entry `name` (a file, a link itself, or a directory tree whose links are not
    /// followed); absent is fine.
    pub fn remove(&self, name: impl AsRef<Path>) -> Result<()> {
        let name = name.as_ref();
        let shown = self.path.join(name);
        let target = self.at(name);
        let meta = match std::fs::symlink_metadata(&target) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(LoadError::Io { path: shown, source: e }),
        };
        let r = if meta.is_dir() { std::fs::remove_dir_all(&target) } else { std::fs::remove_file(&target) };
        r.map_err(|source| LoadError::Io { path: shown, source })
    }

    /// Remove every entry except the marker and `keep`.
    pub fn clear(&self, keep: &[&str]) -> Result<()> {
        for e in std::fs::read_dir(self.at("")).map_err(io(&self.path))? {
            let name = e.map_err(io(&self.path))?.file_name();
            if name != OsStr::new(MARKER) && !keep.iter().any(|k| OsStr::new(k) == name) {
                self.remove(&name)?;
            }
        }
        Ok(())
    }

    /// Move the entry `name` out to `dest`, which must not exist (never replaced).
    pub fn move_out(&self, name: impl AsRef<Path>, dest: &Path) -> Result<()> {
        rename_noreplace(&self.at(name), dest).map_err(io(dest))
    }

    /// Make renames inside the directory durable.
    pub fn sync(&self) -> Result<()> {
        self.fd.sync_all().map_err(io(&self.path))
    }

    /// Delete the whole directory: its contents, then itself (only if it is still the
    /// directory this handle opened).
    pub fn delete(self) -> Result<()> {
        self.clear(&[])?;
        self.remove(MARKER)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let (held, now) = (
                self.fd.metadata().map_err(io(&self.path))?,
                std::fs::symlink_metadata(&self.path).map_err(io(&self.path))?,
            );
            if (held.dev(), held.ino()) != (now.dev(), now.ino()) || now.file_type().is_symlink() {
                return Err(not_ours(&self.path, "was replaced while in use; left as it is"));
            }
        }
        std::fs::remove_dir(&self.path).map_err(io(&self.path))
    }
}

/// `rename(from, to)` that fails if `to` exists, rather than replacing it.
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
        let (f, t) = (c(from)?, c(to)?);
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as open() would.
        let r =
            unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // Filesystems without RENAME_NOREPLACE: check, then rename.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"));
    }
    std::fs::rename(from, to)
}

/// The name of the hidden work entry beside `target` (`.NAME<suffix>`), kept within the 255
/// bytes a file name may have: a long NAME is cut and a digest of the whole added, so the same
/// target always gets the same work name.
pub fn work_name(target: &Path, suffix: &str) -> String {
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let full = format!(".{name}{suffix}");
    if full.len() <= 255 {
        return full;
    }
    let digest = &crate::fetch::sha256_hex(name.as_bytes())[..12];
    let mut cut = 255 - 1 - suffix.len() - 1 - digest.len();
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}~{digest}{suffix}", &name[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_link_is_refused_and_its_target_kept() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("thesis.txt"), "x").unwrap();
        let link = d.path().join(".o.partial");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = StateDir::open(&link, &|_| true).unwrap_err().to_string();
        assert!(e.contains(".o.partial") && e.contains("symbolic link"), "{e}");
        assert!(victim.join("thesis.txt").exists());
    }

    #[test]
    fn a_foreign_directory_is_refused_an_empty_one_adopted() {
        let d = tempfile::tempdir().unwrap();
        let foreign = d.path().join("f");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::write(foreign.join("notes.txt"), "x").unwrap();
        let e = StateDir::open(&foreign, &|_| false).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("did not write"), "{e}");
        let empty = d.path().join("e");
        std::fs::create_dir(&empty).unwrap();
        let s = StateDir::open(&empty, &|_| false).unwrap();
        std::fs::write(s.path().join("x"), "y").unwrap();
        drop(s);
        // Now marked: re-opened, cleared, deleted.
        let s = StateDir::open(&empty, &|_| false).unwrap();
        s.clear(&[]).unwrap();
        assert!(!empty.join("x").exists() && empty.join(MARKER).exists());
        s.delete().unwrap();
        assert!(!empty.exists());
    }

    #[test]
    fn a_marker_cut_short_by_a_kill_is_adopted_a_foreign_one_is_not() {
        let d = tempfile::tempdir().unwrap();
        for cut in [0, 10, MARKER_TEXT.len() - 1] {
            let w = d.path().join(format!("w{cut}"));
            std::fs::create_dir(&w).unwrap();
            std::fs::write(w.join(MARKER), &MARKER_TEXT.as_bytes()[..cut]).unwrap();
            let s = StateDir::open(&w, &|_| false).unwrap();
            assert_eq!(std::fs::read(w.join(MARKER)).unwrap(), MARKER_TEXT.as_bytes());
            s.delete().unwrap();
        }
        // Other text under the marker's name, or a cut marker beside other files: refused, kept.
        let w = d.path().join("other");
        std::fs::create_dir(&w).unwrap();
        std::fs::write(w.join(MARKER), "my own notes").unwrap();
        assert!(StateDir::open(&w, &|_| false).is_err());
        assert_eq!(std::fs::read(w.join(MARKER)).unwrap(), b"my own notes");
        let w = d.path().join("beside");
        std::fs::create_dir(&w).unwrap();
        std::fs::write(w.join(MARKER), "").unwrap();
        std::fs::write(w.join("thesis.txt"), "x").unwrap();
        assert!(StateDir::open(&w, &|_| false).is_err());
        assert!(w.join("thesis.txt").exists() && w.join(MARKER).exists());
    }

    #[test]
    fn links_inside_are_removed_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("keep.txt"), "x").unwrap();
        let s = StateDir::create(&d.path().join("w")).unwrap();
        std::os::unix::fs::symlink(&victim, s.path().join("model")).unwrap();
        std::os::unix::fs::symlink(victim.join("keep.txt"), s.path().join("f")).unwrap();
        s.delete().unwrap();
        assert!(victim.join("keep.txt").exists());
    }

    #[test]
    fn move_out_never_replaces() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::create(&d.path().join("w")).unwrap();
        std::fs::create_dir(s.path().join("model")).unwrap();
        let dest = d.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        assert!(s.move_out("model", &dest).is_err());
        std::fs::remove_dir(&dest).unwrap();
        s.move_out("model", &dest).unwrap();
        assert!(dest.is_dir());
    }

    #[test]
    fn work_names_fit_a_file_name() {
        let long = "m".repeat(250);
        let n = work_name(Path::new(&long), ".partial");
        assert!(n.len() <= 255 && n.starts_with(".mmm") && n.ends_with(".partial"), "{n}");
        assert_eq!(n, work_name(Path::new(&long), ".partial"));
        assert_eq!(work_name(Path::new("/tmp/o"), ".partial"), ".o.partial");
    }
}
