//! `adadim serve`: load the model once, reserve the slots' KV caches, answer the OpenAI API
//! until SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use crate::args::ServeArgs;
use crate::resolve::{decoding_model, eos_ids, model_dir};
use anyhow::{bail, Result};

pub fn serve(a: ServeArgs) -> Result<()> {
    if a.parallel == 0 || a.parallel > 256 {
        bail!("--parallel {}: must be 1 to 256", a.parallel);
    }
    if a.ctx < 2 {
        bail!("--ctx {}: must be at least 2", a.ctx);
    }
    if a.queue == 0 {
        bail!("--queue 0: at least one request must be able to wait");
    }
    if !(a.shutdown_timeout.is_finite() && a.shutdown_timeout >= 0.0) {
        bail!("--shutdown-timeout {}: must be a number of seconds >= 0", a.shutdown_timeout);
    }
    if a.api_key.as_deref() == Some("") {
        bail!("--api-key: empty (leave it out to serve without a key)");
    }
    let dir = model_dir(&a.model.model)?;
    let src = adadim_model::open(&dir)?;
    let tok = adadim_load::tokenizer::load(&dir)?;
    let tok_config = adadim_load::tokenizer::config(&dir)?.unwrap_or_default();
    let template = tok_config["chat_template"].as_str().and_then(adadim_run::ChatTemplate::from_jinja);
    let eos = eos_ids(&dir, &tok, &tok_config)?;
    crate::limits::check_positions(src.config(), &dir.join("config.json"), a.ctx, &format!("--ctx {}", a.ctx))?;
    let per_position =
        2 * src.config().num_hidden_layers * src.config().kv_dim() * if a.decode.kv_cache == "f32" { 4 } else { 2 };
    crate::limits::check_memory(
        "--parallel / --ctx",
        (a.parallel * a.ctx * per_position) as f64,
        &format!("{} KV caches of {} positions", a.parallel, a.ctx),
    )?;
    let model = decoding_model(src.as_ref(), &dir, a.ctx, &a.decode)?;
    let name = a.name.clone().unwrap_or_else(|| {
        let p = std::path::Path::new(&a.model.model);
        p.file_name().map_or(a.model.model.clone(), |n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
    });
    let cfg = adadim_serve::http::ServerConfig {
        model_name: name.clone(),
        api_key: a.api_key.clone(),
        max_body: a.max_body,
        limits: adadim_serve::api::Limits { ctx: a.ctx, max_stops: 4, max_stop_chars: 256, max_top_logprobs: 20 },
        shutdown_timeout: Duration::from_secs_f64(a.shutdown_timeout),
    };
    let engine = adadim_serve::engine::EngineConfig {
        parallel: a.parallel,
        ctx: a.ctx,
        queue: a.queue,
        prefill_chunk: a.prefill_chunk.max(1),
    };
    let served = adadim_serve::http::Served { tokenizer: Arc::new(tok), template, eos };
    let addr = format!("{}:{}", a.host, a.port);
    let (parallel, ctx, keyed) = (a.parallel, a.ctx, a.api_key.is_some());
    adadim_serve::server::serve(&model, served, cfg, engine, &addr, |at| {
        eprintln!(
            "serving {name} on http://{at} ({parallel} slots of {ctx} positions{})",
            if keyed { ", API key required" } else { "" }
        );
    })?;
    eprintln!("stopped");
    Ok(())
}
