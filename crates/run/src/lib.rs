//! Generation: prompt -> (chat template) -> prefill -> one token at a time from a KV cache.
//!
//! ```text
//! ChatTemplate::from_jinja(tokenizer_config.chat_template).render(user text)   (ChatML models)
//! generate(model, prompt ids, stop ids, settings, on_token)
//!     prefill:  Model::forward_cached(prompt)           one pass over the prompt
//!     decode:   Model::decode_step(last token)          one position per step, matvec kernels
//!     sample:   argmax (temperature 0) or softmax(logits / T) with a seeded generator
//! ```
//!
//! How the model multiplies and what its KV cache stores come from the model's own
//! [`adadim_model::DecodeSettings`]; [`Settings`] holds what sampling needs.

use std::time::Instant;

use adadim_model::{DecodeScratch, Model, ModelError};

/// Sampling settings (the model's products and cache: [`Model::settings`]).
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
}

/// What one generation cost.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub prompt_tokens: usize,
    pub generated: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    /// Why it stopped: a stop token, the caller ([`generate_until`]) or the token limit.
    pub stopped_by_token: bool,
    pub stopped_by_caller: bool,
    /// Bytes of keys and values the KV cache held at the end.
    pub kv_cache_bytes: usize,
}

impl Stats {
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.generated as f64 / self.decode_s.max(1e-12)
    }
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-12)
    }
}

/// The ChatML chat template (`<|im_start|>role\ncontent<|im_end|>\n`), with the default system
/// message the model's Jinja template inserts when none is given.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatTemplate {
    pub default_system: Option<String>,
}

impl ChatTemplate {
    /// Recognizes a ChatML Jinja template (as SmolLM2's, Qwen's); `None` for anything else,
    /// which callers then run as a raw prompt.
    pub fn from_jinja(template: &str) -> Option<Self> {
        if !template.contains("<|im_start|>") || !template.contains("<|im_end|>") {
            return None;
        }
        let start = "<|im_start|>system\n";
        let default_system = template.find(start).and_then(|i| {
            let rest = &template[i + start.len()..];
            rest.find("<|im_end|>").map(|j| rest[..j].to_string())
        });
        Some(ChatTemplate { default_system })
    }

    /// One user turn and the assistant's opening, as the template renders it.
    pub fn render(&self, user: &str) -> String {
        format!("{}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", self.system())
    }

    /// A whole conversation, turns alternating user / assistant from the first, each closed
    /// (the template with `add_generation_prompt` off).
    pub fn render_dialogue(&self, turns: &[&str]) -> String {
        let mut out = self.system();
        for (i, t) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            out.push_str(&format!("<|im_start|>{role}\n{t}<|im_end|>\n"));
        }
        out
    }

    /// A conversation of `(role, content)` messages (system, user, assistant) and the
    /// assistant's opening, as the template renders it with `add_generation_prompt`: the
    /// default system message first unless the conversation opens with its own.
    pub fn render_messages(&self, messages: &[(&str, &str)]) -> String {
        let mut out = match messages.first() {
            Some(("system", _)) => String::new(),
            _ => self.system(),
        };
        for (role, content) in messages {
            out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        out.push_str("<|im_start|>assistant\n");
        out
    }

    fn system(&self) -> String {
        self.default_system.as_ref().map(|s| format!("<|im_start|>system\n{s}<|im_end|>\n")).unwrap_or_default()
    }
}

/// A small seeded generator (xorshift*) for sampling.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The next token from one row of logits.
fn sample(logits: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    let argmax =
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0;
    if temperature <= 0.0 {
        return argmax as u32;
    }
    let max = logits[argmax] as f64;
    let w: Vec<f64> = logits.iter().map(|&l| ((l as f64 - max) / temperature).exp()).collect();
    let mut u = rng.uniform() * w.iter().sum::<f64>();
    for (i, p) in w.iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return i as u32;
        }
    }
    argmax as u32
}

/// A request's sampler: temperature, nucleus (`top_p`) and its own seeded generator. At
/// temperature 0 the argmax, as [`generate`] picks it.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: Rng,
}

impl Sampler {
    /// `top_p` in (0, 1]: sample among the most likely tokens whose probabilities add up to at
    /// least `top_p` (1: all of them).
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Self {
        Sampler { temperature, top_p, rng: Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1) }
    }

    /// The next token from one row of logits.
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || self.top_p >= 1.0 {
            return sample(logits, self.temperature, &mut self.rng);
        }
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let mut p: Vec<(f64, u32)> =
            logits.iter().enumerate().map(|(i, &l)| (((l as f64 - max) / self.temperature).exp(), i as u32)).collect();
        p.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let total: f64 = p.iter().map(|x| x.0).sum();
        let (mut kept, mut mass) = (0, 0.0);
        while kept < p.len() && (kept == 0 || mass < self.top_p * total) {
            mass += p[kept].0;
            kept += 1;
        }
        let mut u = self.rng.uniform() * mass;
        for &(w, i) in &p[..kept] {
            u -= w;
            if u <= 0.0 {
                return i;
            }
        }
        p[0].1
    }
}

