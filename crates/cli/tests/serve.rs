//! `adadim serve` as a client sees it: a real server process on a free loopback port, a small
//! packed model, requests over raw TCP (and the official `openai` Python client): the API's
//! shapes, the same greedy answers alone and batched, prompt scoring equal to `eval ppl`, and
//! a table of bad requests, each answered with a clear status while the server goes on.

mod common;
use common::adadim;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use adadim_load::synth::{tiny_config, write_random_checkpoint};
use serde_json::{json, Value};

const KEY: &str = "test-key-123";

/// SmolLM2's ChatML template, so chat requests have one to go through.
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A tiny random model (with a chat template), packed at 4 bits, groups of 16, per-OC.
fn packed_model(dir: &Path) -> PathBuf {
    let float = dir.join("float");
    let mut cfg = tiny_config();
    cfg.max_position_embeddings = Some(512);
    write_random_checkpoint(&float, &cfg, 5).unwrap();
    let config = float.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["max_position_embeddings"] = json!(512);
    std::fs::write(&config, c.to_string()).unwrap();
    std::fs::write(float.join("tokenizer_config.json"), json!({"chat_template": CHATML}).to_string()).unwrap();
    let out = dir.join("tiny-w4");
    let (code, _, err) = adadim(&[
        "quantize",
        "--model",
        float.to_str().unwrap(),
        "--method",
        "rtn",
        "--dim",
        "oc",
        "--bits",
        "4",
        "--group",
        "16",
        "--format",
        "packed",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    if !out.join("tokenizer_config.json").exists() {
        std::fs::copy(float.join("tokenizer_config.json"), out.join("tokenizer_config.json")).unwrap();
    }
    out
}

/// A running `adadim serve`, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_adadim"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--name", "tiny"])
            .args(extra)
            .env("ADADIM_HOME", std::env::temp_dir().join("adadim-test-home"))
            .env_remove("ADADIM_API_KEY")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("serve exited before listening").unwrap();
            if let Some(rest) = line.split("on http://").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, addr }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, b) = request(
            self.addr,
            "POST",
            path,
            &[("Authorization", &format!("Bearer {KEY}"))],
            body.to_string().as_bytes(),
        );
        (s, serde_json::from_str(&b).unwrap_or(Value::String(b)))
    }

    fn get(&self, path: &str) -> (u16, String) {
        request(self.addr, "GET", path, &[("Authorization", &format!("Bearer {KEY}"))], b"")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on its own connection: status and body (de-chunked).
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A large body may be refused before it is all sent: the answer still comes.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The `data:` payloads of a server-sent event stream.
fn events(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let m = packed_model(d.path());
    (d, m)
}

#[test]
fn completions_chat_and_streams_have_the_openai_shapes() {
    let (_d, m) = setup();
    let srv = Server::start(&m, &["--api-key", KEY, "--ctx", "256"]);
    assert_eq!(request(srv.addr, "GET", "/health", &[], b""), (200, "{\"status\":\"ok\"}".into()));
    let (s, models) = srv.get("/v1/models");
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_str::<Value>(&models).unwrap()["data"][0]["id"], "tiny");
    let (s, r) = srv
        .post("/v1/completions", &json!({"model": "tiny", "prompt": "hello there", "max_tokens": 9, "temperature": 0}));
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 9);
    assert_eq!(r["usage"]["prompt_tokens"], 11, "byte-level tokens of 'hello there'");
    let text = r["choices"][0]["text"].as_str().unwrap().to_string();
    // Streamed: the same text in pieces, then the finish reason, then [DONE].
    let (s, body) = request(
        srv.addr,
        "POST",
        "/v1/completions",
        &[("Authorization", &format!("Bearer {KEY}"))],
        json!({"model": "tiny", "prompt": "hello there", "max_tokens": 9, "temperature": 0, "stream": true})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(s, 200);
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");
    // Chat through the template; a stop string cuts the text and ends with "stop".
    let (s, r) = srv.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let chat_text = r["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    if let Some(stop) = chat_text.chars().nth(3).map(String::from) {
        let (s, r2) = srv.post(
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0, "stop": [stop.clone()]}),
        );
        assert_eq!(s, 200);
        let cut = r2["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(cut, &chat_text[..chat_text.find(&stop).unwrap()], "cut before the first {stop:?}");
        assert_eq!(r2["choices"][0]["finish_reason"], "stop");
    }
    // The metrics count what happened.
    let (s, metrics) = srv.get("/metrics");
    assert_eq!(s, 200);
    assert!(metrics.contains("adadim_requests_total{route=\"/v1/completions\",status=\"200\"} 2"), "{metrics}");
    assert!(metrics.contains("adadim_generated_tokens_total"), "{metrics}");
    assert!(metrics.contains("adadim_time_to_first_token_seconds_count"), "{metrics}");
}

