//! The HumanEval sandbox against programs that misbehave: each one really runs in python3.
//! Where this machine has no user namespaces (the sandbox then refuses to run anything), the
//! tests print why and skip; where it has them, the sandbox must build.

use adadim_eval::humaneval::{evaluate, program, Completer, Problem};
use adadim_eval::sandbox::{Limits, Outcome, Sandbox};
use std::time::{Duration, Instant};

fn sandbox(limits: Limits) -> Option<Sandbox> {
    let userns = std::process::Command::new("unshare").args(["--user", "--map-root-user", "--net", "true"]).status();
    if !userns.is_ok_and(|s| s.success()) {
        eprintln!("skipping: `unshare --user --map-root-user --net true` fails here (no user namespaces), so there is no sandbox");
        return None;
    }
    Some(Sandbox::new(limits).unwrap())
}

fn quick() -> Limits {
    Limits { wall: Duration::from_secs(3), cpu_s: 4, ..Limits::default() }
}

fn problem(body: &str) -> Problem {
    Problem {
        task_id: "Test/0".into(),
        prompt: "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n".into(),
        entry_point: "add".into(),
        canonical_solution: body.into(),
        test: "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n".into(),
    }
}

fn run(sb: &Sandbox, body: &str) -> adadim_eval::sandbox::RunResult {
    let p = problem(body);
    sb.run_python(&program(&p, body)).unwrap()
}

#[test]
fn a_correct_completion_passes_and_a_wrong_one_fails() {
    let Some(sb) = sandbox(quick()) else { return };
    assert_eq!(run(&sb, "    return a + b\n").outcome, Outcome::Passed);
    let r = run(&sb, "    return a - b\n");
    assert_eq!(r.outcome, Outcome::Failed);
    assert!(r.output.contains("AssertionError"), "{}", r.output);
    // pass@1 over both, through the same path the CLI takes.
    let problems = [problem("    return a + b\n"), problem("    return a * b\n")];
    let report = evaluate(&problems, &Completer::Canonical, &sb, &mut |_, _, _| {}).unwrap();
    assert_eq!((report.problems, report.passed, report.failed, report.pass_at_1), (2, 1, 1, 0.5));
}

#[test]
fn an_endless_loop_is_killed_at_the_time_limit() {
    let Some(sb) = sandbox(Limits { wall: Duration::from_secs(1), cpu_s: 30, ..Limits::default() }) else { return };
    let t = Instant::now();
    // A child in its own session keeps running too unless the PID namespace takes it down.
    let r = run(&sb, "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n    while True:\n        pass\n");
    assert_eq!(r.outcome, Outcome::Timeout, "{}", r.output);
    assert!(t.elapsed() < Duration::from_secs(10), "killed promptly: {:?}", t.elapsed());
}

#[test]
fn allocating_8_gb_is_stopped_by_the_memory_limit() {
    let Some(sb) = sandbox(quick()) else { return };
    let r = run(&sb, "    x = bytearray(8 * 1024 ** 3)\n    return a + b\n");
    assert_eq!(r.outcome, Outcome::MemoryLimit, "{}", r.output);
}

#[test]
fn writes_outside_the_sandbox_directory_fail() {
    let Some(sb) = sandbox(quick()) else { return };
    let outside = tempfile::tempdir().unwrap();
    std::fs::set_permissions(outside.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let target = outside.path().join("escaped.txt");
    let body = format!(
        "    import os, ctypes\n    ok = []\n    open('inside.txt', 'w').write('fine')\n    ok.append(os.path.exists('inside.txt'))\n    libc = ctypes.CDLL(None, use_errno=True)\n    # MS_REMOUNT | MS_BIND = 32 | 4096: try to make / writable again\n    ok.append(libc.mount(None, b'/', None, 32 | 4096, None) == 0)\n    open({:?}, 'w').write('escaped')\n    return a + b\n",
        target.display().to_string()
    );
    let r = run(&sb, &body);
    assert_eq!(r.outcome, Outcome::Failed, "{}", r.output);
    assert!(r.output.contains("Read-only file system") || r.output.contains("Permission denied"), "{}", r.output);
    assert!(!target.exists(), "the program wrote {}", target.display());
}

#[test]
fn network_connections_fail_even_to_loopback() {
    let Some(sb) = sandbox(quick()) else { return };
    // A listener on this machine's loopback: reachable from here, not from the sandbox.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = format!(
        "    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n    return a + b\n"
    );
    let r = run(&sb, &body);
    assert_eq!(r.outcome, Outcome::Failed, "{}", r.output);
    assert!(
        r.output.contains("OSError") || r.output.contains("unreachable") || r.output.contains("refused"),
        "{}",
        r.output
    );
    assert!(listener.accept().is_err(), "no connection reached the listener");
}