/// `log softmax(logits)[token]` and the `top` most likely tokens with theirs (most likely
/// first, ties by id): what an API returns as a token's log probability.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f64, Vec<(u32, f64)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    let mut best: Vec<(u32, f64)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            let l = l as f64;
            if best.len() < top || l > best[best.len() - 1].1 {
                let at = best.partition_point(|b| b.1 >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
    }
    (logits[token as usize] as f64 - lse, best.into_iter().map(|(i, l)| (i, l - lse)).collect())
}

/// Generates after `prompt` until a token of `stop` (not emitted) or `max_tokens`, calling
/// `on_token` with each new token as it comes.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    stop: &[u32],
    s: &Settings,
    on_token: &mut dyn FnMut(u32),
) -> Result<Stats, ModelError> {
    generate_until(model, prompt, stop, s, &mut |t| {
        on_token(t);
        true
    })
}

/// As [`generate`], and `on_token` may end generation after the token it was given by
/// returning `false` (stop sequences that are text, not single tokens).
pub fn generate_until(
    model: &Model,
    prompt: &[u32],
    stop: &[u32],
    s: &Settings,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Stats, ModelError> {
    generate_after(model, model.new_cache(), prompt, stop, s, on_token)
}

/// As [`generate_until`] with the prompt's first `cache.len()` tokens already in `cache` (a
/// shared prefix, [`adadim_model::KvCache::fork`]): only `rest`, the prompt after them, is
/// prefilled. `rest` must not be empty (its last position gives the first token's logits).
pub fn generate_after(
    model: &Model,
    mut cache: adadim_model::KvCache,
    rest: &[u32],
    stop: &[u32],
    s: &Settings,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<Stats, ModelError> {
    let mut stats = Stats { prompt_tokens: cache.len() + rest.len(), ..Stats::default() };
    if rest.is_empty() || s.max_tokens == 0 {
        return Ok(stats);
    }
    let mut rng = Rng(s.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let t = Instant::now();
    let hidden = model.forward_cached(rest, &mut cache)?;
    let mut next = last_token(model, &hidden, s.temperature, &mut rng)?;
    stats.prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    // One token at a time: the matvecs' row loops and the attention heads run on spinning
    // helpers (rayon's other workers), whose start costs less than a matvec of a small model.
    let helpers = rayon::current_num_threads().saturating_sub(1);
    let mut scratch = DecodeScratch::default();
    adadim_team::with_team(helpers, || -> Result<(), ModelError> {
        loop {
            if stop.contains(&next) {
                stats.stopped_by_token = true;
                return Ok(());
            }
            let go_on = on_token(next);
            stats.generated += 1;
            if !go_on {
                stats.stopped_by_caller = true;
                return Ok(());
            }
            if stats.generated == s.max_tokens {
                return Ok(());
            }
            // One token: the slice path (the same numbers as forward_cached + logits).
            let logits = model.decode_step(next, &mut cache, &mut scratch)?;
            next = sample(logits, s.temperature, &mut rng);
        }
    })?;
    stats.decode_s = t.elapsed().as_secs_f64();
    stats.kv_cache_bytes = cache.bytes();
    Ok(stats)
}

fn last_token(model: &Model, hidden: &candle_core::Tensor, temperature: f64, rng: &mut Rng) -> Result<u32, ModelError> {
    let err = |e| ModelError::Tensor { context: "logits".into(), source: e };
    let t = hidden.dims()[0];
    let last = hidden.narrow(0, t - 1, 1).map_err(err)?;
    let logits = model.logits(&last)?.flatten_all().and_then(|l| l.to_vec1::<f32>()).map_err(err)?;
    Ok(sample(&logits, temperature, rng))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_template_is_chatml_with_its_default_system_message() {
        let jinja = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::from_jinja(jinja).unwrap();
        assert_eq!(t.render("Hi"), "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(
            t.render_dialogue(&["Hi", "Hello!", "Bye"]),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        );
        assert_eq!(t.render_messages(&[("user", "Hi")]), t.render("Hi"));
        assert_eq!(
            t.render_messages(&[("system", "Be brief."), ("user", "Hi")]),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(ChatTemplate::from_jinja("{{ bos_token }}{{ messages[0]['content'] }}"), None);
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_logprobs_normalize() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03: top_p 0.7 keeps the first two only.
        let logits = [3.0f32, 2.0, 1.0, -0.2];
        let mut s = Sampler::new(1.0, 0.7, 3);
        let drawn: Vec<u32> = (0..400).map(|_| s.next(&logits)).collect();
        assert!(drawn.contains(&0) && drawn.contains(&1) && !drawn.iter().any(|&t| t > 1), "{drawn:?}");
        let mut g = Sampler::new(0.0, 0.5, 3);
        assert_eq!(g.next(&logits), 0);
        let (lp, top) = logprobs(&logits, 1, 3);
        let total: f64 = (0..4).map(|t| logprobs(&logits, t, 0).0.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(top[1].1, lp);
    }

    #[test]
    fn sampling_is_seeded_and_greedy_at_zero_temperature() {
        let logits = [0.1f32, 2.0, 1.9, -3.0];
        assert_eq!(sample(&logits, 0.0, &mut Rng(1)), 1);
        let draw = |seed| {
            (0..200)
                .map(|_| 0)
                .fold((Rng(seed), vec![]), |(mut r, mut v), _: i32| {
                    v.push(sample(&logits, 1.0, &mut r));
                    (r, v)
                })
                .1
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        assert!(d.contains(&1) && d.contains(&2), "both likely tokens drawn: {d:?}");
    }
}