#[test]
fn greedy_answers_are_the_same_alone_and_batched() {
    // Eight prompts of different lengths, greedy: one at a time, then from eight clients at
    // once (decoded together in 8 slots): the same tokens and the same log probabilities.
    let (_d, m) = setup();
    let srv = Server::start(&m, &["--api-key", KEY, "--parallel", "8", "--ctx", "256"]);
    let prompts: Vec<String> = (0..8).map(|i| "the cat sat on the mat. ".repeat(1 + i % 3) + &"x".repeat(i)).collect();
    let ask = |p: &str| {
        let (s, r) = srv.post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": p, "max_tokens": 24, "temperature": 0, "logprobs": 2}),
        );
        assert_eq!(s, 200, "{r}");
        (r["choices"][0]["text"].clone(), r["choices"][0]["logprobs"].clone())
    };
    let alone: Vec<_> = prompts.iter().map(|p| ask(p)).collect();
    for _round in 0..2 {
        let batched: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = prompts.iter().map(|p| s.spawn(|| ask(p))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(batched, alone);
    }
    let (_, metrics) = srv.get("/metrics");
    let steps: f64 =
        metrics.lines().find_map(|l| l.strip_prefix("adadim_decode_steps_total ")).unwrap().parse().unwrap();
    let tokens: f64 =
        metrics.lines().find_map(|l| l.strip_prefix("adadim_generated_tokens_total ")).unwrap().parse().unwrap();
    assert!(tokens / steps > 1.2, "sequences were decoded together: {tokens} tokens in {steps} steps");
}

#[test]
fn echoed_prompt_logprobs_equal_eval_ppl() {
    // The prompt's log-likelihood from echo + logprobs (max_tokens 0) against `eval ppl` on the
    // same tokens: one window of 64 tokens of a text.
    let (d, m) = setup();
    let text = d.path().join("text.txt");
    std::fs::write(&text, "It was the best of times, it was the worst of times, it was the age of wisdom. ".repeat(4))
        .unwrap();
    let (code, out, err) = adadim(&[
        "eval",
        "ppl",
        "--model",
        m.to_str().unwrap(),
        "--dataset",
        text.to_str().unwrap(),
        "--seqlen",
        "64",
        "--limit",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let ppl: Value = serde_json::from_str(&out).unwrap();
    let tok = adadim_load::tokenizer::load(&m).unwrap();
    let ids = adadim_eval::ppl::tokenize(&tok, &std::fs::read_to_string(&text).unwrap(), "text").unwrap();
    let srv = Server::start(&m, &["--api-key", KEY, "--ctx", "128"]);
    let (s, r) = srv.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": ids[..64], "max_tokens": 0, "echo": true, "logprobs": 1}),
    );
    assert_eq!(s, 200, "{r}");
    let lp = r["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 64);
    assert!(lp[0].is_null());
    let nll = -lp[1..].iter().map(|v| v.as_f64().unwrap()).sum::<f64>() / 63.0;
    let want = ppl["mean_nll"].as_f64().unwrap();
    assert!((nll - want).abs() < 1e-4, "echo mean NLL {nll} vs eval ppl {want}");
    assert_eq!(r["usage"]["completion_tokens"], 0);
}

#[test]
fn bad_requests_get_clear_answers_and_the_server_goes_on() {
    let (_d, m) = setup();
    let srv = Server::start(&m, &["--api-key", KEY, "--ctx", "64", "--max-body", "100000"]);
    let auth = format!("Bearer {KEY}");
    let ok = [("Authorization", auth.as_str())];
    let post = |body: &[u8], headers: &[(&str, &str)]| request(srv.addr, "POST", "/v1/completions", headers, body);
    // (what, body, headers, status, a phrase of the message)
    type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("malformed JSON", b"{\"model\": \"tiny\", \"prompt\": ".to_vec(), ok.to_vec(), 400, "not valid JSON"),
        (
            "wrong type",
            json!({"model": "tiny", "prompt": "x", "max_tokens": "many"}).to_string().into(),
            ok.to_vec(),
            400,
            "`max_tokens` must be an integer",
        ),
        (
            "wrong temperature",
            json!({"model": "tiny", "prompt": "x", "temperature": -1}).to_string().into(),
            ok.to_vec(),
            400,
            "`temperature` is -1",
        ),
        (
            "prompt over the context",
            json!({"model": "tiny", "prompt": "y".repeat(100), "max_tokens": 1}).to_string().into(),
            ok.to_vec(),
            400,
            "maximum context length is 64 tokens",
        ),
        (
            "max_tokens 0",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 0}).to_string().into(),
            ok.to_vec(),
            400,
            "at least 1",
        ),
        (
            "max_tokens huge",
            json!({"model": "tiny", "prompt": "x", "max_tokens": 1u64 << 40}).to_string().into(),
            ok.to_vec(),
            400,
            "maximum context length",
        ),
        (
            "stop list too long",
            json!({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).to_string().into(),
            ok.to_vec(),
            400,
            "at most 4",
        ),
        (
            "unknown model",
            json!({"model": "gpt-9", "prompt": "x"}).to_string().into(),
            ok.to_vec(),
            404,
            "`gpt-9` does not exist",
        ),
        ("missing key", json!({"model": "tiny", "prompt": "x"}).to_string().into(), vec![], 401, "missing API key"),
        (
            "wrong key",
            json!({"model": "tiny", "prompt": "x"}).to_string().into(),
            vec![("Authorization", "Bearer nope")],
            401,
            "incorrect API key",
        ),
        (
            "token id past the vocabulary",
            json!({"model": "tiny", "prompt": [1, 2, 99999]}).to_string().into(),
            ok.to_vec(),
            400,
            "token id 99999",
        ),
        (
            "body over the limit",
            [b"{\"model\": \"tiny\", \"prompt\": \"".as_slice(), &vec![b'z'; 10 << 20], b"\"}"].concat(),
            ok.to_vec(),
            413,
            "over 100000 bytes",
        ),
    ];
    for (what, body, headers, status, needle) in &cases {
        let (s, b) = post(body, headers);
        assert_eq!(s, *status, "{what}: {b}");
        let e: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("{what}: not JSON: {b}"));
        let msg = e["error"]["message"].as_str().unwrap_or_else(|| panic!("{what}: no error message: {b}"));
        assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
    }
    // Chat: empty messages, a role that does not exist.
    let (s, e) = srv.post("/v1/chat/completions", &json!({"model": "tiny", "messages": []}));
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("messages")), "{e}");
    let (s, e) =
        srv.post("/v1/chat/completions", &json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}));
    assert_eq!((s, e["error"]["param"].as_str()), (400, Some("messages[0].role")), "{e}");
    // 100 connections opened and left idle, and a client that hangs up mid-stream: the server
    // still answers, and the abandoned sequence's slot is freed.
    let idle: Vec<TcpStream> = (0..100).map(|_| TcpStream::connect(srv.addr).unwrap()).collect();
    {
        let mut s = TcpStream::connect(srv.addr).unwrap();
        let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 60, "stream": true}).to_string();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 64];
        s.read_exact(&mut first).unwrap();
    }
    let start = Instant::now();
    loop {
        let (_, metrics) = srv.get("/metrics");
        let active: u64 =
            metrics.lines().find_map(|l| l.strip_prefix("adadim_active_sequences ")).unwrap().parse().unwrap();
        if active == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the abandoned stream still holds its slot: {metrics}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(request(srv.addr, "GET", "/health", &[], b"").0, 200);
    let (s, r) = srv.post("/v1/completions", &json!({"model": "tiny", "prompt": "still there?", "max_tokens": 3}));
    assert_eq!(s, 200, "{r}");
    drop(idle);
}

