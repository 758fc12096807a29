//! Memory-mapped files that another program truncates while they are read.
//!
//! Reading a mapped page past a file's new end raises SIGBUS, which kills the process without a
//! word. [`Mapped`] registers each mapping's address range and file name; a SIGBUS handler
//! installed on the first mapping finds the range the faulting address falls in and exits
//! with a message naming the file (status 1). Work saved so far (a quantize run's finished
//! blocks) stays on disk, so the same command resumes once the file is whole again. A fault
//! outside every registered mapping keeps the default action.

use std::cell::UnsafeCell;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

const SLOTS: usize = 256;
const NAME: usize = 480;

struct Slot {
    /// 0 while free; the mapping's first address once `len` and `name` are written.
    start: AtomicUsize,
    len: AtomicUsize,
    name_len: AtomicUsize,
    name: UnsafeCell<[u8; NAME]>,
}

// SAFETY: `name` is written only by the thread that claimed the free slot (start 0 -> claimed)
// before `start` is published with Release; readers read it only after an Acquire load of a
// published `start`.
unsafe impl Sync for Slot {}

const CLAIMED: usize = 1;

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    name_len: AtomicUsize::new(0),
    name: UnsafeCell::new([0; NAME]),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

/// A registered mapping; unregisters when dropped.
#[derive(Debug)]
pub struct Mapped {
    slot: Option<usize>,
}

impl Mapped {
    /// Register `bytes` (a mapping of `path`) for the SIGBUS message.
    pub fn register(bytes: &[u8], path: &Path) -> Mapped {
        install();
        let start = bytes.as_ptr() as usize;
        if bytes.is_empty() || start <= CLAIMED {
            return Mapped { slot: None };
        }
        let text = path.display().to_string();
        let text = crate::printable(&text);
        for (i, s) in TABLE.iter().enumerate() {
            if s.start.compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                let n = text.len().min(NAME);
                // SAFETY: this thread claimed the slot; no reader looks at `name` until `start`
                // holds an address.
                unsafe { (&mut *s.name.get())[..n].copy_from_slice(&text.as_bytes()[..n]) };
                s.name_len.store(n, Ordering::Relaxed);
                s.len.store(bytes.len(), Ordering::Relaxed);
                s.start.store(start, Ordering::Release);
                return Mapped { slot: Some(i) };
            }
        }
        Mapped { slot: None } // table full: that file's fault keeps the default action
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            TABLE[i].start.store(0, Ordering::Release);
        }
    }
}

fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    #[cfg(unix)]
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO is a valid argument; the
        // handler only does async-signal-safe work (atomic loads, write, _exit, sigaction).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
        }
    });
}

#[cfg(unix)]
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        if start > CLAIMED && addr >= start && addr < start + s.len.load(Ordering::Relaxed) {
            let n = s.name_len.load(Ordering::Relaxed);
            let write = |b: &[u8]| {
                // SAFETY: writing a valid buffer to stderr is async-signal-safe.
                unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
            };
            write(b"error: ");
            // SAFETY: `start` was published after `name` was written (see `Slot`).
            write(unsafe { &(&*s.name.get())[..n] });
            write(b": the file got shorter while it was being read (truncated or rewritten by another program); run the command again once it is whole (finished work is kept)\n");
            // SAFETY: _exit is async-signal-safe and ends the process at once.
            unsafe { libc::_exit(1) };
        }
    }
    // Not one of ours: the default action (the fault recurs when the handler returns).
    // SAFETY: restoring SIG_DFL is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint truncated while mapped: the read exits 1 with a message naming the file.
    /// Runs in a child (this test binary re-run on just this test), since the process ends.
    #[test]
    fn a_file_truncated_while_mapped_is_named_not_a_crash() {
        if let Ok(dir) = std::env::var("ADADIM_SIGBUS_CHILD") {
            let dir = Path::new(&dir);
            let ck = crate::Checkpoint::open(dir).unwrap();
            std::fs::OpenOptions::new().write(true).open(dir.join("model.safetensors")).unwrap().set_len(4096).unwrap();
            let _ = ck.tensor_f32("model.norm.weight");
            let _ = ck.tensor_f32("model.embed_tokens.weight");
            for name in ck.tensor_names().map(String::from).collect::<Vec<_>>() {
                let _ = ck.tensor_f32(&name);
            }
            unreachable!("every tensor read from a 4 KB file");
        }
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m");
        let mut cfg = crate::synth::tiny_config();
        cfg.hidden_size = 256;
        cfg.num_attention_heads = 4;
        cfg.num_key_value_heads = Some(4);
        crate::synth::write_random_checkpoint(&m, &cfg, 1).unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "mapped::tests::a_file_truncated_while_mapped_is_named_not_a_crash", "--nocapture"])
            .env("ADADIM_SIGBUS_CHILD", &m)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("model.safetensors: the file got shorter while it was being read"), "{err}");
    }
}
