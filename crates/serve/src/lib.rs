//! # adadim-serve
//!
//! An OpenAI-compatible HTTP server over a loaded [`adadim_model::Model`] (packed or float):
//! the [`engine`] decodes up to `--parallel` sequences together on the calling thread, the
//! [`http`] side (axum on tokio, its own thread) checks requests ([`api`]), queues them and
//! answers whole or streamed, turning tokens into text as they come ([`text`]).
//!
//! ```text
//! client --HTTP--> http: auth, body limit, api::completion / api::chat, tokenize, budget
//!                   --Handle::submit--> engine: slots, prefill chunks, batched decode steps
//!                   <--Event (tokens, logprobs, finish)-- engine
//!        <--JSON or server-sent events-- http: text::TextStream (stop strings, whole characters)
//! ```

pub mod api;
pub mod engine;
pub mod http;
pub mod server;
pub mod text;
