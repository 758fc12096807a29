//! The HTTP side (axum on tokio): routes, the bearer key, body limits, request counting, and
//! the OpenAI response shapes, whole or streamed as server-sent events.
//!
//! | route | what |
//! |---|---|
//! | `GET /health` | `{"status": "ok"}`, without a key |
//! | `GET /metrics` | Prometheus text: requests, tokens, queue, slots, decode speed, time to first token |
//! | `GET /v1/models` | the one model served |
//! | `POST /v1/completions` | text or token-id prompt; `echo` + `logprobs` score the prompt |
//! | `POST /v1/chat/completions` | messages through the model's chat template |

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{self, ApiError, Limits, Prompt};
use crate::engine::{Event, Finish, Handle, Job, SubmitError, TokenLogprob};
use crate::text::TextStream;

/// What the server is told at start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The name `/v1/models` lists and requests must name.
    pub model_name: String,
    pub api_key: Option<String>,
    /// Largest request body, bytes.
    pub max_body: usize,
    pub limits: Limits,
    /// After SIGTERM, how long running requests may go on before they are cancelled.
    pub shutdown_timeout: Duration,
}

/// The model's text side: its tokenizer, chat template and end-of-sequence tokens.
pub struct Served {
    pub tokenizer: Arc<Tokenizer>,
    pub template: Option<adadim_run::ChatTemplate>,
    pub eos: Vec<u32>,
}

struct AppState {
    cfg: ServerConfig,
    served: Served,
    engine: Handle,
    http: HttpMetrics,
    next_id: AtomicU64,
}

type St = Arc<AppState>;

/// Request counts by route and status, and the time to first token.
#[derive(Default)]
struct HttpMetrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Histogram of seconds to the first token: counts per bucket bound, sum, count.
    ttft: Mutex<(Vec<u64>, f64, u64)>,
}

const TTFT_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl HttpMetrics {
    fn first_token(&self, s: f64) {
        let mut h = self.ttft.lock().unwrap_or_else(|e| e.into_inner());
        if h.0.is_empty() {
            h.0 = vec![0; TTFT_BUCKETS.len()];
        }
        for (c, &b) in h.0.iter_mut().zip(&TTFT_BUCKETS) {
            if s <= b {
                *c += 1;
            }
        }
        h.1 += s;
        h.2 += 1;
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// Serves on `listener` until `shutdown` resolves, then stops taking requests, lets running
/// ones finish for `shutdown_timeout`, cancels what is left and returns (the engine is told
/// to stop too).
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: ServerConfig,
    served: Served,
    engine: Handle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let timeout = cfg.shutdown_timeout;
    let max_body = cfg.max_body;
    let state: St = Arc::new(AppState {
        cfg,
        served,
        engine: engine.clone(),
        http: HttpMetrics::default(),
        next_id: AtomicU64::new(1),
    });
    let keyed = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let app = Router::new()
        .merge(keyed)
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(|| async { ApiError::new(404, "invalid_request_error", Some("not_found"), "no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state);
    let stopping = engine.clone();
    let graceful = async move {
        shutdown.await;
        stopping.stop_accepting();
        let e = stopping.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            e.cancel_all();
        });
    };
    let served = axum::serve(listener, app).with_graceful_shutdown(graceful).await;
    engine.cancel_all();
    served
}

/// The bearer key, where one is set, compared in constant time.
async fn auth(State(st): State<St>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.as_bytes(), key.as_bytes()) {
            let msg = if given.is_empty() {
                "missing API key: send the header `Authorization: Bearer KEY`"
            } else {
                "incorrect API key"
            };
            return ApiError::new(401, "invalid_request_error", Some("invalid_api_key"), msg).into_response();
        }
    }
    next.run(req).await
}

/// Equal bytes, in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// Counts each answer by route and status.
async fn count(State(st): State<St>, req: HttpRequest, next: Next) -> Response {
    let path = match req.uri().path() {
        p @ ("/health" | "/metrics" | "/v1/models" | "/v1/completions" | "/v1/chat/completions") => p.to_string(),
        _ => "other".to_string(),
    };
    let r = next.run(req).await;
    *st.http.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((path, r.status().as_u16())).or_default() += 1;
    r
}

