//! Running untrusted Python (model-written code) in a sandbox.
//!
//! The isolation model, all of it enforced by the kernel, none by Python:
//!
//! ```text
//! adadim ── fork ── pre_exec: rlimits (address space, CPU, file size, no core, processes),
//!                   new process group, killed with its parent; as root: setuid(nobody)
//!   unshare --user --map-root-user --mount --net --pid --fork --kill-child --mount-proc --ipc --uts
//!     sh LAUNCHER   remount every mount read-only, an empty read-only /dev, a small tmpfs
//!                   as the working directory, cd into it, print READY
//!       setpriv --no-new-privs --bounding-set=-all ...   drop every capability for good
//!         python3 -I -B program.py                       environment empty, stdin closed
//! ```
//!
//! - **Files**: the program's only writable place is its working directory, a fresh tmpfs of
//!   [`Limits::dir_size`] bytes over a temporary directory (gone with the namespace; the
//!   directory is removed afterwards whatever happened). Every other mount is read-only in its mount
//!   namespace, and it holds no capability that could remount or unmount anything. `/dev` is
//!   an empty read-only tmpfs: a read-only mount does not stop writes through device nodes.
//! - **Network**: a new network namespace with a loopback device that is down: no address,
//!   not even the host's 127.0.0.1, can be reached.
//! - **Processes**: a PID namespace (it sees and signals only its own processes; when its
//!   first process dies the kernel kills the rest); a wall-clock limit kills the process group.
//! - **Resources**: `RLIMIT_AS` (memory), `RLIMIT_CPU`, `RLIMIT_FSIZE` (also bounds the
//!   captured output), no core dumps. Run as root, the program runs as `nobody` outside its
//!   namespace (file permissions protect the host too; the interpreter must be one `nobody`
//!   can execute: the one `python3` resolves to, else `/usr/bin/python3`); run as another
//!   user, as that user.
//!
//! If any of this cannot be set up (no `unshare` / `setpriv`, user namespaces disabled, a
//! mount that cannot be made read-only), [`Sandbox::new`] fails and nothing runs: it fails
//! closed, naming what is missing.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Printed by the launcher once the namespaces and mounts are in place, before the program.
const READY: &str = "adadim-sandbox-ready";

/// Runs inside the new namespaces as their root: `$1` sandbox dir, `$2` its size limit, `$3`
/// mount, `$4` setpriv, the rest the Python command. Mount points it cannot even stat are
/// unreachable for the program too (same credentials, fewer capabilities): left alone.
const LAUNCHER: &str = r#"set -u
sandbox=$1; size=$2; mount=$3; setpriv=$4; shift 4
while read -r _ _ _ _ mp _; do
  [ -e "$mp" ] || continue
  "$mount" -o remount,bind,ro "$mp" || { echo "adadim-sandbox: cannot make $mp read-only" >&2; exit 97; }
done < /proc/self/mountinfo
"$mount" -t tmpfs -o ro,nosuid,noexec,size=4k,mode=755 none /dev || exit 97
"$mount" -t tmpfs -o nosuid,nodev,size="$size",mode=700 none "$sandbox" || exit 97
cd "$sandbox" || exit 97
echo adadim-sandbox-ready
unset PWD OLDPWD
exec "$setpriv" --no-new-privs --bounding-set=-all --inh-caps=-all --ambient-caps=-all "$@"
"#;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The isolation cannot be set up here; nothing was run.
    #[error("no sandbox for untrusted code: {what}: {msg} (refusing to run model-written code without it)")]
    Unavailable { what: String, msg: String },
    #[error("sandbox: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, SandboxError>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let context = context.into();
    move |source| SandboxError::Io { context, source }
}