#[test]
fn a_full_queue_answers_503_and_sigterm_exits_cleanly() {
    let (_d, m) = setup();
    let mut srv = Server::start(
        &m,
        &["--api-key", KEY, "--parallel", "1", "--queue", "1", "--ctx", "512", "--shutdown-timeout", "20"],
    );
    // Sixteen clients at once on one slot and one queue place: some wait, the rest are told
    // 503; nobody fails otherwise.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| srv.post("/v1/completions", &json!({"model": "tiny", "prompt": "go", "max_tokens": 400})).0)
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200 || s == 503), "{statuses:?}");
    assert!(statuses.contains(&503) && statuses.contains(&200), "{statuses:?}");
    // SIGTERM once a stream has begun (its first chunk read): the stream still finishes whole,
    // then the process exits 0.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = json!({"model": "tiny", "prompt": "go", "max_tokens": 480, "stream": true}).to_string();
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("data: {") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream closed before its first chunk");
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(srv.child.id() as i32, libc::SIGTERM) };
    s.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen).into_owned();
    let body = dechunk(text.split_once("\r\n\r\n").unwrap().1);
    let ev = events(&body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{body}");
    let last: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "finished, not cancelled: {last}");
    let streamed: String = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(!streamed.is_empty());
    let status = srv.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_openai_python_client_drives_the_server() {
    let has_client = Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|s| s.success());
    if !has_client {
        // CI installs the pinned client (.ci/run); a developer without it is told, not failed.
        assert!(std::env::var_os("CI").is_none(), "CI must have the openai package (pip install openai==2.8.1)");
        eprintln!("skipped: python3 -c 'import openai' failed (pip install openai==2.8.1)");
        return;
    }
    let (_d, m) = setup();
    let srv = Server::start(&m, &["--api-key", KEY, "--ctx", "256", "--parallel", "2"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out =
        Command::new("python3").arg(script).args([&format!("http://{}/v1", srv.addr), KEY, "tiny"]).output().unwrap();
    let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai client failed:\n{so}\n{se}");
    assert!(so.contains("all checks passed"), "{so}");
}