async fn models(State(st): State<St>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": st.cfg.model_name, "object": "model", "created": 0, "owned_by": "adadim"}]}),
    )
}

async fn metrics(State(st): State<St>) -> Response {
    let m = &st.engine.metrics;
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, v) in lines {
            out.push_str(&format!("{name}{labels} {v}\n"));
        }
    };
    let requests = st.http.requests.lock().unwrap_or_else(|e| e.into_inner()).clone();
    put(
        "adadim_requests_total",
        "counter",
        "HTTP requests answered, by route and status.",
        requests.iter().map(|((p, s), n)| (format!("{{route=\"{p}\",status=\"{s}\"}}"), n.to_string())).collect(),
    );
    let one = |v: String| vec![(String::new(), v)];
    put(
        "adadim_prompt_tokens_total",
        "counter",
        "Prompt tokens taken in.",
        one(m.prompt_tokens.load(Relaxed).to_string()),
    );
    put(
        "adadim_generated_tokens_total",
        "counter",
        "Tokens generated.",
        one(m.generated_tokens.load(Relaxed).to_string()),
    );
    put("adadim_queue_length", "gauge", "Requests waiting for a slot.", one(m.queued.load(Relaxed).to_string()));
    put("adadim_active_sequences", "gauge", "Sequences in slots.", one(m.active.load(Relaxed).to_string()));
    put("adadim_slots", "gauge", "Slots (--parallel).", one(st.engine.config.parallel.to_string()));
    put(
        "adadim_decode_tokens_per_second",
        "gauge",
        "Tokens per second of the recent decode steps, all sequences together.",
        one(format!("{:.3}", f64::from_bits(m.recent_tokens_per_s.load(Relaxed)))),
    );
    put("adadim_decode_steps_total", "counter", "Batched decode steps.", one(m.decode_steps.load(Relaxed).to_string()));
    put(
        "adadim_decode_seconds_total",
        "counter",
        "Seconds in decode steps.",
        one(format!("{:.6}", m.decode_us.load(Relaxed) as f64 * 1e-6)),
    );
    put(
        "adadim_prefill_seconds_total",
        "counter",
        "Seconds in prompt processing.",
        one(format!("{:.6}", m.prefill_us.load(Relaxed) as f64 * 1e-6)),
    );
    put(
        "adadim_cancelled_total",
        "counter",
        "Sequences ended early because their receiver left: the client hung up, or a stop string matched.",
        one(m.cancelled.load(Relaxed).to_string()),
    );
    let (buckets, sum, n) = st.http.ttft.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut lines: Vec<(String, String)> = TTFT_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, b)| (format!("_bucket{{le=\"{b}\"}}"), buckets.get(i).copied().unwrap_or(0).to_string()))
        .collect();
    lines.push(("_bucket{le=\"+Inf\"}".into(), n.to_string()));
    lines.push(("_sum".into(), format!("{sum:.6}")));
    lines.push(("_count".into(), n.to_string()));
    put(
        "adadim_time_to_first_token_seconds",
        "histogram",
        "Seconds from a request's arrival to its first token.",
        lines,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The body as JSON, or the error that says why not.
fn parse(body: Result<Bytes, BytesRejection>, max: usize) -> Result<Value, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                413,
                "invalid_request_error",
                Some("request_too_large"),
                format!("the request body is over {max} bytes"),
            )
        } else {
            ApiError::invalid("body", format!("could not read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not valid JSON: {e}")))
}

/// A job queued for a checked request, and the receiver of its events.
struct Queued {
    rx: UnboundedReceiver<Event>,
    prompt: Vec<u32>,
    arrived: Instant,
    id: String,
    created: u64,
}

