//! `adadim quantize` killed (SIGKILL, abort) part way continues from its last finished block
//! when run again with the same arguments, and ends with the bytes of a run never interrupted;
//! other settings over an interrupted run are refused with a clear error; and the output does
//! not depend on the number of threads.

use adadim_load::fetch::sha256_file;
use adadim_load::synth::{tiny_config, write_random_checkpoint, Rng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn adadim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_adadim"));
    c.env("ADADIM_HOME", std::env::temp_dir().join("adadim-test-home"));
    c.env_remove("ADADIM_TEST_ABORT_AFTER_BLOCK").env_remove("ADADIM_TEST_PAUSE_AFTER_BLOCK");
    c
}

/// Exit code (-1 when killed by a signal), stderr.
fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!se.contains("panicked"), "panic: {se}");
    (out.status.code().unwrap_or(-1), se)
}

struct Fixture {
    _d: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    text: PathBuf,
    layers: usize,
    /// `--bpw` in place of `--bits 3 --group 16`.
    bpw: Option<&'static str>,
}

fn fixture(layers: usize, hidden: usize, intermediate: usize) -> Fixture {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().to_path_buf();
    let mut cfg = tiny_config();
    cfg.num_hidden_layers = layers;
    cfg.hidden_size = hidden;
    cfg.intermediate_size = intermediate;
    write_random_checkpoint(&root.join("model"), &cfg, 7).unwrap();
    let text = root.join("calib.txt");
    std::fs::write(&text, "Now is the winter of our discontent made glorious summer by this sun of York. ".repeat(40))
        .unwrap();
    Fixture { model: root.join("model"), _d: d, root, text, layers, bpw: None }
}

impl Fixture {
    fn args(&self, out: &str, extra: &[&str]) -> Vec<String> {
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let mut a: Vec<String> = [
            "quantize",
            "--model",
            &s(&self.model),
            "--method",
            "gptq",
            "--dim",
            "ada",
            "--bits",
            "3",
            "--group",
            "16",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        if let Some(bpw) = self.bpw {
            a.truncate(a.len() - 4);
            a.extend(["--bpw", bpw].map(String::from));
        }
        a.extend(
            ["--calib", &s(&self.text), "--nsamples", "6", "--calib-seqlen", "48", "--out", &s(&self.root.join(out))]
                .map(String::from),
        );
        // `extra`: flags, each followed by its value unless it starts with `--` too; a flag
        // already there gets the new value.
        let mut i = 0;
        while i < extra.len() {
            let value = extra.get(i + 1).filter(|v| !v.starts_with("--"));
            match (a.iter().position(|x| x == extra[i]), value) {
                (Some(p), Some(v)) => a[p + 1] = v.to_string(),
                (_, v) => a.extend(std::iter::once(extra[i]).chain(v.copied()).map(String::from)),
            }
            i += 1 + usize::from(value.is_some());
        }
        a
    }
    fn partial(&self, out: &str) -> PathBuf {
        self.root.join(format!(".{out}.partial"))
    }
    /// Blocks the interrupted run into `out` has saved.
    fn done(&self, out: &str) -> Option<usize> {
        let bytes = std::fs::read(self.partial(out).join("resume.json")).ok()?;
        serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["done"].as_u64().map(|d| d as usize)
    }
    fn sha(&self, out: &str) -> String {
        sha256_file(&self.root.join(out).join("model.safetensors")).unwrap()
    }
    /// Nothing at `out`, and nothing in its work directory that looks like a finished model.
    fn assert_unfinished(&self, out: &str) {
        assert!(!self.root.join(out).exists(), "{out} exists after an interrupted run");
        let p = self.partial(out);
        assert!(p.join("resume.json").exists(), "the interrupted run left its state");
        assert!(
            !p.join("model.safetensors").exists() && !p.join("report.json").exists() && !p.join("config.json").exists()
        );
        let (code, se) = run(adadim().args([
            "eval",
            "ppl",
            "--model",
            p.to_str().unwrap(),
            "--dataset",
            self.text.to_str().unwrap(),
            "--seqlen",
            "16",
        ]));
        assert_eq!(code, 1, "the work directory is not a model: {se}");
    }
    /// Run the same command again: it resumes (`resumed_at`: the block it says it continues
    /// at, 1-based; `layers + 1`: only the output was left to write) and ends with `want`.
    fn resume(&self, out: &str, resumed_at: Option<usize>, want: &str) {
        let (code, se) = run(adadim().args(self.args(out, &[])));
        assert_eq!(code, 0, "{se}");
        match resumed_at {
            Some(b) if b > self.layers => {
                assert!(se.contains(&format!("all {} blocks were finished", self.layers)), "{se}")
            }
            Some(b) => assert!(se.contains(&format!("resuming at block {b} of {}", self.layers)), "{se}"),
            None => assert!(!se.contains("resuming"), "{se}"),
        }
        assert_eq!(self.sha(out), want, "{out}: resumed output differs from the uninterrupted one");
        assert!(!self.partial(out).exists(), "work directory removed");
        // Every other file is the same too; report.json up to its clocks and memory.
        for f in ["config.json", "tokenizer.json"] {
            assert_eq!(
                sha256_file(&self.root.join(out).join(f)).unwrap(),
                sha256_file(&self.root.join("ref").join(f)).unwrap(),
                "{f}"
            );
        }
        assert_eq!(report_without_clocks(&self.root.join(out)), report_without_clocks(&self.root.join("ref")));
    }
}

/// report.json without what measures time or memory.
fn report_without_clocks(dir: &Path) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !(k.ends_with("_s") || k == "seconds" || k == "peak_rss_mb"));
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    strip(&mut v);
    v
}

