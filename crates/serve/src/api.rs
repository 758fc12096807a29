//! The OpenAI request bodies, checked field by field (each error names its field), and the
//! error object every failure answers with.

use serde_json::{json, Map, Value};

/// An error answer: HTTP status and OpenAI's `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
        }
    }
    pub fn new(status: u16, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code }
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// The limits a request is held to.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Positions per sequence (prompt + completion).
    pub ctx: usize,
    pub max_stops: usize,
    pub max_stop_chars: usize,
    pub max_top_logprobs: usize,
}

/// What the prompt is: text, or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A checked request, completion or chat.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub model: String,
    pub prompt: Prompt,
    /// `None`: as many as the context leaves (chat) or 16 (completions), decided once the
    /// prompt is tokenized.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Completions: `logprobs` N (0..=5); chat: `top_logprobs` when `logprobs` is true.
    pub logprobs: Option<usize>,
    pub echo: bool,
    /// Generate past the end-of-sequence token (llama.cpp's and vLLM's extension): fixed-length
    /// completions for load tests.
    pub ignore_eos: bool,
}

fn object(body: &Value) -> Result<&Map<String, Value>, ApiError> {
    body.as_object().ok_or_else(|| ApiError::invalid("body", "the request body must be a JSON object"))
}

fn number(o: &Map<String, Value>, key: &str, default: f64, lo: f64, hi: f64) -> Result<f64, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x),
            Some(x) => Err(ApiError::invalid(key, format!("`{key}` is {x}: it must be between {lo} and {hi}"))),
            None => Err(ApiError::invalid(key, format!("`{key}` must be a number, not {}", kind(v)))),
        },
    }
}

fn integer(o: &Map<String, Value>, key: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            Some(x) => Err(ApiError::invalid(key, format!("`{key}` is {x}: it must be between {lo} and {hi}"))),
            None => Err(ApiError::invalid(key, format!("`{key}` must be an integer between {lo} and {hi}, not {v}"))),
        },
    }
}

fn boolean(o: &Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ApiError::invalid(key, format!("`{key}` must be true or false, not {}", kind(v)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields completions and chat share.
fn common(o: &Map<String, Value>, lim: &Limits, prompt: Prompt) -> Result<Request, ApiError> {
    let model = match o.get("model") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => return Err(ApiError::invalid("model", "`model` is required")),
        Some(v) => return Err(ApiError::invalid("model", format!("`model` must be a string, not {}", kind(v)))),
    };
    // Features this server does not have are refused, not silently ignored.
    for (key, neutral) in [("frequency_penalty", 0.0), ("presence_penalty", 0.0)] {
        if number(o, key, neutral, -2.0, 2.0)? != neutral {
            return Err(ApiError::invalid(key, format!("`{key}` is not supported by this server (leave it out or 0)")));
        }
    }
    if integer(o, "n", 1, u64::MAX)?.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "`n`: this server returns one choice per request (n = 1)"));
    }
    if o.get("logit_bias").is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|m| !m.is_empty())) {
        return Err(ApiError::invalid("logit_bias", "`logit_bias` is not supported by this server"));
    }
    let stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| ApiError::invalid("stop", "`stop` must hold strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::invalid(
                "stop",
                format!("`stop` must be a string or an array of strings, not {}", kind(v)),
            ))
        }
    };
    if stop.len() > lim.max_stops {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` has {} strings: at most {} are allowed", stop.len(), lim.max_stops),
        ));
    }
    if let Some(s) = stop.iter().find(|s| s.is_empty() || s.chars().count() > lim.max_stop_chars) {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` string of {} characters: each must have 1 to {}", s.chars().count(), lim.max_stop_chars),
        ));
    }
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(m)) => boolean(m, "include_usage")?,
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!("`stream_options` must be an object, not {}", kind(v)),
            ))
        }
    };
    Ok(Request {
        model,
        prompt,
        max_tokens: integer(o, "max_tokens", 0, u64::MAX)?.map(|n| n as usize),
        temperature: number(o, "temperature", 1.0, 0.0, 2.0)?,
        top_p: {
            let p = number(o, "top_p", 1.0, 0.0, 1.0)?;
            if p <= 0.0 {
                return Err(ApiError::invalid("top_p", "`top_p` must be above 0 (and at most 1)"));
            }
            p
        },
        seed: match o.get("seed") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_i64()
                    .map(|s| s as u64)
                    .or(v.as_u64())
                    .ok_or_else(|| ApiError::invalid("seed", format!("`seed` must be an integer, not {}", kind(v))))?,
            ),
        },
        stop,
        stream: boolean(o, "stream")?,
        include_usage,
        logprobs: None,
        echo: false,
        ignore_eos: boolean(o, "ignore_eos")?,
    })
}