#[test]
fn the_environment_is_empty_and_the_directory_is_removed() {
    let Some(sb) = sandbox(quick()) else { return };
    // LC_CTYPE is Python's own doing (PEP 538 coerces the C locale), not inherited.
    let body = "    import os, sys\n    print('ENV', sorted(k for k in os.environ if k != 'LC_CTYPE'))\n    print('CWD', os.getcwd())\n    print('FLAGS', sys.flags.isolated)\n    return a + b\n";
    let r = run(&sb, body);
    assert_eq!(r.outcome, Outcome::Passed, "{}", r.output);
    assert!(r.output.contains("ENV []") && r.output.contains("FLAGS 1"), "{}", r.output);
    let cwd = r.output.lines().find_map(|l| l.strip_prefix("CWD ")).unwrap();
    assert!(cwd.contains("adadim-sandbox-"), "{cwd}");
    assert!(!std::path::Path::new(cwd).exists(), "{cwd} removed afterwards");
}

#[test]
fn filling_the_working_directory_stops_at_its_size() {
    let Some(sb) = sandbox(Limits { dir_size: 8 << 20, ..quick() }) else { return };
    let r = run(&sb, "    for i in range(4):\n        open(f'f{i}', 'wb').write(bytes(4 << 20))\n    return a + b\n");
    assert_eq!(r.outcome, Outcome::Failed, "{}", r.output);
    assert!(r.output.contains("No space left on device"), "{}", r.output);
}

#[test]
fn model_completions_are_the_greedy_text_cut_at_the_first_stop_sequence() {
    use adadim_eval::humaneval::truncate_at_stop;
    let Some(sb) = sandbox(quick()) else { return };
    let d = tempfile::tempdir().unwrap();
    adadim_load::synth::write_random_checkpoint(d.path(), &adadim_load::synth::tiny_config(), 5).unwrap();
    let tok = adadim_load::tokenizer::load(d.path()).unwrap();
    let model =
        adadim_model::Model::load(&adadim_load::Checkpoint::open(d.path()).unwrap(), 256, &mut |_, _| {}).unwrap();
    let problems =
        [problem("unused"), Problem { prompt: "def add(a, b):\n    return a +".into(), ..problem("unused") }];
    for strip_prompt in [false, true] {
        let completer = Completer::Model { model: &model, tok: &tok, eos: vec![], max_tokens: 24, strip_prompt };
        let report = evaluate(&problems, &completer, &sb, &mut |_, _, _| {}).unwrap();
        for (p, r) in problems.iter().zip(&report.results) {
            // The same greedy tokens without any stop, decoded, then cut.
            let text = if strip_prompt { p.prompt.trim() } else { p.prompt.as_str() };
            let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
            let mut all = Vec::new();
            adadim_run::generate(
                &model,
                &ids,
                &[],
                &adadim_run::Settings { max_tokens: 24, temperature: 0.0, seed: 0 },
                &mut |t| all.push(t),
            )
            .unwrap();
            let full = tok.decode(&all, true).unwrap();
            assert_eq!(r.completion, truncate_at_stop(&full), "strip {strip_prompt}");
            assert!(r.generated_tokens <= 24 && r.generated_tokens >= 1);
            assert_ne!(r.outcome, Outcome::Passed, "random weights do not write add()");
        }
    }
}