/// A child process, killed (SIGKILL) when dropped: a failing test leaves none behind.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// SIGKILL, and wait for it (so that its PID is gone).
    fn kill(mut self) -> std::process::ExitStatus {
        self.0.kill().unwrap();
        self.0.wait().unwrap()
    }
}

/// Start the command into `out`; returns once `blocks` blocks are saved, the process
/// waiting (test hook) before the next.
fn start_and_wait_for(f: &Fixture, out: &str, blocks: usize) -> Running {
    let mut child = Running(
        adadim()
            .args(f.args(out, &[]))
            .env("ADADIM_TEST_PAUSE_AFTER_BLOCK", blocks.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while f.done(out) != Some(blocks) {
        assert!(child.0.try_wait().unwrap().is_none(), "exited before saving block {blocks}");
        assert!(t.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

#[test]
fn killed_runs_continue_and_end_with_the_same_bytes() {
    let f = fixture(5, 48, 80);
    let t = Instant::now();
    let (code, se) = run(adadim().args(f.args("ref", &[])));
    assert_eq!(code, 0, "{se}");
    let run_time = t.elapsed();
    let want = f.sha("ref");
    let mut rng = Rng::new(2024);

    // SIGKILL right after a (seeded) random block was saved.
    let k = 1 + (rng.next_u64() % (f.layers as u64 - 1)) as usize;
    start_and_wait_for(&f, "killed", k).kill();
    f.assert_unfinished("killed");
    assert!(f.partial("killed").join("lock").exists(), "a killed run leaves its lock, taken over below");
    f.resume("killed", Some(k + 1), &want);

    // SIGKILL after the last block, before the output is written.
    start_and_wait_for(&f, "last", f.layers).kill();
    f.assert_unfinished("last");
    f.resume("last", Some(f.layers + 1), &want);

    // abort() right after a block is saved (the hook the kill above stands in for).
    let j = 1 + (rng.next_u64() % (f.layers as u64 - 1)) as usize;
    let (code, _) = run(adadim().args(f.args("aborted", &[])).env("ADADIM_TEST_ABORT_AFTER_BLOCK", j.to_string()));
    assert_ne!(code, 0);
    assert_eq!(f.done("aborted"), Some(j));
    f.assert_unfinished("aborted");
    f.resume("aborted", Some(j + 1), &want);

    // SIGKILL at (seeded) random moments, wherever the run is: in a block, saving one,
    // writing the output. Re-running always ends with the same bytes.
    for i in 0..4 {
        let out = format!("random{i}");
        let child =
            Running(adadim().args(f.args(&out, &[])).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
        let delay = run_time.mul_f64((rng.next_u64() % 1000) as f64 / 1000.0);
        std::thread::sleep(delay);
        let status = child.kill();
        eprintln!(
            "{out}: killed after {delay:?} (a whole run: {run_time:?}): {status}, blocks saved {:?}",
            f.done(&out)
        );
        if status.success() {
            assert_eq!(f.sha(&out), want);
            continue;
        }
        if !f.root.join(&out).exists() {
            let (code, se) = run(adadim().args(f.args(&out, &[])));
            assert_eq!(code, 0, "{se}");
        }
        assert_eq!(f.sha(&out), want, "{out}: killed and re-run");
        if f.partial(&out).exists() {
            // Killed while deleting the work directory: the next run into `out` removes it.
            let (code, se) = run(adadim().args(f.args(&out, &[])));
            assert!(code == 1 && se.contains("removed"), "{se}");
            assert!(!f.partial(&out).exists());
        }
    }
}

#[test]
fn other_settings_over_an_interrupted_run_are_refused() {
    let f = fixture(3, 48, 80);
    let (code, _) = run(adadim().args(f.args("q", &[])).env("ADADIM_TEST_ABORT_AFTER_BLOCK", "1"));
    assert_ne!(code, 0);
    assert_eq!(f.done("q"), Some(1));

    // Other bits: refused, naming the directory, what differs and how to start over.
    let (code, se) = run(adadim().args(f.args("q", &["--bits", "4"])));
    assert_eq!(code, 1, "{se}");
    assert!(se.contains(".q.partial") && se.contains("bits: 3 -> 4") && se.contains("--restart"), "{se}");
    assert_eq!(se.trim().lines().count(), 1, "{se}");
    assert_eq!(f.done("q"), Some(1), "the interrupted run is left alone");
    // Other damping: a setting too (a resumed run must not mix two dampings).
    let (code, se) = run(adadim().args(f.args("q", &["--percdamp", "0.2"])));
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("percdamp") && se.contains("--restart"), "{se}");
    // Other calibration text: the tokens differ.
    let other = f.root.join("other.txt");
    std::fs::write(&other, "To be, or not to be, that is the question. ".repeat(60)).unwrap();
    let mut a = f.args("q", &[]);
    let i = a.iter().position(|x| x == "--calib").unwrap();
    a[i + 1] = other.to_str().unwrap().to_string();
    let (code, se) = run(adadim().args(&a));
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("tokens_sha256"), "{se}");

    // A second run while one is working on the same output: refused.
    let child_out = "busy";
    let child = start_and_wait_for(&f, child_out, 1);
    let (code, se) = run(adadim().args(f.args(child_out, &[])));
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("in use by another adadim process") && se.contains(&format!("pid {}", child.0.id())), "{se}");
    child.kill();
    // Once it is gone, its lock is stale: the same command takes over and continues.
    let (code, se) = run(adadim().args(f.args(child_out, &[])));
    assert_eq!(code, 0, "{se}");
    assert!(se.contains("resuming at block 2 of 3"), "{se}");

    // --restart discards the interrupted run: the result is a fresh bits-4 run's.
    let (code, se) = run(adadim().args(f.args("q", &["--bits", "4", "--restart"])));
    assert_eq!(code, 0, "{se}");
    assert!(!se.contains("resuming"), "{se}");
    let (code, se) = run(adadim().args(f.args("fresh", &["--bits", "4"])));
    assert_eq!(code, 0, "{se}");
    assert_eq!(f.sha("q"), f.sha("fresh"));
    // A finished output is never overwritten, --restart or not.
    let (code, se) = run(adadim().args(f.args("q", &["--restart"])));
    assert_eq!(code, 1);
    assert!(se.contains("already exists"), "{se}");
}

/// A run stopped after moving its model out but before deleting its work directory leaves
/// `.NAME.partial` beside the finished output: the next run into that output removes it (and
/// still refuses to overwrite the output); an interrupted run's state beside an output the
/// user made is kept.
#[test]
fn a_work_directory_left_beside_a_finished_output_is_removed() {
    let f = fixture(2, 48, 80);
    // An interrupted run's state (its staged `model` inside), then an output made by the user.
    let (code, _) = run(adadim().args(f.args("q", &[])).env("ADADIM_TEST_ABORT_AFTER_BLOCK", "1"));
    assert_ne!(code, 0);
    std::fs::create_dir(f.root.join("q")).unwrap();
    let (code, se) = run(adadim().args(f.args("q", &[])));
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("already exists") && !se.contains("removed"), "{se}");
    assert_eq!(f.done("q"), Some(1), "an interrupted run's state is kept");
    // The same state once its model was moved out: the remains of a finished run.
    std::fs::remove_dir_all(f.partial("q").join("model")).unwrap();
    let (code, se) = run(adadim().args(f.args("q", &[])));
    assert_eq!(code, 1, "{se}");
    assert!(se.contains("already exists") && se.contains("removed") && se.contains(".q.partial"), "{se}");
    assert!(!f.partial("q").exists() && f.root.join("q").is_dir());
    // A directory of the user's under the work name is never touched.
    std::fs::create_dir(f.partial("q")).unwrap();
    std::fs::write(f.partial("q").join("notes.txt"), "mine").unwrap();
    let (code, se) = run(adadim().args(f.args("q", &[])));
    assert_eq!(code, 1, "{se}");
    assert_eq!(std::fs::read_to_string(f.partial("q").join("notes.txt")).unwrap(), "mine");
}

#[test]
fn the_output_does_not_depend_on_the_thread_count() {
    // Wide enough that every matmul (candle / gemm forward, faer Hessians, GPTQ's updates)
    // takes its multi-threaded path, with ragged tiles.
    let f = fixture(2, 192, 344);
    let mut shas = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = format!("t{threads}");
        let (code, se) = run(adadim().args(f.args(&out, &["--group", "32"])).env("RAYON_NUM_THREADS", threads));
        assert_eq!(code, 0, "{se}");
        shas.push((threads, f.sha(&out)));
    }
    assert!(shas.iter().all(|s| s.1 == shas[0].1), "{shas:?}");
}

#[test]
fn a_bpw_run_killed_continues_with_its_saved_table_to_the_same_bytes() {
    let mut f = fixture(4, 48, 80);
    f.bpw = Some("3.3");
    let (code, se) = run(adadim().args(f.args("ref", &[])));
    assert_eq!(code, 0, "{se}");
    let want = f.sha("ref");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.root.join("ref").join("report.json")).unwrap()).unwrap();
    let got = report["summary"]["allocation"]["bpw"].as_f64().unwrap();
    assert!(got <= 3.3 && got > 3.0, "{got}");
    for l in report["linears"].as_array().unwrap() {
        assert!(l["layout"]["bits"].as_u64().is_some(), "{l}");
        assert!(l["candidates"].as_array().is_some_and(|c| c.len() == 4 * 4 * 2), "{l}");
    }
    start_and_wait_for(&f, "killed", 2).kill();
    f.assert_unfinished("killed");
    assert!(f.partial("killed").join("damage.json").exists(), "the table is saved with the blocks");
    f.resume("killed", Some(3), &want);
    // Budgets out of reach: a clear error naming the range, nothing left behind.
    for (bpw, why) in [("1", "reachable: "), ("9", "at most 8"), ("nan", "at most 8")] {
        let (code, se) = run(adadim().args(f.args("bad", &["--bpw", bpw])));
        assert_eq!(code, 1, "{bpw}: {se}");
        assert!(se.contains(why), "{bpw}: {se}");
        assert!(!f.root.join("bad").exists());
        let _ = std::fs::remove_dir_all(f.partial("bad"));
    }
}

#[test]
fn a_cached_table_that_does_not_cover_the_model_is_measured_again() {
    let mut f = fixture(2, 48, 80);
    f.bpw = Some("3.3");
    let home = f.root.join("home");
    let quantize = |out: &str| run(adadim().env("ADADIM_HOME", &home).args(f.args(out, &[])));
    let (code, se) = quantize("a");
    assert_eq!(code, 0, "{se}");
    let tables: Vec<PathBuf> =
        std::fs::read_dir(home.join("damage-tables")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(tables.len(), 1, "{tables:?}");
    // Valid JSON, one linear short: it must not be used (that linear would get no layout).
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tables[0]).unwrap()).unwrap();
    t["linears"].as_array_mut().unwrap().pop();
    std::fs::write(&tables[0], t.to_string()).unwrap();
    let (code, se) = quantize("b");
    assert_eq!(code, 0, "{se}");
    assert_eq!(f.sha("b"), f.sha("a"));
}
