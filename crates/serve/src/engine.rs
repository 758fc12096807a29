//! The decoding engine: `--parallel` slots, each a KV cache reserved up front, filled from a
//! bounded queue of requests; every step decodes one token for each slot that has a sequence,
//! all of them through the weights together ([`adadim_model::Model::decode_batch`]).
//!
//! ```text
//! HTTP handler --Handle::submit--> queue (bounded; full: QueueFull -> 503)
//! engine thread: loop {
//!     take queued requests into free slots (exact prompt logprobs first, where asked)
//!     prefill one chunk of one waiting prompt        (chunks bound the others' stall)
//!     decode steps for every slot with a sequence    (on the decode team, until a prompt waits)
//!     each token -> its request's events; a request whose receiver is gone frees its slot
//! }
//! ```
//!
//! A sequence's tokens do not depend on what else is decoded beside it: the batched step gives
//! each the numbers of its own decode step, and its sampler is its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use adadim_model::{BatchScratch, KvCache, Model, ModelError};
use adadim_run::Sampler;
use tokio::sync::mpsc::UnboundedSender;

/// How many sequences decode together, how long each may be, how many requests may wait.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub parallel: usize,
    /// Positions per slot: prompt and completion together.
    pub ctx: usize,
    pub queue: usize,
    /// Prompt tokens prefilled between two decode steps of the others.
    pub prefill_chunk: usize,
}

/// One completion to run.
#[derive(Debug)]
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Tokens that end the completion (not emitted): the model's end of sequence.
    pub stop_ids: Vec<u32>,
    /// Log probability of each generated token, and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// The prompt's tokens' log probabilities as evaluation computes them, with this many
    /// alternatives each.
    pub prompt_logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

/// What a job reports, in order: its prompt's log probabilities (if asked), its tokens, then
/// `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `log p(prompt[i + 1] | prompt[..=i])` for each prompt token after the first.
    PromptLogprobs(Vec<TokenLogprob>),
    Token {
        id: u32,
        logprob: Option<TokenLogprob>,
    },
    Done(Finish),
    Failed(String),
}

/// A token's log probability under the model (softmax of its logits) and the most likely
/// alternatives', most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token (or, said by the caller, a stop string).
    Stop,
    /// `max_tokens`, or the slot's context.
    Length,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    ShuttingDown,
}

/// Counters the engine keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Microseconds spent in decode steps and prefill.
    pub decode_us: AtomicU64,
    pub prefill_us: AtomicU64,
    /// Tokens per second of the last decode steps (f64 bits), all sequences together.
    pub recent_tokens_per_s: AtomicU64,
    pub cancelled: AtomicU64,
}

/// The HTTP side's end: submits jobs, reads the counters, starts the shutdown.
#[derive(Clone)]
pub struct Handle {
    tx: SyncSender<Job>,
    pub metrics: Arc<EngineMetrics>,
    accepting: Arc<AtomicBool>,
    cancel: Arc<AtomicBool>,
    pub config: EngineConfig,
}

impl Handle {
    /// Queues `job`, or says why not (the queue is full; the server is stopping).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if !self.accepting.load(Relaxed) {
            return Err(SubmitError::ShuttingDown);
        }
        self.metrics.queued.fetch_add(1, Relaxed);
        self.tx.try_send(job).map_err(|e| {
            self.metrics.queued.fetch_sub(1, Relaxed);
            match e {
                TrySendError::Full(_) => SubmitError::QueueFull,
                TrySendError::Disconnected(_) => SubmitError::ShuttingDown,
            }
        })
    }

    /// Stop taking jobs (queued ones still run).
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Relaxed);
    }

    /// End every job now (each gets `Failed`) and stop the engine.
    pub fn cancel_all(&self) {
        self.cancel.store(true, Relaxed);
    }

    /// Jobs queued or running.
    pub fn in_flight(&self) -> usize {
        self.metrics.queued.load(Relaxed) + self.metrics.active.load(Relaxed)
    }
}

/// A handle and the engine's receiving end (run it with [`run`] on the thread that decodes).
pub fn channel(config: EngineConfig) -> (Handle, Receiver<Job>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue);
    let handle = Handle {
        tx,
        metrics: Arc::default(),
        accepting: Arc::new(AtomicBool::new(true)),
        cancel: Arc::new(AtomicBool::new(false)),
        config,
    };
    (handle, rx)
}

/// A running sequence.
struct Seq {
    job: Job,
    sampler: Sampler,
    /// Prompt tokens in the cache so far.
    prefilled: usize,
    /// The token sampled last, to emit (and then feed) next, and its log probability.
    next: Option<u32>,
    next_lp: Option<TokenLogprob>,
    generated: usize,
}

/// A slot: its cache (kept between sequences) and the sequence it runs, if any.
struct Slot {
    cache: KvCache,
    seq: Option<Seq>,
}

/// The slots' KV caches, reserved up front.
pub struct Slots(Vec<Slot>);