fn queue(
    st: &St,
    r: &api::Request,
    prompt: Vec<u32>,
    max_tokens: usize,
    prefix: &str,
    arrived: Instant,
) -> Result<Queued, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let n = st.next_id.fetch_add(1, Relaxed);
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let job = Job {
        prompt: prompt.clone(),
        max_tokens,
        temperature: r.temperature,
        top_p: r.top_p,
        seed: r.seed.unwrap_or_else(|| created ^ n.wrapping_mul(0x9e37_79b9)),
        stop_ids: if r.ignore_eos { Vec::new() } else { st.served.eos.clone() },
        logprobs: r.logprobs,
        prompt_logprobs: if r.echo { r.logprobs } else { None },
        events: tx,
    };
    st.engine.submit(job).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::new(
            503,
            "server_error",
            Some("queue_full"),
            format!(
                "all {} slots are busy and {} requests are waiting: try again shortly",
                st.engine.config.parallel, st.engine.config.queue
            ),
        ),
        SubmitError::ShuttingDown => {
            ApiError::new(503, "server_error", Some("shutting_down"), "the server is shutting down")
        }
    })?;
    Ok(Queued { rx, prompt, arrived, id: format!("{prefix}-{n}"), created })
}

fn check_model(st: &St, r: &api::Request) -> Result<(), ApiError> {
    if r.model != st.cfg.model_name {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                404,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model `{}` does not exist: this server serves `{}`", r.model, st.cfg.model_name),
            )
        });
    }
    Ok(())
}

fn tokenize(st: &St, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    st.served
        .tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| ApiError::invalid(param, format!("could not tokenize `{param}`: {e}")))
}

async fn completions(State(st): State<St>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let run = async {
        let r = api::completion(&parse(body, st.cfg.max_body)?, &st.cfg.limits)?;
        check_model(&st, &r)?;
        let prompt = match &r.prompt {
            Prompt::Text(t) => tokenize(&st, t, "prompt")?,
            Prompt::Tokens(ids) => {
                let vocab = st.served.tokenizer.get_vocab_size(true) as u32;
                if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                    return Err(ApiError::invalid(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {vocab}"),
                    ));
                }
                ids.clone()
            }
        };
        let max_tokens = api::budget(&r, prompt.len(), false, &st.cfg.limits)?;
        let q = queue(&st, &r, prompt, max_tokens, "cmpl", arrived)?;
        Ok::<_, ApiError>((r, q))
    };
    match run.await {
        Err(e) => e.into_response(),
        Ok((r, q)) if r.stream => Sse::new(stream_completion(st, r, q, false)).into_response(),
        Ok((r, q)) => whole(st, r, q, false).await,
    }
}

async fn chat(State(st): State<St>, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let run = async {
        let (turns, r) = api::chat(&parse(body, st.cfg.max_body)?, &st.cfg.limits)?;
        check_model(&st, &r)?;
        let turns: Vec<(&str, &str)> = turns.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let text = match &st.served.template {
            Some(t) => t.render_messages(&turns),
            None => {
                return Err(ApiError::new(
                    400,
                    "invalid_request_error",
                    Some("no_chat_template"),
                    "this model has no ChatML chat template: use /v1/completions",
                ))
            }
        };
        let prompt = tokenize(&st, &text, "messages")?;
        let max_tokens = api::budget(&r, prompt.len(), true, &st.cfg.limits)?;
        let q = queue(&st, &r, prompt, max_tokens, "chatcmpl", arrived)?;
        Ok::<_, ApiError>((r, q))
    };
    match run.await {
        Err(e) => e.into_response(),
        Ok((r, q)) if r.stream => Sse::new(stream_completion(st, r, q, true)).into_response(),
        Ok((r, q)) => whole(st, r, q, true).await,
    }
}