/// `POST /v1/completions`.
pub fn completion(body: &Value, lim: &Limits) -> Result<Request, ApiError> {
    let o = object(body)?;
    let prompt = match o.get("prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => Prompt::Tokens(
            a.iter()
                .map(|v| v.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32))
                .collect::<Option<_>>()
                .ok_or_else(|| ApiError::invalid("prompt", "`prompt` token ids must be integers >= 0"))?,
        ),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Prompt::Text(a[0].as_str().unwrap_or_default().into())
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && !a.is_empty() => {
            return Err(ApiError::invalid(
                "prompt",
                format!("`prompt` holds {} prompts: send one per request", a.len()),
            ))
        }
        None | Some(Value::Null) => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("`prompt` must be a string or an array of token ids, not {}", kind(v)),
            ))
        }
    };
    if o.get("suffix").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported by this server"));
    }
    if integer(o, "best_of", 1, u64::MAX)?.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("best_of", "`best_of`: this server returns one choice (best_of = 1)"));
    }
    let mut r = common(o, lim, prompt)?;
    r.logprobs = integer(o, "logprobs", 0, lim.max_top_logprobs as u64)?.map(|n| n as usize);
    r.echo = boolean(o, "echo")?;
    Ok(r)
}

/// `POST /v1/chat/completions`: the messages as `(role, content)` pairs, and the request.
pub fn chat(body: &Value, lim: &Limits) -> Result<(Vec<(String, String)>, Request), ApiError> {
    let o = object(body)?;
    let messages = match o.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid("messages", "`messages` is empty: send at least one message"))
        }
        None | Some(Value::Null) => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(v) => return Err(ApiError::invalid("messages", format!("`messages` must be an array, not {}", kind(v)))),
    };
    let mut turns = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let at = |f: &str| format!("messages[{i}].{f}");
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(&at("role"), format!("`{}` must be a string", at("role"))))?;
        if !matches!(role, "system" | "user" | "assistant") {
            return Err(ApiError::invalid(
                &at("role"),
                format!("`{}` is {role:?}: system, user or assistant", at("role")),
            ));
        }
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            // Content parts: the text ones, joined (images and audio are refused).
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => Ok(t),
                    _ => Err(ApiError::invalid(
                        &at("content"),
                        format!("`{}`: only text parts are supported", at("content")),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(""),
            _ => return Err(ApiError::invalid(&at("content"), format!("`{}` must be a string", at("content")))),
        };
        turns.push((role.to_string(), content));
    }
    let mut r = common(o, lim, Prompt::Text(String::new()))?;
    if let Some(n) = integer(o, "max_completion_tokens", 0, u64::MAX)? {
        r.max_tokens = Some(n as usize);
    }
    if boolean(o, "logprobs")? {
        r.logprobs = Some(integer(o, "top_logprobs", 0, lim.max_top_logprobs as u64)?.unwrap_or(0) as usize);
    } else if integer(o, "top_logprobs", 0, u64::MAX)?.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs`: true"));
    }
    Ok((turns, r))
}

/// The completion's token budget once the prompt's length is known: the asked `max_tokens`
/// checked against the context, or the default.
pub fn budget(r: &Request, prompt_tokens: usize, chat: bool, lim: &Limits) -> Result<usize, ApiError> {
    if prompt_tokens == 0 {
        return Err(ApiError::invalid(
            if chat { "messages" } else { "prompt" },
            "the prompt is empty after tokenization",
        ));
    }
    let room = lim.ctx.saturating_sub(prompt_tokens);
    let key = "max_tokens";
    match r.max_tokens {
        Some(0) if !r.echo => Err(ApiError::invalid(key, "`max_tokens` must be at least 1 (0 only with `echo`: scoring the prompt)")),
        Some(n) if prompt_tokens + n > lim.ctx => Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                key,
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {} tokens ({prompt_tokens} in the prompt, {n} for the completion). Please reduce the prompt or the completion length.",
                    lim.ctx,
                    prompt_tokens + n
                ),
            )
        }),
        Some(n) => Ok(n),
        None if room == 0 => Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                if chat { "messages" } else { "prompt" },
                format!("This model's maximum context length is {} tokens; the prompt has {prompt_tokens}, leaving none for the completion.", lim.ctx),
            )
        }),
        None => Ok(if chat { room } else { room.min(16) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits { ctx: 100, max_stops: 4, max_stop_chars: 64, max_top_logprobs: 5 }
    }

    #[test]
    fn each_bad_field_is_named() {
        let bad = [
            (json!([1, 2]), "body"),
            (json!({"prompt": "hi"}), "model"),
            (json!({"model": "m"}), "prompt"),
            (json!({"model": "m", "prompt": 5}), "prompt"),
            (json!({"model": "m", "prompt": "hi", "max_tokens": "ten"}), "max_tokens"),
            (json!({"model": "m", "prompt": "hi", "max_tokens": -1}), "max_tokens"),
            (json!({"model": "m", "prompt": "hi", "temperature": 3}), "temperature"),
            (json!({"model": "m", "prompt": "hi", "top_p": 0}), "top_p"),
            (json!({"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"model": "m", "prompt": "hi", "stop": [""]}), "stop"),
            (json!({"model": "m", "prompt": "hi", "logprobs": 6}), "logprobs"),
            (json!({"model": "m", "prompt": "hi", "stream": "yes"}), "stream"),
            (json!({"model": "m", "prompt": "hi", "n": 2}), "n"),
            (json!({"model": "m", "prompt": "hi", "presence_penalty": 0.5}), "presence_penalty"),
            (json!({"model": "m", "prompt": ["a", "b"]}), "prompt"),
        ];
        for (body, field) in bad {
            let e = completion(&body, &lim()).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(field)), "{body}: {e:?}");
        }
        for (body, field) in [
            (json!({"model": "m", "messages": []}), "messages"),
            (json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
            (json!({"model": "m", "messages": [{"role": "user"}]}), "messages[0].content"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), "top_logprobs"),
        ] {
            let e = chat(&body, &lim()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e:?}");
        }
    }

    #[test]
    fn budgets_hold_to_the_context() {
        let r = completion(&json!({"model": "m", "prompt": "hi"}), &lim()).unwrap();
        assert_eq!(budget(&r, 10, false, &lim()), Ok(16));
        assert_eq!(budget(&r, 90, true, &lim()), Ok(10));
        let r = completion(&json!({"model": "m", "prompt": "hi", "max_tokens": 50}), &lim()).unwrap();
        let e = budget(&r, 60, false, &lim()).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(e.message.contains("110 tokens (60 in the prompt, 50 for the completion)"), "{}", e.message);
        let r = completion(&json!({"model": "m", "prompt": "hi", "max_tokens": 0}), &lim()).unwrap();
        assert_eq!(budget(&r, 5, false, &lim()).unwrap_err().param.as_deref(), Some("max_tokens"));
        let r = completion(&json!({"model": "m", "prompt": "hi", "max_tokens": 0, "echo": true}), &lim()).unwrap();
        assert_eq!(budget(&r, 5, false, &lim()), Ok(0));
    }
}