impl Slots {
    /// `parallel` caches of `ctx` positions each: a server that starts has the memory its
    /// slots need.
    pub fn reserve(model: &Model, cfg: &EngineConfig) -> Result<Slots, ModelError> {
        (0..cfg.parallel)
            .map(|_| Ok(Slot { cache: model.reserved_cache(cfg.ctx)?, seq: None }))
            .collect::<Result<_, ModelError>>()
            .map(Slots)
    }
}

/// Runs the engine on this thread until [`Handle::cancel_all`] (or `rx`'s senders are gone
/// and nothing runs).
pub fn run(model: &Model, handle: &Handle, rx: Receiver<Job>, slots: Slots) -> Result<(), ModelError> {
    let cfg = handle.config;
    let mut slots = slots.0;
    let m = &handle.metrics;
    let mut scratch = BatchScratch::default();
    let helpers = rayon::current_num_threads().saturating_sub(1);
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    loop {
        if handle.cancel.load(Relaxed) {
            for s in slots.iter_mut().filter(|s| s.seq.is_some()) {
                finish(s, m, Event::Failed("the server is shutting down".into()));
            }
            while let Ok(job) = rx.try_recv() {
                m.queued.fetch_sub(1, Relaxed);
                let _ = job.events.send(Event::Failed("the server is shutting down".into()));
            }
            return Ok(());
        }
        // Take queued jobs while slots are free; wait for one when nothing runs.
        let busy = slots.iter().any(|s| s.seq.is_some());
        let free = slots.iter().filter(|s| s.seq.is_none()).count();
        if !busy && open && waiting.is_empty() {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(job) => waiting.push_back(job),
                Err(e) => open = e != RecvTimeoutError::Disconnected,
            }
        }
        while open && waiting.len() < free {
            match rx.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(e) => {
                    open = !matches!(e, std::sync::mpsc::TryRecvError::Disconnected);
                    break;
                }
            }
        }
        if !open && !busy && waiting.is_empty() {
            return Ok(());
        }
        while let (Some(free), false) = (slots.iter().position(|s| s.seq.is_none()), waiting.is_empty()) {
            let job = waiting.pop_front().expect("not empty");
            m.queued.fetch_sub(1, Relaxed);
            start(model, &mut slots[free], job, m);
        }
        // One chunk of one prompt (the lowest slot's first).
        if let Some(s) = slots.iter_mut().find(|s| s.seq.as_ref().is_some_and(|q| q.next.is_none())) {
            prefill_chunk(model, s, cfg.prefill_chunk, m);
        }
        // Decode steps, on the team, until a prompt is waiting to be prefilled or taken in.
        let decoding = |s: &Slot| s.seq.as_ref().is_some_and(|q| q.next.is_some());
        if slots.iter().any(decoding) {
            adadim_team::with_team(helpers, || loop {
                emit_and_step(model, &mut slots, &mut scratch, m, cfg.ctx);
                let prompt_waiting = slots.iter().any(|s| s.seq.as_ref().is_some_and(|q| q.next.is_none()));
                let can_take = slots.iter().any(|s| s.seq.is_none()) && m.queued.load(Relaxed) > waiting.len();
                if !slots.iter().any(decoding) || prompt_waiting || can_take || handle.cancel.load(Relaxed) {
                    break;
                }
            });
        }
    }
}

/// Puts `job` into the free slot `s`: its prompt's exact logprobs first where asked; a job
/// with nothing to generate ends there.
fn start(model: &Model, s: &mut Slot, job: Job, m: &EngineMetrics) {
    m.active.fetch_add(1, Relaxed);
    m.prompt_tokens.fetch_add(job.prompt.len() as u64, Relaxed);
    s.cache.truncate(0);
    let sampler = Sampler::new(job.temperature, job.top_p, job.seed);
    s.seq = Some(Seq { job, sampler, prefilled: 0, next: None, next_lp: None, generated: 0 });
    let seq = s.seq.as_ref().expect("just set");
    if let Some(top) = seq.job.prompt_logprobs {
        let t = Instant::now();
        let lp = model
            .exact_logprobs(&seq.job.prompt, top)
            .map(|v| v.into_iter().map(|(logprob, top)| TokenLogprob { logprob, top }).collect());
        m.prefill_us.fetch_add(t.elapsed().as_micros() as u64, Relaxed);
        match lp {
            Ok(lp) => {
                if seq.job.events.send(Event::PromptLogprobs(lp)).is_err() {
                    return cancel(s, m);
                }
            }
            Err(e) => return finish(s, m, Event::Failed(format!("scoring the prompt: {e}"))),
        }
    }
    if seq.job.max_tokens == 0 {
        finish(s, m, Event::Done(Finish::Length));
    }
}