/// What one run may use.
#[derive(Clone, Debug)]
pub struct Limits {
    pub wall: Duration,
    /// Address space (`RLIMIT_AS`), bytes.
    pub memory: u64,
    /// CPU seconds (`RLIMIT_CPU`).
    pub cpu_s: u64,
    /// Largest file it may write, its captured output included (`RLIMIT_FSIZE`), bytes.
    pub file_size: u64,
    /// Processes of the sandbox user (`RLIMIT_NPROC`; applied when running as `nobody`).
    pub processes: u64,
    /// Size of the writable working directory (a tmpfs), bytes.
    pub dir_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall: Duration::from_secs(5),
            memory: 1 << 30,
            cpu_s: 6,
            file_size: 16 << 20,
            processes: 256,
            dir_size: 64 << 20,
        }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Passed,
    Failed,
    /// Killed at the wall-clock limit, or by the CPU limit.
    Timeout,
    /// Python raised `MemoryError` (the address-space limit).
    MemoryLimit,
}

#[derive(Clone, Debug)]
pub struct RunResult {
    pub outcome: Outcome,
    /// The last few kB of stdout and stderr (interleaved).
    pub output: String,
    pub seconds: f64,
}

/// Tools found and checked once; [`Sandbox::run_python`] for each program.
#[derive(Clone, Debug)]
pub struct Sandbox {
    python: PathBuf,
    unshare: PathBuf,
    setpriv: PathBuf,
    mount: PathBuf,
    sh: PathBuf,
    pub limits: Limits,
    /// As root: run as this (uid, gid), `nobody`.
    drop_to: Option<(u32, u32)>,
}

impl Sandbox {
    /// Find the tools and a Python interpreter that runs in the sandbox (a trivial program
    /// must pass): any failure means there is no sandbox here.
    pub fn new(limits: Limits) -> Result<Self> {
        let tool = |name: &str| {
            which(name).ok_or_else(|| SandboxError::Unavailable {
                what: name.into(),
                msg: "not found in PATH or /usr/bin, /bin, /usr/sbin, /sbin (util-linux provides it)".into(),
            })
        };
        // SAFETY: geteuid has no preconditions.
        let drop_to = (unsafe { libc::geteuid() } == 0).then_some((65534, 65534));
        let mut sb = Sandbox {
            python: PathBuf::new(),
            unshare: tool("unshare")?,
            setpriv: tool("setpriv")?,
            mount: tool("mount")?,
            sh: tool("sh")?,
            limits,
            drop_to,
        };
        // The interpreter must be one `nobody` can run (a pyenv install under /root is not):
        // the one `python3` resolves to, else the system's.
        let mut tried = Vec::new();
        for python in [resolve_python()?, PathBuf::from("/usr/bin/python3")] {
            if tried.iter().any(|(p, _)| *p == python) || !python.is_file() {
                continue;
            }
            sb.python = python.clone();
            let probe = sb.run_python("print('probe')")?;
            if probe.outcome == Outcome::Passed && probe.output.contains("probe") {
                return Ok(sb);
            }
            tried.push((python, probe.output.trim().to_string()));
        }
        let msg = tried.iter().map(|(p, out)| format!("{}: {out}", p.display())).collect::<Vec<_>>().join("; ");
        Err(SandboxError::Unavailable {
            what: "python3 in the sandbox".into(),
            msg: format!("a trivial program did not run ({msg})"),
        })
    }

    /// The interpreter programs run with.
    pub fn python(&self) -> &Path {
        &self.python
    }

