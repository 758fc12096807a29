//! Putting the two halves together: bind, reserve the slots, run HTTP on a thread of its own
//! and the engine on the caller's (a rayon worker, whose idle siblings become the decode
//! team), stop on SIGTERM or Ctrl-C.

use std::net::SocketAddr;

use adadim_model::Model;
use thiserror::Error;

use crate::engine::{self, EngineConfig};
use crate::http::{self, Served, ServerConfig};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("the HTTP server: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Model(#[from] adadim_model::ModelError),
}

/// Serves `model` on `addr` until SIGTERM / SIGINT (or `stop` resolves), calling `listening`
/// with the bound address once requests are taken. Returns once every request has finished
/// or been cancelled after the shutdown timeout.
pub fn serve(
    model: &Model,
    served: Served,
    cfg: ServerConfig,
    engine_cfg: EngineConfig,
    addr: &str,
    listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let bind_err = |source| ServeError::Bind { addr: addr.to_string(), source };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local = std_listener.local_addr().map_err(bind_err)?;
    let (handle, rx) = engine::channel(engine_cfg);
    // The slots' memory first: a server that cannot have it does not start.
    let slots = engine::Slots::reserve(model, &engine_cfg)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ServeError::Http)?;
    let h = handle.clone();
    let engine_gone = std::sync::Arc::new(tokio::sync::Notify::new());
    let gone = engine_gone.clone();
    let http = std::thread::Builder::new()
        .name("adadim-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener)?;
                let stop = async move {
                    tokio::select! {
                        _ = stop_signal() => {}
                        _ = gone.notified() => {}
                    }
                };
                http::serve(listener, cfg, served, h, stop).await
            })
        })
        .map_err(ServeError::Http)?;
    listening(local);
    let ran = engine::run(model, &handle, rx, slots);
    // The engine stops only when told to (after the HTTP side has finished) or on an error;
    // on an error the HTTP side is stopped too.
    handle.stop_accepting();
    handle.cancel_all();
    engine_gone.notify_one();
    let http = http.join().unwrap_or_else(|_| Err(std::io::Error::other("the HTTP thread panicked")));
    ran?;
    http.map_err(ServeError::Http)
}

/// SIGTERM or SIGINT.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("stopping: no new requests; running ones finish (or are cancelled after the shutdown timeout)");
}