/// Prefills the next `chunk` prompt tokens of `s`; after the last, samples its first token.
fn prefill_chunk(model: &Model, s: &mut Slot, chunk: usize, m: &EngineMetrics) {
    let t = Instant::now();
    let seq = s.seq.as_mut().expect("a sequence");
    if seq.job.events.is_closed() {
        return cancel(s, m);
    }
    let end = (seq.prefilled + chunk.max(1)).min(seq.job.prompt.len());
    let hidden = model.forward_cached(&seq.job.prompt[seq.prefilled..end], &mut s.cache);
    m.prefill_us.fetch_add(t.elapsed().as_micros() as u64, Relaxed);
    let hidden = match hidden {
        Ok(h) => h,
        Err(e) => return finish(s, m, Event::Failed(format!("prefill: {e}"))),
    };
    seq.prefilled = end;
    if end < seq.job.prompt.len() {
        return;
    }
    let n = hidden.dims()[0];
    let logits = hidden
        .narrow(0, n - 1, 1)
        .map_err(|e| ModelError::Tensor { context: "last position".into(), source: e })
        .and_then(|h| model.logits(&h))
        .and_then(|l| {
            l.flatten_all()
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(|e| ModelError::Tensor { context: "logits".into(), source: e })
        });
    match logits {
        Ok(l) => {
            let id = seq.sampler.next(&l);
            let lp = seq.job.logprobs.map(|top| token_logprob(&l, id, top));
            (seq.next, seq.next_lp) = (Some(id), lp);
        }
        Err(e) => finish(s, m, Event::Failed(format!("prefill: {e}"))),
    }
}

fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let (logprob, top) = adadim_run::logprobs(logits, id, top);
    TokenLogprob { logprob, top }
}

/// Emits each decoding sequence's sampled token (ending those that stop), then one batched
/// step for those that go on and samples their next tokens.
fn emit_and_step(model: &Model, slots: &mut [Slot], scratch: &mut BatchScratch, m: &EngineMetrics, ctx: usize) {
    let mut feed: Vec<(usize, u32)> = Vec::new();
    for (i, s) in slots.iter_mut().enumerate() {
        let Some(seq) = s.seq.as_mut() else { continue };
        let Some(next) = seq.next else { continue };
        if seq.job.stop_ids.contains(&next) {
            finish(s, m, Event::Done(Finish::Stop));
            continue;
        }
        if seq.job.events.send(Event::Token { id: next, logprob: seq.next_lp.take() }).is_err() {
            cancel(s, m);
            continue;
        }
        seq.generated += 1;
        m.generated_tokens.fetch_add(1, Relaxed);
        if seq.generated >= seq.job.max_tokens || s.cache.len() >= ctx {
            finish(s, m, Event::Done(Finish::Length));
            continue;
        }
        feed.push((i, next));
    }
    if feed.is_empty() {
        return;
    }
    let t = Instant::now();
    let ids: Vec<u32> = feed.iter().map(|f| f.1).collect();
    let mut caches: Vec<&mut KvCache> = Vec::with_capacity(feed.len());
    let mut it = feed.iter().peekable();
    for (i, s) in slots.iter_mut().enumerate() {
        if it.peek().is_some_and(|f| f.0 == i) {
            caches.push(&mut s.cache);
            it.next();
        }
    }
    let stepped = model.decode_batch(&ids, &mut caches, scratch);
    drop(caches);
    match stepped {
        Ok(logits) => {
            let vocab = logits.len() / ids.len();
            for (j, &(i, _)) in feed.iter().enumerate() {
                let seq = slots[i].seq.as_mut().expect("fed");
                let row = &logits[j * vocab..(j + 1) * vocab];
                let id = seq.sampler.next(row);
                seq.next_lp = seq.job.logprobs.map(|top| token_logprob(row, id, top));
                seq.next = Some(id);
            }
        }
        Err(e) => {
            for &(i, _) in &feed {
                finish(&mut slots[i], m, Event::Failed(format!("decode step: {e}")));
            }
        }
    }
    let us = t.elapsed().as_micros() as u64;
    m.decode_steps.fetch_add(1, Relaxed);
    m.decode_us.fetch_add(us, Relaxed);
    let rate = ids.len() as f64 / (us.max(1) as f64 * 1e-6);
    let old = f64::from_bits(m.recent_tokens_per_s.load(Relaxed));
    m.recent_tokens_per_s.store((if old > 0.0 { 0.9 * old + 0.1 * rate } else { rate }).to_bits(), Relaxed);
}

/// Ends the sequence of `s` with `last` (sent if its receiver is still there).
fn finish(s: &mut Slot, m: &EngineMetrics, last: Event) {
    if let Some(seq) = s.seq.take() {
        let _ = seq.job.events.send(last);
        m.active.fetch_sub(1, Relaxed);
    }
}

/// Frees `s`: its client is gone.
fn cancel(s: &mut Slot, m: &EngineMetrics) {
    if s.seq.take().is_some() {
        m.active.fetch_sub(1, Relaxed);
        m.cancelled.fetch_add(1, Relaxed);
    }
}