    /// Run `program` (Python source) in a fresh sandbox directory.
    pub fn run_python(&self, program: &str) -> Result<RunResult> {
        let root = tempfile::Builder::new()
            .prefix("adadim-sandbox-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        let result = self.run_in(root.path(), program);
        root.close().map_err(io("removing the sandbox directory"))?;
        result
    }

    fn run_in(&self, root: &Path, program: &str) -> Result<RunResult> {
        use std::os::unix::fs::PermissionsExt;
        let work = root.join("work");
        std::fs::create_dir(&work).map_err(io(format!("creating {}", work.display())))?;
        // Beside the working directory (read-only to the program), not in it.
        let script = root.join("program.py");
        std::fs::write(&script, program).map_err(io("writing program.py"))?;
        if self.drop_to.is_some() {
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
                .map_err(io(format!("chmod {}", root.display())))?;
        }
        let out_path = root.join("output.txt");
        let out = std::fs::File::create(&out_path).map_err(io("creating the output file"))?;
        let err = out.try_clone().map_err(io("duplicating the output file"))?;

        let mut cmd = Command::new(&self.unshare);
        cmd.args([
            "--user",
            "--map-root-user",
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--ipc",
            "--uts",
        ])
        .arg(&self.sh)
        .args(["-c", LAUNCHER, "adadim-sandbox"])
        .arg(&work)
        .arg(self.limits.dir_size.to_string())
        .arg(&self.mount)
        .arg(&self.setpriv)
        .arg(&self.python)
        .args(["-I", "-B"])
        .arg(&script)
        .current_dir(&work)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
        let limits = self.limits.clone();
        let drop_to = self.drop_to;
        // SAFETY: between fork and exec the closure only makes raw system calls
        // (setrlimit, prctl, setgroups, setresgid, setresuid), which are async-signal-safe, and
        // allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let set = |res, v: u64| {
                    let r = libc::rlimit { rlim_cur: v as libc::rlim_t, rlim_max: v as libc::rlim_t };
                    if libc::setrlimit(res, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                set(libc::RLIMIT_AS, limits.memory)?;
                set(libc::RLIMIT_CPU, limits.cpu_s)?;
                set(libc::RLIMIT_FSIZE, limits.file_size)?;
                set(libc::RLIMIT_CORE, 0)?;
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((uid, gid)) = drop_to {
                    set(libc::RLIMIT_NPROC, limits.processes)?;
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setresgid(gid, gid, gid) != 0
                        || libc::setresuid(uid, uid, uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| SandboxError::Unavailable { what: self.unshare.display().to_string(), msg: e.to_string() })?;
        let pgid = child.id() as libc::pid_t;
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = child.try_wait().map_err(io("waiting for the sandbox"))? {
                break s;
            }
            if start.elapsed() >= self.limits.wall {
                // SAFETY: kills the process group the child leads (process_group(0) above).
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
                timed_out = true;
                break child.wait().map_err(io("waiting for the sandbox"))?;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let seconds = start.elapsed().as_secs_f64();
        let (ready, output) = read_output(&out_path, 4096).map_err(io("reading the output"))?;
        if !ready {
            let msg = if timed_out {
                format!("not ready within {:?}", self.limits.wall)
            } else {
                format!("{status}: {}", output.trim())
            };
            return Err(SandboxError::Unavailable { what: "sandbox setup".into(), msg });
        }
        use std::os::unix::process::ExitStatusExt;
        let outcome = if timed_out || status.signal() == Some(libc::SIGXCPU) {
            Outcome::Timeout
        } else if status.success() {
            Outcome::Passed
        } else if output.contains("MemoryError") {
            Outcome::MemoryLimit
        } else {
            Outcome::Failed
        };
        Ok(RunResult { outcome, output, seconds })
    }
}

/// The real interpreter behind `$ADADIM_PYTHON` / `python3` (not a shim that needs the
/// environment, as pyenv's).
fn resolve_python() -> Result<PathBuf> {
    let launcher = std::env::var("ADADIM_PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&launcher).args(["-I", "-c", "import sys; print(sys.executable)"]).output() {
        Ok(o) if o.status.success() => Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
        Ok(o) => {
            Err(SandboxError::Unavailable { what: launcher, msg: String::from_utf8_lossy(&o.stderr).trim().into() })
        }
        Err(e) => Err(SandboxError::Unavailable { what: launcher, msg: e.to_string() }),
    }
}

/// Whether the output starts with the launcher's [`READY`] line, and the program's output
/// after it: whole, or its last `n` bytes.
fn read_output(path: &Path, n: u64) -> std::io::Result<(bool, String)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut head = vec![0u8; (READY.len() + 1).min(len as usize)];
    f.read_exact(&mut head)?;
    let ready = head == format!("{READY}\n").as_bytes();
    let from = if ready { head.len() as u64 } else { 0 };
    let start = from.max(len.saturating_sub(n));
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok((ready, if start > from { format!("[...]{text}") } else { text }))
}

/// An executable named `name` in `$PATH` or the usual system directories.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let system = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path).chain(system).map(|d| d.join(name)).find(|p| p.is_file())
}