/// A token's text as the API shows it.
fn piece(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Completions' `logprobs` object for `tokens` (prompt tokens without a log probability first
/// where echoed), text offsets counted in characters from `offset0`.
fn legacy_logprobs(tok: &Tokenizer, tokens: &[(u32, Option<&TokenLogprob>)], offset0: usize) -> Value {
    let mut offset = offset0;
    let (mut names, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for &(id, lp) in tokens {
        let name = piece(tok, id);
        offsets.push(offset);
        offset += name.chars().count();
        names.push(name);
        lps.push(lp.map(|l| json!(l.logprob)).unwrap_or(Value::Null));
        tops.push(
            lp.map_or(Value::Null, |l| Value::Object(l.top.iter().map(|&(t, p)| (piece(tok, t), json!(p))).collect())),
        );
    }
    json!({"tokens": names, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Chat's `logprobs.content` entries.
fn chat_logprobs(tok: &Tokenizer, tokens: &[(u32, Option<&TokenLogprob>)]) -> Vec<Value> {
    let entry = |id: u32, lp: f64| {
        let t = piece(tok, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    tokens
        .iter()
        .filter_map(|&(id, lp)| lp.map(|l| (id, l)))
        .map(|(id, l)| {
            let mut e = entry(id, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|&(t, p)| entry(t, p)).collect());
            e
        })
        .collect()
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn finish_name(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// The whole answer once the job is done.
async fn whole(st: St, r: api::Request, mut q: Queued, is_chat: bool) -> Response {
    let tok = st.served.tokenizer.clone();
    let mut text = TextStream::new(tok.clone(), r.stop.clone());
    let (mut out, mut tokens, mut prompt_lp) = (String::new(), Vec::new(), None);
    let mut first = true;
    let finish = loop {
        match q.rx.recv().await {
            Some(Event::PromptLogprobs(lp)) => prompt_lp = Some(lp),
            Some(Event::Token { id, logprob }) => {
                if first {
                    st.http.first_token(q.arrived.elapsed().as_secs_f64());
                    first = false;
                }
                out.push_str(&text.push(id));
                tokens.push((id, logprob));
                if text.stopped() {
                    break Finish::Stop;
                }
            }
            Some(Event::Done(f)) => {
                out.push_str(&text.finish());
                break f;
            }
            Some(Event::Failed(msg)) => return ApiError::new(500, "server_error", None, msg).into_response(),
            None => return ApiError::new(500, "server_error", None, "the engine stopped").into_response(),
        }
    };
    let n = tokens.len();
    let gen: Vec<(u32, Option<&TokenLogprob>)> = tokens.iter().map(|(i, l)| (*i, l.as_ref())).collect();
    let body = if is_chat {
        let logprobs = r.logprobs.map_or(Value::Null, |_| json!({"content": chat_logprobs(&tok, &gen)}));
        json!({
            "id": q.id, "object": "chat.completion", "created": q.created, "model": st.cfg.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out}, "logprobs": logprobs, "finish_reason": finish_name(finish)}],
            "usage": usage(q.prompt.len(), n),
        })
    } else {
        let prompt_text = if r.echo { tok.decode(&q.prompt, false).unwrap_or_default() } else { String::new() };
        let logprobs = r.logprobs.map_or(Value::Null, |_| {
            let mut all: Vec<(u32, Option<&TokenLogprob>)> = Vec::new();
            if r.echo {
                all.push((q.prompt[0], None));
                let lp = prompt_lp.as_deref().unwrap_or(&[]);
                all.extend(q.prompt[1..].iter().enumerate().map(|(i, &t)| (t, lp.get(i))));
            }
            all.extend(gen.iter().copied());
            legacy_logprobs(&tok, &all, 0)
        });
        json!({
            "id": q.id, "object": "text_completion", "created": q.created, "model": st.cfg.model_name,
            "choices": [{"index": 0, "text": prompt_text + &out, "logprobs": logprobs, "finish_reason": finish_name(finish)}],
            "usage": usage(q.prompt.len(), n),
        })
    };
    Json(body).into_response()
}

/// What a stream carries from step to step.
struct Streaming {
    st: St,
    r: api::Request,
    q: Queued,
    text: TextStream,
    is_chat: bool,
    /// Tokens whose text has not been sent yet, with their logprobs.
    pending: Vec<(u32, Option<TokenLogprob>)>,
    generated: usize,
    /// Characters of completion text sent (completions' `text_offset`).
    offset: usize,
    opened: bool,
    /// What is left to send after the last chunk: the usage chunk, `[DONE]`.
    tail: Vec<String>,
    done: bool,
}

/// The answer as server-sent events: one chunk per piece of text (with its tokens' logprobs),
/// a last chunk with the finish reason, a usage chunk where asked, then `data: [DONE]`.
/// Dropping the stream (the client left) drops the receiver, and the engine frees the slot.
fn stream_completion(
    st: St,
    r: api::Request,
    q: Queued,
    is_chat: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let text = TextStream::new(st.served.tokenizer.clone(), r.stop.clone());
    let s = Streaming {
        st,
        r,
        q,
        text,
        is_chat,
        pending: Vec::new(),
        generated: 0,
        offset: 0,
        opened: false,
        tail: Vec::new(),
        done: false,
    };
    stream::unfold(s, |mut s| async move {
        loop {
            if s.done {
                if s.tail.is_empty() {
                    return None;
                }
                let next = s.tail.remove(0);
                return Some((Ok(SseEvent::default().data(next)), s));
            }
            if !s.opened && s.is_chat {
                s.opened = true;
                let chunk = s.chunk(json!({"role": "assistant", "content": ""}), None);
                return Some((Ok(SseEvent::default().data(chunk)), s));
            }
            let (piece, finish) = match s.q.rx.recv().await {
                Some(Event::PromptLogprobs(_)) => continue,
                Some(Event::Token { id, logprob }) => {
                    if s.generated == 0 {
                        s.st.http.first_token(s.q.arrived.elapsed().as_secs_f64());
                    }
                    s.generated += 1;
                    s.pending.push((id, logprob));
                    let p = s.text.push(id);
                    (p, s.text.stopped().then_some(Finish::Stop))
                }
                Some(Event::Done(f)) => (s.text.finish(), Some(f)),
                failed => {
                    let msg = match failed {
                        Some(Event::Failed(m)) => m,
                        _ => "the engine stopped".to_string(),
                    };
                    s.done = true;
                    s.tail = vec!["[DONE]".into()];
                    let e = ApiError::new(500, "server_error", None, msg);
                    return Some((Ok(SseEvent::default().data(e.body().to_string())), s));
                }
            };
            if piece.is_empty() && finish.is_none() {
                continue;
            }
            let delta = if s.is_chat { json!({"content": piece}) } else { json!(piece) };
            let chunk = s.chunk(delta, finish);
            if finish.is_some() {
                s.done = true;
                if s.r.include_usage {
                    s.tail.push(s.usage_chunk());
                }
                s.tail.push("[DONE]".into());
            }
            return Some((Ok(SseEvent::default().data(chunk)), s));
        }
    })
}

impl Streaming {
    /// One chunk's JSON: `delta` (chat) or text (completions), the logprobs of the tokens
    /// since the last chunk, the finish reason on the last.
    fn chunk(&mut self, delta: Value, finish: Option<Finish>) -> String {
        let tok = self.st.served.tokenizer.clone();
        let pending = std::mem::take(&mut self.pending);
        let lp: Vec<(u32, Option<&TokenLogprob>)> = pending.iter().map(|(i, l)| (*i, l.as_ref())).collect();
        let finish = finish.map(finish_name);
        let body = if self.is_chat {
            let logprobs = self.r.logprobs.map_or(Value::Null, |_| json!({"content": chat_logprobs(&tok, &lp)}));
            json!({
                "id": self.q.id, "object": "chat.completion.chunk", "created": self.q.created, "model": self.st.cfg.model_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            })
        } else {
            let logprobs = self.r.logprobs.map_or(Value::Null, |_| legacy_logprobs(&tok, &lp, self.offset));
            self.offset += delta.as_str().map_or(0, |t| t.chars().count());
            json!({
                "id": self.q.id, "object": "text_completion", "created": self.q.created, "model": self.st.cfg.model_name,
                "choices": [{"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}],
            })
        };
        body.to_string()
    }

    fn usage_chunk(&self) -> String {
        let object = if self.is_chat { "chat.completion.chunk" } else { "text_completion" };
        json!({
            "id": self.q.id, "object": object, "created": self.q.created, "model": self.st.cfg.model_name,
            "choices": [], "usage": usage(self.q.prompt.len(), self.generated),
        })
        .to_string()
    }
}
